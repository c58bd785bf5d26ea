"""Run one demo: two daemons as subprocesses, driven over the bus like a real operator.

Flow: write both node configs, spawn ``python -m qkdnode run`` twice (logs to files in the
output directory), wait until both report IDLE, ``calibrate`` and wait, ``sync`` and wait
for ``synchronized``, ``start`` the exchange, poll both nodes' ``status`` for live progress
until ``duration_s`` has passed, ``stop``, compare ``keys.digest`` of both stores (a hash,
so no key leaves a node), SIGTERM both daemons and collect their exit codes.

The daemons are always terminated, on every exit path including Ctrl-C: first SIGTERM
(their safe shutdown), then SIGKILL if they do not exit in time.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import structlog

from drivers.simlink.params import LinkParams
from qkdnode.demo.compare import link_theory
from qkdnode.demo.config import DemoConfig
from qkdnode.demo.nodeconfig import CurveKeys, NodeFiles, write_node_configs
from qkdnode.demo.summary import DemoSummary, LinkStats, build_summary, merge_stats

log = structlog.get_logger(__name__)

TERMINATE_TIMEOUT_S = 20.0
POLL_S = 0.2
STATUS_POLL_TIMEOUT_S = 1.0


class DemoError(Exception):
    """A step of the demo failed; the message says which step and what was seen."""


@dataclass
class Reporter:
    """Where the runner reports: ``step`` for milestones, ``live`` for redrawn progress."""

    step: Callable[[str], None] = field(default=lambda _msg: None)
    live: Callable[[str], None] = field(default=lambda _line: None)
    end_live: Callable[[], None] = field(default=lambda: None)


class LiveTerminal(Reporter):
    """Milestones as lines and progress redrawn in place on a terminal stream."""

    def __init__(self, stream: IO[str], *, live_updates: bool = True) -> None:
        self._stream = stream
        self._live_shown = False
        super().__init__(step=self._step, live=self._live if live_updates else self._ignore)
        self.end_live = self._end

    def _ignore(self, _line: str) -> None:
        return None

    def _step(self, msg: str) -> None:
        self._end()
        print(msg, file=self._stream, flush=True)

    def _live(self, line: str) -> None:
        width = shutil.get_terminal_size((120, 24)).columns
        self._stream.write("\r\x1b[K" + line[: max(20, width - 1)])
        self._stream.flush()
        self._live_shown = True

    def _end(self) -> None:
        if self._live_shown:
            self._stream.write("\n")
            self._stream.flush()
            self._live_shown = False


class Daemon:
    """One node daemon subprocess with its log file and control client."""

    def __init__(self, files: NodeFiles, keys: CurveKeys | None, server_public: str | None):
        self.files = files
        self._keys = keys
        self._server_public = server_public
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._client: Any = None
        self.exit_code: int | None = None
        self._stop_sent = False

    @property
    def name(self) -> str:
        return self.files.node_id

    def spawn(self) -> None:
        self._log = self.files.log_path.open("wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qkdnode", "run", "--config", str(self.files.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C goes to the demo, which stops them in order
            preexec_fn=_stop_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
        )
        self.pid_path.write_text(f"{self.proc.pid}\n", "ascii")
        log.info("daemon_spawned", node=self.name, pid=self.proc.pid)

    @property
    def pid_path(self) -> Path:
        return self.files.log_path.with_suffix(".pid")

    def client(self) -> Any:
        if self._client is None:
            from qkdnode.client import Client

            if self._keys is not None:
                self._client = Client(
                    self.files.control_endpoint,
                    server_public_key=self._server_public,
                    client_keys=self._keys.client_secret_file,
                    timeout_s=5.0,
                )
            else:
                self._client = Client(self.files.control_endpoint, timeout_s=5.0)
        return self._client

    def call(self, command: str, timeout_s: float | None = None, **content: Any) -> dict[str, Any]:
        reply: dict[str, Any] = self.client().request(command, content, timeout_s)
        return reply

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            why = self.last_error()
            raise DemoError(
                f"{self.name} daemon exited with code {self.proc.returncode}"
                + (f": {why}" if why else "")
                + f" (see {self.files.log_path})"
            )

    def last_error(self) -> str:
        """The last error-level event of the daemon's JSON log ('' if none)."""
        for line in reversed(self.log_tail(40).splitlines()):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("level") in ("error", "critical"):
                return " ".join(str(rec[k]) for k in ("event", "error") if rec.get(k))
        return ""

    def close_client(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None

    def request_stop(self) -> None:
        """SIGTERM (the daemon makes its instruments safe and exits)."""
        self.close_client()
        # Once only: a second SIGTERM after the daemon's event loop has closed would meet
        # the default disposition and kill it in the middle of its safe shutdown.
        if self.proc is not None and self.proc.poll() is None and not self._stop_sent:
            self._stop_sent = True
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def terminate(self, timeout_s: float = TERMINATE_TIMEOUT_S) -> int | None:
        """SIGTERM, wait, then SIGKILL. Returns the exit code (negative: killed by signal)."""
        self.request_stop()
        proc = self.proc
        if proc is None:
            return None
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("daemon_kill", node=self.name, after_s=timeout_s)
            proc.kill()
            proc.wait()
        self.exit_code = proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.exit_code

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.files.log_path.read_text("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


def _stop_with_parent() -> None:
    """In the child: SIGTERM (a safe stop) when the demo dies, even by SIGKILL."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _state(status: dict[str, Any] | None) -> str:
    return str(status.get("state", "?")) if status else "?"


def _stats(status: dict[str, Any] | None) -> dict[str, Any]:
    stats = status.get("stats") if status else None
    return stats if isinstance(stats, dict) else {}


class DemoRunner:
    """One run of the demo for one :class:`DemoConfig`."""

    def __init__(self, cfg: DemoConfig, reporter: Reporter | None = None) -> None:
        self.cfg = cfg
        self.out_dir = cfg.demo.out_dir.resolve()
        self.report = reporter or Reporter()
        self.tx: Daemon | None = None
        self.rx: Daemon | None = None
        self.last: dict[str, dict[str, Any] | None] = {}
        #: (seconds into the exchange, committed detections) at each change seen by polling
        self.commits: list[tuple[float, int]] = []
        #: the receiver's blocks seen by polling: block id -> (seconds it took from its
        #: first message to its key, seconds of light it holds)
        self.block_times: dict[int, tuple[float, float]] = {}
        self.extended_s = 0.0

    # --- status helpers -------------------------------------------------------------------
    def _daemons(self) -> tuple[Daemon, Daemon]:
        assert self.tx is not None and self.rx is not None
        return self.tx, self.rx

    def _status_both(self, tolerate_timeout: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """Both nodes' ``status``; with ``tolerate_timeout`` a silent node gives ``{}``
        after a short wait (start-up, or a node busy in a long step)."""
        from qkdnode.client import BusTimeout

        out: list[dict[str, Any]] = []
        for d in self._daemons():
            d.check_alive()
            try:
                st = d.call("status", timeout_s=STATUS_POLL_TIMEOUT_S if tolerate_timeout else None)
            except BusTimeout:
                if not tolerate_timeout:
                    raise DemoError(f"{d.name} does not answer 'status'") from None
                st = {}
            self.last[d.name] = st
            out.append(st)
        return out[0], out[1]

    def _wait(
        self,
        what: str,
        done: Callable[[dict[str, Any], dict[str, Any]], bool],
        timeout_s: float,
        *,
        tolerate_timeout: bool = False,
    ) -> None:
        deadline = time.monotonic() + timeout_s
        tx = self._daemons()[0]
        failures0 = _stats(self.last.get(tx.name, {})).get("failures", 0)
        while True:
            st_tx, st_rx = self._status_both(tolerate_timeout)
            if st_tx and st_rx and done(st_tx, st_rx):
                return
            if _stats(st_tx).get("failures", 0) > failures0:
                reason = _stats(st_tx).get("last_failure", "")
                raise DemoError(f"{what} failed: {reason} (see {tx.files.log_path})")
            for d, st in zip(self._daemons(), (st_tx, st_rx), strict=True):
                if _state(st) == "FAULT":
                    raise DemoError(f"{what}: {d.name} entered FAULT (see {d.files.log_path})")
            if time.monotonic() > deadline:
                raise DemoError(
                    f"{what}: not done after {timeout_s:g} s "
                    f"(alice {_state(st_tx)}, bob {_state(st_rx)})"
                )
            time.sleep(POLL_S)

    # --- the steps --------------------------------------------------------------------------
    def _prepare(self) -> tuple[NodeFiles, NodeFiles, CurveKeys | None]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.cfg.model_copy(
            update={"demo": self.cfg.demo.model_copy(update={"out_dir": self.out_dir})}
        )
        tx_files, rx_files, keys = write_node_configs(cfg, self.out_dir)
        for files in (tx_files, rx_files):
            state = files.config.node.state_dir
            if state.exists():  # a fresh key store per run: old keys would spoil the digest
                shutil.rmtree(state)
        return tx_files, rx_files, keys

    def _exchange(self) -> tuple[float, LinkStats]:
        """Start, show progress for ``duration_s``, stop. Returns (wall time, stats)."""
        tx, _rx = self._daemons()
        duration = self.cfg.demo.duration_s
        tx.call("start", timeout_s=self.cfg.demo.step_timeout_s)
        t0 = time.monotonic()
        self.report.step(f"exchanging keys for {duration:g} s")
        interval = self.cfg.demo.progress_interval_s
        stats = LinkStats()
        while True:
            elapsed = time.monotonic() - t0
            if elapsed >= duration:
                break
            st_tx, st_rx = self._status_both(tolerate_timeout=True)
            if st_tx or st_rx:
                stats = merge_stats(_stats(st_tx), _stats(st_rx))
                if stats.detections > (self.commits[-1][1] if self.commits else 0):
                    self.commits.append((time.monotonic() - t0, stats.detections))
                self._note_block(_stats(st_rx).get("last_block"))
            self.report.live(_live_line(elapsed, duration, st_tx, st_rx, stats))
            for d, st in zip(self._daemons(), (st_tx, st_rx), strict=True):
                if _state(st) == "FAULT":
                    raise DemoError(f"exchange: {d.name} entered FAULT (see {d.files.log_path})")
            time.sleep(min(interval, max(0.0, duration - elapsed)))
        stats = self._finish_open_block(t0, stats)
        from qkdnode.client import RemoteError

        try:
            tx.call("stop", timeout_s=self.cfg.demo.step_timeout_s)
        except RemoteError as exc:  # e.g. the exchange already ended by itself
            log.info("stop_refused", code=exc.code, message=exc.message)
        wall = time.monotonic() - t0
        self.report.end_live()
        self._wait(
            "stop",
            lambda a, b: (
                _state(a) not in ("EXCHANGING", "CALIBRATING", "SYNCHRONIZING")
                and _state(b) not in ("EXCHANGING", "CALIBRATING", "SYNCHRONIZING")
            ),
            self.cfg.demo.step_timeout_s,
            tolerate_timeout=True,
        )
        st_tx, st_rx = self._status_both(tolerate_timeout=False)
        return wall, merge_stats(_stats(st_tx), _stats(st_rx))

    def _note_block(self, block: Any) -> None:
        """Record the receiver's last block (its stage seconds, the light it holds)."""
        if not isinstance(block, dict) or not isinstance(block.get("block_id"), int):
            return
        seconds, pulses = block.get("seconds"), block.get("pulses")
        if not isinstance(seconds, dict) or not isinstance(pulses, int) or pulses <= 0:
            return
        busy = sum(float(v) for v in seconds.values() if isinstance(v, int | float))
        light = pulses / self.cfg.link.source.slot_rate_hz
        self.block_times[int(block["block_id"])] = (busy, light)

    def _finish_open_block(self, t0: float, stats: LinkStats) -> LinkStats:
        """After ``duration_s``: let the block the receiver is filling finish, so that the
        run's light is not thrown away with it. Blocks are sized by what the finite-key
        bound needs, not by the run length, so a run may end a little later than asked;
        ``extended_s`` in the summary says by how much. Bounded: at most the time the
        remaining detections need at the rate seen so far plus ``step_timeout_s``."""
        st_tx, st_rx = self._status_both(tolerate_timeout=True)
        if _state(st_tx) != "EXCHANGING" or _state(st_rx) != "EXCHANGING":
            return stats
        rx = _stats(st_rx)
        target = int(rx.get("block_detections") or 0)
        pending = int(rx.get("detections_read") or 0) - int(rx.get("detections") or 0)
        if target <= 0 or pending <= 0:
            return stats
        elapsed = time.monotonic() - t0
        rate = max(1.0, int(rx.get("detections_read") or 0) / max(elapsed, 1e-3))
        limit = max(0, target - pending) / rate + self.cfg.demo.step_timeout_s
        done0 = stats.blocks_ok + stats.blocks_aborted
        self.report.step(
            f"finishing the open block ({pending:,} of {target:,} detections; "
            f"at most {limit:.0f} s more)"
        )
        started = time.monotonic()
        while time.monotonic() - started < limit:
            st_tx, st_rx = self._status_both(tolerate_timeout=True)
            if st_tx:
                stats = merge_stats(_stats(st_tx), _stats(st_rx))
                self._note_block(_stats(st_rx).get("last_block"))
                if stats.blocks_ok + stats.blocks_aborted > done0:
                    self.commits.append((time.monotonic() - t0, stats.detections))
                    break
            for d, st in zip(self._daemons(), (st_tx, st_rx), strict=True):
                if _state(st) == "FAULT":
                    raise DemoError(f"exchange: {d.name} entered FAULT (see {d.files.log_path})")
            elapsed = time.monotonic() - t0
            self.report.live(_live_line(elapsed, elapsed, st_tx, st_rx, stats))
            time.sleep(self.cfg.demo.progress_interval_s)
        self.extended_s = time.monotonic() - t0 - self.cfg.demo.duration_s
        return stats

    def _drive(self) -> tuple[float, LinkStats, dict[str, dict[str, Any]]]:
        tx, rx = self._daemons()
        timeout = self.cfg.demo.step_timeout_s
        self.report.step("waiting for both nodes to reach IDLE")
        self._wait(
            "start-up",
            lambda a, b: _state(a) == "IDLE" and _state(b) == "IDLE",
            self.cfg.demo.startup_timeout_s,
            tolerate_timeout=True,
        )
        self.report.step("calibrating")
        tx.call("calibrate", timeout_s=timeout)
        self._wait(
            "calibrate",
            lambda a, b: (
                _state(a) == "IDLE" and _state(b) == "IDLE" and _stats(a).get("calibrated") is True
            ),
            timeout,
        )
        self.report.step("synchronizing")
        tx.call("sync", timeout_s=timeout)
        self._wait(
            "sync",
            lambda a, b: (
                _state(a) == "IDLE"
                and _state(b) == "IDLE"
                and _stats(a).get("synchronized") is True
            ),
            timeout,
        )
        wall, stats = self._exchange()
        # The stores are compared as a consumer would use them: once the key-ID sync has
        # settled any block whose commit was not confirmed (until then neither node
        # serves a key). A pair that never gets there is compared anyway, and differs.
        self.report.step("waiting for the key-ID sync")
        try:
            self._wait(
                "key-ID sync",
                lambda a, b: (
                    a.get("delivery_in_step") is True and b.get("delivery_in_step") is True
                ),
                timeout,
            )
        except DemoError as exc:
            self.report.step(f"comparing the stores anyway: {exc}")
        digests = {d.name: d.call("keys.digest", timeout_s=timeout) for d in (tx, rx)}
        return wall, stats, digests

    def _link_as_run(self) -> LinkParams:
        """The simulated link with the settings the transmitter had in force at the end
        (its status ``settings``: the optimiser's, once a calibration applied them), so
        that theory describes the protocol that ran."""
        link = self.cfg.link
        used = (self.last.get("alice") or {}).get("settings")
        if not isinstance(used, dict):
            return link
        update = {
            k: float(v)
            for k, v in used.items()
            if k in ("mu_signal", "mu_decoy", "p_signal", "p_decoy", "p_basis_z")
            and isinstance(v, int | float)
        }
        return link.model_copy(update={"source": link.source.model_copy(update=update)})

    def run(self) -> DemoSummary:
        """Run the demo and return its summary (failures are in ``summary.failure``).

        KeyboardInterrupt propagates after both daemons have been stopped.
        """
        cfg = self.cfg
        tx_files, rx_files, keys = self._prepare()
        self.tx = Daemon(tx_files, keys, keys.tx_public if keys else None)
        self.rx = Daemon(rx_files, keys, keys.rx_public if keys else None)
        failure: str | None = None
        wall, stats = 0.0, LinkStats()
        digests: dict[str, dict[str, Any]] = {}
        exit_codes: dict[str, int | None] = {}
        try:
            self.report.step(
                f"starting alice (transmitter) and bob (receiver), "
                f"{cfg.link.fiber.length_km:g} km, logs in {self.out_dir}"
            )
            self.tx.spawn()
            self.rx.spawn()
            wall, stats, digests = self._drive()
        except DemoError as exc:
            failure = str(exc)
            stats = merge_stats(_stats(self.last.get("alice")), _stats(self.last.get("bob")))
        except Exception as exc:  # bus errors, refused commands: reported, daemons stopped
            failure = f"{type(exc).__name__}: {exc}"
            stats = merge_stats(_stats(self.last.get("alice")), _stats(self.last.get("bob")))
        finally:
            self.report.end_live()
            for d in (self.tx, self.rx):  # both stop at once, then each is waited for
                d.request_stop()
            for d in (self.tx, self.rx):
                exit_codes[d.name] = d.terminate()
        if failure is not None:
            self.report.step(f"failed: {failure}")
        theory = link_theory(self._link_as_run(), cfg.protocol)
        eve = cfg.link.eve
        return build_summary(
            stats=stats,
            distance_km=cfg.link.fiber.length_km,
            exchange_wall_s=wall,
            requested_duration_s=cfg.demo.duration_s,
            digests=digests,
            theory=theory,
            eve=f"{eve.mode}:{eve.fraction:g}" if eve.mode != "none" and eve.fraction > 0 else None,
            seed=cfg.demo.seed,
            security=cfg.demo.security,
            exit_codes=exit_codes,
            out_dir=str(self.out_dir),
            failure=failure,
            steady_detection_rate_hz=steady_rate(self.commits),
            extended_s=self.extended_s,
            block_busy_fractions=[
                busy / light for _, (busy, light) in sorted(self.block_times.items())
            ],
        )


def steady_rate(commits: list[tuple[float, int]]) -> float | None:
    """Detections per second committed between the first and the last block commit seen
    (None before two commits): what the pipeline sustains once running, without the
    start-up and the first block's accumulation. Polling blurs each time by at most
    ``progress_interval_s``."""
    if len(commits) < 2 or commits[-1][0] <= commits[0][0]:
        return None
    (t0, d0), (t1, d1) = commits[0], commits[-1]
    return (d1 - d0) / (t1 - t0)


def _live_line(
    elapsed: float,
    duration: float,
    st_tx: dict[str, Any],
    st_rx: dict[str, Any],
    stats: LinkStats,
) -> str:
    from qkdnode.demo.summary import progress_line

    return progress_line(elapsed, duration, _state(st_tx), _state(st_rx), stats)


def run_demo(cfg: DemoConfig, reporter: Reporter | None = None) -> DemoSummary:
    """Run one demo with SIGTERM and SIGINT raising KeyboardInterrupt (so cleanup runs).

    SIGINT is set explicitly: a process started with SIGINT ignored (inherited from a
    parent, e.g. a CI runner or nohup) would otherwise not stop on Ctrl-C."""
    main_thread = _in_main_thread()

    def _on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {}
    if main_thread:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, _on_signal)
    try:
        return DemoRunner(cfg, reporter).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def write_result(summary: DemoSummary, out_dir: Path) -> Path:
    path = out_dir / "summary.json"
    path.write_text(summary.to_json_line() + "\n", "utf-8")
    return path
