"""``qkdnode ctl calibrate --wait`` and ``sync --wait``: start the procedure, follow it by
telemetry and status polls until it has ended, and print its outcome."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from qkdnode.bus.errors import BusError
from qkdnode.cli import EXIT_FAILURE, EXIT_OK
from qkdnode.cli.ctl_errors import bus_error, say
from qkdnode.cli.ctl_format import duration, scalar
from qkdnode.cli.ctl_nodes import one_node, open_client, open_subscription
from qkdnode.cli.ctl_requests import COMMANDS, run_request
from qkdnode.client import Client, Subscription


@dataclass(frozen=True)
class Procedure:
    command: str
    state: str  # the node's state while it runs
    ok_events: frozenset[str]  # state-machine events that end it successfully
    done_flag: str  # status["stats"] flag that is True after a success
    noun: str

    def is_result(self, topic: str) -> bool:
        """Telemetry topics that carry this procedure's results."""
        if self.command == "calibrate":
            return topic == "calibration" or topic.startswith("calibration.")
        return topic in ("sync", "calibration.encoding_compensation") or topic.startswith("sync.")


PROCEDURES = {
    "calibrate": Procedure(
        "calibrate", "CALIBRATING", frozenset({"calibrated"}), "calibrated", "calibration"
    ),
    "sync": Procedure(
        "sync", "SYNCHRONIZING", frozenset({"locked"}), "synchronized", "synchronization"
    ),
}


@dataclass
class Outcome:
    ok: bool
    message: str
    state: str = ""
    event: str = ""
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    alarms: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self, procedure: Procedure) -> dict[str, Any]:
        return {
            "procedure": procedure.command,
            "ok": self.ok,
            "message": self.message,
            "state": self.state,
            "event": self.event,
            "seconds": round(self.seconds, 3),
            "results": self.results,
            "alarms": self.alarms,
        }


def procedure_action(args: argparse.Namespace) -> int:
    if not args.wait:
        return run_request(args, COMMANDS[args.ctl_command], {})
    proc = PROCEDURES[args.ctl_command]
    node = one_node(args)
    with open_client(args, node) as client:
        sub = open_subscription(args, node, client, idle_timeout_s=10.0)
        with sub:
            try:
                before = client.request("status", {}, args.timeout or 5.0)
            except BusError as exc:
                return bus_error(args, exc)
            _prime(sub)
            base_seq, base_restarts = sub.state.seq, sub.state.restarts
            t0 = time.monotonic()
            try:
                reply = client.request(proc.command, {})
            except BusError as exc:
                return bus_error(args, exc)
            outcome = _wait_outcome(
                args,
                proc,
                client=client,
                sub=sub,
                before=before,
                reply=reply,
                base_seq=base_seq,
                base_restarts=base_restarts,
                t0=t0,
            )
    outcome.seconds = time.monotonic() - t0
    if args.json:
        print(json.dumps(outcome.as_dict(proc), indent=2, sort_keys=True))
    else:
        _print_outcome(proc, outcome)
    return EXIT_OK if outcome.ok else EXIT_FAILURE


def _prime(sub: Subscription, limit_s: float = 2.0) -> None:
    """Take the snapshot and wait for one live message (the subscription is through)."""
    deadline = time.monotonic() + limit_s
    rx0 = sub.received
    while time.monotonic() < deadline:
        try:
            sub.poll(0.1)
        except BusError:
            return  # no telemetry: the status polls decide
        if not sub.state.needs_snapshot and sub.received > rx0:
            return


def _wait_outcome(
    args: argparse.Namespace,
    proc: Procedure,
    *,
    client: Client,
    sub: Subscription,
    before: dict[str, Any],
    reply: dict[str, Any],
    base_seq: int,
    base_restarts: int,
    t0: float,
) -> Outcome:
    results: dict[str, dict[str, Any]] = {}
    alarms: list[dict[str, Any]] = []
    deadline = t0 + args.wait_timeout
    left_at: float | None = None
    next_status = 0.0
    status: dict[str, Any] = {}
    status_error = ""
    progress = _Progress(proc)
    try:
        while True:
            now = time.monotonic()
            if now > deadline:
                why = f"; last status: {status_error}" if status_error else ""
                return Outcome(
                    False,
                    f"no outcome within --wait-timeout {args.wait_timeout:g} s{why}",
                    str(status.get("state", "")),
                    results=results,
                    alarms=alarms,
                )
            try:
                events = sub.poll(0.25)
            except BusError:
                events = []
            if sub.state.restarts > base_restarts:
                return Outcome(False, f"the node restarted during the {proc.noun}", results=results)
            for ev in events:
                if ev.kind == "stale" or (ev.kind == "snapshot" and ev.seq <= base_seq):
                    continue
                payload = ev.payload
                if proc.is_result(ev.topic):
                    results[ev.topic] = payload
                    progress.note(ev.topic, payload)
                elif ev.topic == "alarm":
                    alarms.append(payload)
                elif ev.topic == "state" and str(payload.get("old", "")).upper() == proc.state:
                    event = str(payload.get("event", ""))
                    reason = str(payload.get("reason", ""))
                    ok = event in proc.ok_events
                    msg = reason or (f"{proc.noun} complete" if ok else f"{proc.noun} ended")
                    if not ok and event and event != "failed":  # stopped, peer lost, fault...
                        msg = f"{msg} ({event})"
                    return Outcome(ok, msg, str(payload.get("new", "")), event, results, alarms)
            if now >= next_status:
                next_status = now + 1.0
                try:
                    status = client.request("status", {}, 5.0)
                except BusError as exc:
                    status_error = str(exc)
                    continue  # not answering now: the deadline or a later poll decides
                status_error = ""
                state = str(status.get("state", "")).upper()
                progress.show(state, now - t0)
                if state == proc.state:
                    left_at = None
                elif left_at is None and sub.received:
                    left_at = now  # give the telemetry a moment to tell how it ended
                elif left_at is None or now - left_at > 1.5:  # judge by status
                    out = _outcome_from_status(proc, before, status, reply)
                    out.results, out.alarms = results, alarms
                    return out
    finally:
        progress.clear()


def _outcome_from_status(
    proc: Procedure, before: dict[str, Any], status: dict[str, Any], reply: dict[str, Any]
) -> Outcome:
    stats = status.get("stats") if isinstance(status.get("stats"), dict) else {}
    assert isinstance(stats, dict)
    old_stats = before.get("stats") if isinstance(before.get("stats"), dict) else {}
    assert isinstance(old_stats, dict)
    state = str(status.get("state", ""))
    failures, old_failures = stats.get("failures"), old_stats.get("failures")
    if isinstance(failures, int) and isinstance(old_failures, int) and failures > old_failures:
        return Outcome(False, str(stats.get("last_failure") or f"{proc.noun} failed"), state)
    flag = stats.get(proc.done_flag)
    if flag is True:
        return Outcome(True, f"{proc.noun} complete", state)
    if flag is False:
        return Outcome(False, f"{proc.noun} did not complete (the node is {state})", state)
    if isinstance(reply.get("ok"), bool):  # a node that runs the procedure within the command
        return Outcome(bool(reply["ok"]), str(reply.get("message") or proc.noun), state)
    return Outcome(False, f"the node left {proc.state}; the outcome is unknown", state)


class _Progress:
    """A redrawn line on a terminal's stderr while --wait waits."""

    def __init__(self, proc: Procedure) -> None:
        self.proc = proc
        self.tty = sys.stderr.isatty()
        self.done: list[str] = []
        self.shown = False

    def note(self, topic: str, payload: dict[str, Any]) -> None:
        ok = payload.get("ok", True)
        self.done.append(f"{topic.rsplit('.', 1)[-1]} {'ok' if ok else 'FAILED'}")

    def show(self, state: str, elapsed: float) -> None:
        if not self.tty:
            return
        done = f": {', '.join(self.done)}" if self.done else ""
        sys.stderr.write(f"\r\x1b[K{self.proc.noun}: {state} {duration(elapsed)}{done}")
        sys.stderr.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _print_outcome(proc: Procedure, out: Outcome) -> None:
    where = f" (node {out.state}" if out.state else " ("
    where += f"{', ' if out.state else ''}after {duration(out.seconds)})"
    head = f"{proc.noun} {'complete' if out.ok else 'failed'}"
    if out.message.lower().startswith(head.lower()):
        line = out.message + where  # the node's reason already says it
    else:
        line = f"{head}: {out.message}{where}"
    if out.ok:
        print(line)
    else:
        say(line)
    for topic, payload in out.results.items():
        ok = payload.get("ok", True)
        head = f"{topic}: {'ok' if ok else 'FAILED'}"
        if isinstance(payload.get("duration_s"), int | float):
            head += f" in {duration(float(payload['duration_s']))}"
        if payload.get("message"):
            head += f": {payload['message']}"
        print(head)
        for key, value in payload.items():
            if key in ("ok", "duration_s", "message", "procedure", "timestamp_utc"):
                continue
            if isinstance(value, str | int | float | bool) or value is None:
                print(f"  {key}: {scalar(value)}")
    for alarm in out.alarms:
        name = alarm.get("name") or alarm.get("alarm") or "alarm"
        what = f" {alarm['event']}" if isinstance(alarm.get("event"), str) else ""
        text = alarm.get("cause") or alarm.get("message") or ""
        say(f"alarm {name}{what}: {text}")
