"""The daemon's life cycle: start, run until a signal, shut down safely.

Order at start: state directory, simulated world (if configured), instruments (in worker
threads), bus sockets, then ``READY=1``. Order at stop (SIGTERM, SIGINT, a fatal error):
``STOPPING=1``, cancel the state's activities, safe state on every instrument (read back
and logged), close sockets, close instruments. The safe state runs on every exit path,
including a failure during start-up. A stop request during the simulated link's first
numba compile (tens of seconds on a cold cache, before any instrument is opened) is
honoured at once: the compile is abandoned in its daemon thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from qkdnode.config import NodeConfig
from qkdnode.hardware import InstrumentSet
from qkdnode.log import bind_context
from qkdnode.paths import private_dir
from qkdnode.paths import state_dir as resolve_state_dir
from qkdnode.sdnotify import SystemdNotifier, run_watchdog

log = structlog.get_logger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1


def run_daemon(cfg: NodeConfig, config_path: str) -> int:
    """Run the node until it is told to stop. Returns the process exit code."""
    from qkdnode.node import Node

    node = Node(cfg, config_path)
    try:
        return asyncio.run(node.main())
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return EXIT_FAILURE


class DaemonBase:
    """Signals, systemd notification, instruments and the safe shutdown."""

    def __init__(self, cfg: NodeConfig, config_path: str) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.state_dir: Path = resolve_state_dir(cfg.node.state_dir)
        self.notifier = SystemdNotifier()
        self.hardware = InstrumentSet(dict(cfg.instruments))
        self.stop_requested = asyncio.Event()
        self.stop_reason = ""
        self._world_started = False

    # --- hooks for the node runtime -------------------------------------------------
    async def start_services(self) -> None:
        """Bind sockets and start background tasks (overridden by the node runtime)."""

    async def stop_services(self) -> None:
        """Stop what :meth:`start_services` started; must not raise."""

    async def cancel_activities(self) -> None:
        """Cancel the current state's tasks before the hardware is made safe."""

    def healthy(self) -> bool:
        return True

    # --- life cycle -------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        if not self.stop_requested.is_set():
            self.stop_reason = reason
            log.info("stop_requested", reason=reason)
            self.stop_requested.set()

    def _start_world(self) -> None:
        sim = self.cfg.simulation
        if sim is None or not sim.enabled:
            return
        from drivers.simlink.world import start_world

        # this node's side only: a receiver process holds nothing of the transmitter
        start_world(self.cfg.node.role, sim.side(), sim.fiber_endpoint)
        self._world_started = True

    def _warm_up(self) -> None:
        """Compile (or load from numba's disk cache) the post-processing kernels and, with
        simulated hardware, the link model, so no compile runs in the middle of a session."""
        from qkdnode import jit
        from qkdnode.postproc import cascade
        from qkdnode.procedures import track_kernel

        t0 = time.monotonic()
        if jit.JIT:
            log.info(
                "kernels_loading",
                jit=True,
                note="compiled on the first start after an install (about a minute), "
                "loaded from numba's cache afterwards",
            )
        else:
            log.warning("kernels_numpy_twins", jit=False, reason=jit.WHY_NOT)
        cascade.warm_up()
        track_kernel.warm_up()
        log.info("kernels_ready", seconds=round(time.monotonic() - t0, 2))
        sim = self.cfg.simulation
        if sim is None or not sim.enabled:
            return
        from drivers.simlink.world import warm_up

        t1 = time.monotonic()
        log.info("simulated_link_warming_up")
        warm_up(sim.side())  # this side's kernels (a receiver uses a made-up photon batch)
        log.info("simulated_link_ready", seconds=round(time.monotonic() - t1, 2))

    async def _unless_stopped(self, fn: Callable[[], None], what: str) -> bool:
        """Run ``fn`` in a daemon thread until it returns (True) or a stop is requested
        (False; ``fn`` is abandoned and dies with the process). Only for steps that
        touch no hardware. Exceptions of ``fn`` propagate."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def settle(exc: BaseException | None) -> None:
            if done.done():
                return
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(exc)

        def work() -> None:
            exc: BaseException | None = None
            try:
                fn()
            except BaseException as e:  # handed to the event loop
                exc = e
            with contextlib.suppress(RuntimeError):  # the loop may be closed by now
                loop.call_soon_threadsafe(settle, exc)

        threading.Thread(target=work, name=what, daemon=True).start()
        stop: asyncio.Future[Any] = asyncio.ensure_future(self.stop_requested.wait())
        waiters: list[asyncio.Future[Any]] = [done, stop]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if done.done():
            done.result()
            return True
        log.info("startup_abandoned", step=what, reason=self.stop_reason)
        return False

    def reload(self) -> None:
        """SIGHUP: re-read what can change without a restart (the delivery CRL). Failures
        are logged and the previous state kept; the daemon never dies of a reload."""
        log.info("reload_requested")

    def _stop_world(self) -> None:
        if self._world_started:
            from drivers.simlink.world import stop_world

            stop_world()
            self._world_started = False

    async def main(self) -> int:
        bind_context(node_id=self.cfg.node.id, role=self.cfg.node.role)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, signal.Signals(sig).name)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        code = EXIT_OK
        watchdog: asyncio.Task[None] | None = None
        try:
            private_dir(self.state_dir)
            log.info("daemon_starting", config=self.config_path, state_dir=str(self.state_dir))
            if not await self._unless_stopped(self._warm_up, "numba-warm-up"):
                return code
            await asyncio.to_thread(self._start_world)
            log.info("instruments_opening", instruments=sorted(self.hardware.up))
            await asyncio.to_thread(self.hardware.open_all)
            log.info("services_starting")
            await self.start_services()
            self.notifier.ready(status="ready")
            log.info("daemon_ready")
            watchdog = asyncio.create_task(run_watchdog(self.notifier, healthy=self.healthy))
            await self.stop_requested.wait()
        except Exception as exc:
            log.exception("daemon_failed", error=str(exc))
            code = EXIT_FAILURE
        finally:
            self.notifier.stopping(status=f"stopping: {self.stop_reason or 'failure'}")
            if watchdog is not None:
                watchdog.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watchdog
            with contextlib.suppress(Exception):
                await self.cancel_activities()
            report = await asyncio.to_thread(self.hardware.make_safe)
            if not all(r.get("safe") for r in report.values()):
                log.error("unsafe_at_exit", report=report)
                code = EXIT_FAILURE
            with contextlib.suppress(Exception):
                await self.stop_services()
            await asyncio.to_thread(self.hardware.close_all)
            await asyncio.to_thread(self._stop_world)
            self.notifier.close()
            log.info("daemon_stopped", exit_code=code)
        return code
