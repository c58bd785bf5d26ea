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
import contextvars
import io
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

import structlog

from drivers.interfaces import SimulatedBackend
from drivers.simulation import open_backend
from qkdnode.config import NodeConfig
from qkdnode.hardware import InstrumentSet
from qkdnode.log import bind_context
from qkdnode.paths import private_dir
from qkdnode.paths import state_dir as resolve_state_dir
from qkdnode.sdnotify import SystemdNotifier, run_watchdog

log = structlog.get_logger(__name__)

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILURE = 1


#: After the safe shutdown, how long worker threads (instrument calls, computations) may
#: take to finish before the process exits without them (seconds).
WORKER_EXIT_GRACE_S = 10.0


def run_daemon(daemon: DaemonBase | Daemon) -> int:
    """Run ``daemon`` (a node runtime's link, or a :class:`Daemon` of several) until it is
    told to stop. Returns the process exit code.

    The event loop's worker threads get :data:`WORKER_EXIT_GRACE_S` to finish once the
    safe shutdown is done; a thread still blocked then (an instrument call that never
    returns, a wait on a peer that is gone) is logged with its stack
    (``worker_threads_stuck``) and the process exits without it, so a stop never hangs.
    The hardware is already safe at that point: the safe state does not wait for them.
    """
    workers = ThreadPoolExecutor(thread_name_prefix="qkdnode-worker")
    loop = asyncio.new_event_loop()
    loop.set_default_executor(workers)
    try:
        code = loop.run_until_complete(daemon.main())
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        code = EXIT_FAILURE
    finally:
        _cancel_leftovers(loop)
        loop.close()
    workers.shutdown(wait=False, cancel_futures=True)
    stuck = _join_workers(WORKER_EXIT_GRACE_S)
    if stuck:
        log.error(
            "worker_threads_stuck",
            seconds=WORKER_EXIT_GRACE_S,
            threads=stuck,
            note="the process exits without them; the hardware was made safe before",
        )
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    return code


#: How long one step of the shutdown (cancelled tasks ending, a service closing) may take
#: before the shutdown goes on without it (seconds).
STOP_STEP_TIMEOUT_S = 10.0


async def settle_cancelled(tasks: list[asyncio.Task[Any]], timeout_s: float, what: str) -> None:
    """Wait up to ``timeout_s`` for cancelled ``tasks`` to end; the ones that do not are
    logged with their stacks (``tasks_stuck``) and left behind. Never raises."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: a failure at shutdown is not news
    if pending:
        stacks = {}
        for task in pending:
            out = io.StringIO()
            task.print_stack(limit=8, file=out)
            stacks[task.get_name()] = out.getvalue()[-1500:]
        log.error("tasks_stuck", what=what, seconds=timeout_s, tasks=stacks)


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel tasks still pending after ``main`` (as :func:`asyncio.run` does)."""
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        with contextlib.suppress(Exception):
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    with contextlib.suppress(Exception):
        loop.run_until_complete(loop.shutdown_asyncgens())


def _join_workers(grace_s: float) -> dict[str, str]:
    """Wait up to ``grace_s`` for the non-daemon threads; the ones still alive, by name,
    with the innermost frames of their stacks."""
    deadline = time.monotonic() + grace_s
    main = threading.main_thread()
    for t in threading.enumerate():
        if t is not main and not t.daemon:
            t.join(max(0.0, deadline - time.monotonic()))
    frames = sys._current_frames()
    stuck: dict[str, str] = {}
    for t in threading.enumerate():
        if t is main or t.daemon or not t.is_alive() or t.ident is None:
            continue
        frame = frames.get(t.ident)
        where = traceback.format_stack(frame)[-4:] if frame is not None else []
        stuck[t.name] = "".join(where).strip()
    return stuck


class ProcessControl:
    """What the links of one daemon process share: the systemd notifier and the request
    to stop (a signal, a fatal error)."""

    def __init__(self) -> None:
        self.notifier = SystemdNotifier()
        self.stop_requested = asyncio.Event()
        self.stop_reason = ""

    def request_stop(self, reason: str) -> None:
        if not self.stop_requested.is_set():
            self.stop_reason = reason
            log.info("stop_requested", reason=reason)
            self.stop_requested.set()


def warm_up_kernels() -> None:
    """Compile (or load from numba's disk cache) the post-processing kernels, so no compile
    runs in the middle of a session."""
    from qkdnode import jit
    from qkdnode.postproc import cascade
    from qkdnode.procedures import track_kernel

    t0 = time.monotonic()
    if jit.BACKEND == "numba":
        log.info(
            "kernels_loading",
            kernels=jit.BACKEND,
            note="compiled on the first start after an install (about a minute), "
            "loaded from numba's cache afterwards",
        )
    elif jit.BACKEND == "native":
        log.info("kernels_loading", kernels=jit.BACKEND, reason=jit.WHY_NOT)
    else:
        log.warning("kernels_numpy_twins", kernels=jit.BACKEND, reason=jit.WHY_NOT)
    cascade.warm_up()
    track_kernel.warm_up()
    log.info("kernels_ready", kernels=jit.BACKEND, seconds=round(time.monotonic() - t0, 2))


class DaemonBase:
    """One link of the daemon: its instruments, its side of a simulated link, and the
    hooks the node runtime fills (services, activities, health). :class:`Daemon` runs one
    or several of them in one process.

    ``link_id``: the link's name in a node with several links ("" for a one-link node);
    it names the link's simulated world too.
    """

    def __init__(
        self,
        cfg: NodeConfig,
        config_path: str,
        process: ProcessControl | None = None,
        link_id: str = "",
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.link_id = link_id
        self.process = process if process is not None else ProcessControl()
        self.state_dir: Path = resolve_state_dir(cfg.node.state_dir)
        self.hardware = InstrumentSet(dict(cfg.instruments))
        sim = cfg.simulation
        #: this node's side of the simulated link, when the config asks for one
        self.backend: SimulatedBackend | None = None
        if sim is not None and sim.enabled:
            self.backend = open_backend(cfg.node.role, sim.side(), sim.fiber_endpoint, link_id)

    @property
    def notifier(self) -> SystemdNotifier:
        return self.process.notifier

    @property
    def stop_reason(self) -> str:
        return self.process.stop_reason

    @property
    def stop_requested(self) -> asyncio.Event:
        return self.process.stop_requested

    def request_stop(self, reason: str) -> None:
        self.process.request_stop(reason)

    # --- hooks for the node runtime -------------------------------------------------
    async def start_services(self) -> None:
        """Bind sockets and start background tasks (overridden by the node runtime)."""

    async def stop_services(self) -> None:
        """Stop what :meth:`start_services` started; must not raise."""

    async def cancel_activities(self) -> None:
        """Cancel the current state's tasks before the hardware is made safe."""

    def healthy(self) -> bool:
        return True

    def reload(self) -> None:
        """SIGHUP: re-read what can change without a restart (the delivery CRL). Failures
        are logged and the previous state kept; the daemon never dies of a reload."""
        log.info("reload_requested")

    # --- this link's part of the daemon's life cycle ------------------------------------
    def _warm_up_backend(self) -> None:
        if self.backend is None:
            return
        t1 = time.monotonic()
        log.info("simulated_link_warming_up")
        self.backend.warm_up()  # this side's kernels (a receiver uses a made-up batch)
        log.info("simulated_link_ready", seconds=round(time.monotonic() - t1, 2))

    def _warm_up(self) -> None:
        """The kernels and, with simulated hardware, this side of the link model."""
        warm_up_kernels()
        self._warm_up_backend()

    def _start_backend(self) -> None:
        if self.backend is not None:
            # this node's side only: a receiver process holds nothing of the transmitter
            self.backend.start()

    def _stop_backend(self) -> None:
        if self.backend is not None:
            self.backend.stop()

    async def start_link(self) -> None:
        """Simulated world, instruments (in worker threads), services. Raises on failure
        (the caller makes the link safe)."""
        await asyncio.to_thread(self._start_backend)
        log.info("instruments_opening", instruments=sorted(self.hardware.up))
        await asyncio.to_thread(self.hardware.open_all)
        log.info("services_starting")
        await self.start_services()

    async def make_link_safe(self) -> bool:
        """Cancel the activities, then the safe state on every instrument (read back and
        logged). True when every instrument reads back safe."""
        with contextlib.suppress(Exception):
            await self.cancel_activities()
        report = await asyncio.to_thread(self.hardware.make_safe)
        if not all(r.get("safe") for r in report.values()):
            log.error("unsafe_at_exit", report=report)
            return False
        return True

    async def close_link(self) -> None:
        """Services, instruments, simulated world. Never raises."""
        with contextlib.suppress(Exception):
            await self.stop_services()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.hardware.close_all)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self._stop_backend)

    async def main(self) -> int:
        """This link alone as a daemon process (see :class:`Daemon`)."""
        return await Daemon([self], self.cfg.node.id, self.process).main()


class SiteService(Protocol):
    """A service of the whole site over its running links (the key manager)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Daemon:
    """The daemon process: signals, systemd notification and the safe shutdown, around
    one or several links (:class:`DaemonBase`).

    Links are started one after the other. With several links, one that fails to start
    is logged (``link_failed``), made safe and closed, and the others run: a fault on one
    link never stops another (the process fails only when no link starts). Each link's
    log lines carry its name (``link``) and its role; a one-link node logs as before.
    """

    def __init__(
        self,
        links: Sequence[DaemonBase],
        node_id: str,
        process: ProcessControl | None = None,
        services: Sequence[SiteService] = (),
    ) -> None:
        if not links:
            raise ValueError("a daemon runs at least one link")
        self.links = list(links)
        #: site services over the running links (the key manager): started after the
        #: links, stopped before them
        self.services = list(services)
        self.node_id = node_id
        self.process = process if process is not None else links[0].process
        for link in links:
            link.process = self.process
        self.multi = any(link.link_id for link in links)
        #: the links that started (made safe and closed at the end)
        self.running: list[DaemonBase] = []
        self._contexts: dict[int, contextvars.Context] = {}

    def _context(self, link: DaemonBase) -> contextvars.Context:
        ctx = self._contexts.get(id(link))
        if ctx is None:
            ctx = contextvars.copy_context()
            if self.multi:
                ctx.run(bind_context, link=link.link_id, role=link.cfg.node.role)
            self._contexts[id(link)] = ctx
        return ctx

    async def _in(self, link: DaemonBase, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` in ``link``'s logging context (tasks it starts inherit it)."""
        return await asyncio.create_task(coro, context=self._context(link))

    def _warm_up(self) -> None:
        warm_up_kernels()
        for link in self.links:
            self._context(link).run(link._warm_up_backend)

    def _reload(self) -> None:
        for link in self.links:
            self._context(link).run(link.reload)

    async def main(self) -> int:
        if self.multi:
            bind_context(node_id=self.node_id)
        else:
            bind_context(node_id=self.node_id, role=self.links[0].cfg.node.role)
        for link in self.links:
            self._context(link)  # each link's logging context, from the node's
        process = self.process
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, process.request_stop, signal.Signals(sig).name)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        code = EXIT_OK
        watchdog: asyncio.Task[None] | None = None
        running = self.running
        started: list[SiteService] = []
        try:
            for link in self.links:
                private_dir(link.state_dir)
            log.info(
                "daemon_starting",
                config=self.links[0].config_path,
                state_dir=str(self.links[0].state_dir),
                **({"links": [link.link_id for link in self.links]} if self.multi else {}),
            )
            if not await self._unless_stopped(self._warm_up, "numba-warm-up"):
                return code
            for link in self.links:
                running.append(link)  # made safe and closed whatever happens next
                if not self.multi:
                    await link.start_link()
                    continue
                try:
                    await self._in(link, link.start_link())
                except Exception as exc:
                    self._context(link).run(
                        log.exception, "link_failed", error=f"{type(exc).__name__}: {exc}"
                    )
                    running.remove(link)
                    await self._in(link, self._stop_link(link))
                if process.stop_requested.is_set():
                    break
            if not running:
                raise RuntimeError("no link started")
            for service in self.services:
                await service.start()
                started.append(service)
            process.notifier.ready(status="ready")
            log.info("daemon_ready")

            watchdog = asyncio.create_task(run_watchdog(process.notifier, healthy=self.healthy))
            await process.stop_requested.wait()
        except Exception as exc:
            log.exception("daemon_failed", error=str(exc))
            code = EXIT_FAILURE
        finally:
            process.notifier.stopping(status=f"stopping: {process.stop_reason or 'failure'}")
            if watchdog is not None:
                watchdog.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watchdog
            for service in reversed(started):
                try:
                    async with asyncio.timeout(STOP_STEP_TIMEOUT_S):
                        await service.stop()
                except Exception as exc:
                    log.error("service_stop_failed", error=f"{type(exc).__name__}: {exc}")
            for link in running:
                if not await self._in(link, self._stop_link(link)):
                    code = EXIT_FAILURE
            process.notifier.close()
            log.info("daemon_stopped", exit_code=code)
        return code

    def healthy(self) -> bool:
        """What feeds the systemd watchdog: some running link is healthy. A restart would
        stop that link's key for the sake of another's (whose peer is down, say); with
        every link unhealthy a restart may help (a one-link node: its link's health)."""
        return any(link.healthy() for link in self.running)

    @staticmethod
    async def _stop_link(link: DaemonBase) -> bool:
        """Safe state, then close; True when the hardware read back safe."""
        safe = await link.make_link_safe()
        await link.close_link()
        return safe

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
        stop: asyncio.Future[Any] = asyncio.ensure_future(self.process.stop_requested.wait())
        waiters: list[asyncio.Future[Any]] = [done, stop]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if done.done():
            done.result()
            return True
        log.info("startup_abandoned", step=what, reason=self.process.stop_reason)
        return False
