"""``qkdnode ctl watch``: follow one or several nodes through their telemetry and status,
across restarts and outages; a live screen per node on a terminal, JSON lines otherwise."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from qkdnode.bus.errors import BusError, RemoteError
from qkdnode.cli import EXIT_OK
from qkdnode.cli.ctl_errors import UsageError, bus_error, say
from qkdnode.cli.ctl_nodes import NodeAddr, node_addrs, open_client, open_subscription
from qkdnode.cli.ctl_render import NodeScreen, render_node
from qkdnode.client import TelemetryEvent

#: ``notify(kind, message)``: a connection change of one node ("unreachable", ...)
Notify = Callable[[str, str], None]


class _NodeWatch:
    """One node of ``watch``: its client, its telemetry subscription and its screen."""

    def __init__(self, args: argparse.Namespace, addr: NodeAddr, notify: Notify) -> None:
        self.args = args
        self.notify = notify
        self.client = open_client(args, addr)
        try:
            self.sub = open_subscription(
                args, addr, self.client, args.idle_timeout, tuple(args.topic)
            )
        except BaseException:
            self.client.close()
            raise
        self.screen = NodeScreen(addr)
        self.next_status = 0.0
        self.samples: deque[tuple[float, float]] = deque()

    def close(self) -> None:
        self.sub.close()
        self.client.close()

    def poll(self, timeout_s: float) -> list[TelemetryEvent]:
        """Telemetry events; refreshes the status and tells ``notify`` of connection changes."""
        sc = self.screen
        restarts, resyncs = self.sub.state.restarts, self.sub.state.resyncs
        try:
            events = self.sub.poll(timeout_s)
        except RemoteError:
            raise  # refused (role, key): waiting would not help
        except BusError as exc:
            self._down(f"no answer ({exc})")
            events = []
        else:
            if self.sub.state.resyncs > resyncs:  # the node answered a snapshot
                self._up()
        if self.sub.state.restarts > restarts:
            sc.restarts = self.sub.state.restarts
            sc.status = None
            self.samples.clear()
            self._notice(f"node restarted at {time.strftime('%H:%M:%S')}", "restarted")
        sc.telemetry_stale = self.sub.stale
        sc.values = dict(self.sub.state.values)
        now = time.monotonic()
        if now >= self.next_status:
            self._refresh_status()
        return events

    def _refresh_status(self) -> None:
        sc = self.screen
        # a node that does not answer is asked less often, with a shorter timeout (the
        # other nodes' screens wait meanwhile); its telemetry coming back is noticed sooner
        interval = self.args.interval if sc.connected else max(self.args.interval, 3.0)
        self.next_status = time.monotonic() + interval
        try:
            status = self.client.request("status", {}, 2.0 if sc.connected else 0.5)
        except RemoteError as exc:
            sc.error = f"status refused: {exc}"
            return
        except BusError as exc:
            self._down(f"no answer ({exc})")
            return
        sc.error = ""
        sc.status, sc.status_at = status, time.time()
        self._up()
        self._measure(status)

    def _measure(self, status: dict[str, Any]) -> None:
        stats = status.get("stats")
        bits = stats.get("secret_bits") if isinstance(stats, dict) else None
        if not isinstance(bits, int | float):
            return
        now = time.monotonic()
        if self.samples and bits < self.samples[-1][1]:
            self.samples.clear()  # counters reset (new exchange session)
        self.samples.append((now, float(bits)))
        while len(self.samples) > 2 and now - self.samples[0][0] > 60:
            self.samples.popleft()
        t0, b0 = self.samples[0]
        busy = status.get("state") == "EXCHANGING"
        self.screen.measured_rate_bps = (bits - b0) / (now - t0) if busy and now - t0 >= 5 else None

    def _down(self, reason: str) -> None:
        sc = self.screen
        sc.down_reason = reason
        if sc.connected or sc.down_since is None:
            sc.connected = False
            sc.down_since = time.time()
            self.notify("unreachable", f"{sc.addr.label}: {reason}; waiting for it to come back")

    def _up(self) -> None:
        sc = self.screen
        if sc.connected:
            return
        was_down = sc.down_since is not None
        sc.connected, sc.down_since, sc.down_reason = True, None, ""
        if was_down:
            self._notice(f"reconnected at {time.strftime('%H:%M:%S')}", "reconnected")

    def _notice(self, text: str, kind: str) -> None:
        self.screen.notices.append(text)
        self.notify(kind, f"{self.screen.addr.label}: {text}")


def watch_action(args: argparse.Namespace) -> int:
    nodes = node_addrs(args)
    for node in nodes:
        if node.telemetry is None:
            raise UsageError(f"no telemetry endpoint for {node.control}: give --telemetry-endpoint")
    tty = sys.stdout.isatty() and not args.json
    multi = len(nodes) > 1

    def emit(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def notifier(label: str) -> Notify:
        def notify(kind: str, message: str) -> None:
            if tty:
                return  # the node's screen shows it
            say(f"ctl watch: {message}")
            emit({"kind": kind, "node": label, "message": message, "ts": time.time()})

        return notify

    watches: list[_NodeWatch] = []
    try:
        for node in nodes:
            watches.append(_NodeWatch(args, node, notifier(node.label)))
        seen = 0
        next_draw = 0.0
        end = time.monotonic() + args.duration if args.duration > 0 else None
        while end is None or time.monotonic() < end:
            for w in watches:
                for ev in w.poll(0.25 / len(watches)):
                    seen += 1
                    if not tty:
                        line: dict[str, Any] = {
                            "kind": ev.kind,
                            "topic": ev.topic,
                            "seq": ev.seq,
                            "ts": ev.ts,
                            "payload": ev.payload,
                        }
                        if multi:
                            line["node"] = w.screen.addr.label
                        emit(line)
                    if args.count and seen >= args.count:
                        return EXIT_OK
            if tty and time.monotonic() >= next_draw:
                next_draw = time.monotonic() + 0.5
                _draw(watches, tuple(args.topic))
        if tty:
            _draw(watches, tuple(args.topic))
        return EXIT_OK
    except RemoteError as exc:
        return bus_error(args, exc)
    finally:
        for w in watches:
            w.close()


def _draw(watches: list[_NodeWatch], topics: tuple[str, ...]) -> None:
    now = time.time()
    text = [f"qkdnode ctl watch  {time.strftime('%Y-%m-%d %H:%M:%S')}  (Ctrl-C to quit)"]
    for w in watches:
        text += ["", *render_node(w.screen, now, topics)]
    sys.stdout.write("\x1b[H\x1b[2J" + "\n".join(text) + "\n")
    sys.stdout.flush()
