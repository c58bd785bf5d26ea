"""The node's state machine: one explicit transition table, one ``trigger`` behind a lock.

States and events are enums; :data:`TRANSITIONS` maps ``(state, event)`` to the target
state and an optional guard name. FAULT and SHUTDOWN are reachable from every state
(:data:`FROM_ANY`). Anything not in the table is refused with the current state named.

Long-running activities (calibration, synchronization, key exchange) are asyncio tasks
*owned by a state*: they are started on entry by the handler registered with
:meth:`StateMachine.on_enter` and cancelled when the machine leaves that state, before
the next state's handler runs. Every transition is reported to the listeners (logging,
telemetry, systemd STATUS) with old state, new state, event and reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class State(StrEnum):
    OFFLINE = "OFFLINE"
    CONNECTING = "CONNECTING"
    IDLE = "IDLE"
    CALIBRATING = "CALIBRATING"
    SYNCHRONIZING = "SYNCHRONIZING"
    EXCHANGING = "EXCHANGING"
    PAUSED = "PAUSED"
    AWAITING_PASS = "AWAITING_PASS"  # a satellite link between passes: no light expected
    FAULT = "FAULT"
    SHUTDOWN = "SHUTDOWN"


class Event(StrEnum):
    START = "start"  # daemon starts: open instruments, reach the peer
    CONNECTED = "connected"  # instruments up and peer reachable
    CALIBRATE = "calibrate"  # operator or automatic: run the calibration sequence
    CALIBRATED = "calibrated"
    SYNC = "sync"  # acquire clock lock
    LOCKED = "locked"
    EXCHANGE = "exchange"  # start key exchange
    STOP = "stop"  # operator stops the current activity
    PEER_LOST = "peer_lost"
    PEER_BACK = "peer_back"
    LOCK_LOST = "lock_lost"
    QBER_HIGH = "qber_high"  # error rate above the warning threshold
    FAILED = "failed"  # a procedure failed (retry from IDLE)
    FAULT = "fault"  # alarm: fiber cut, blinding, instrument lost...
    RECOVER = "recover"  # fault cause gone: reconnect and start over
    SHUTDOWN = "shutdown"
    PASS_START = "pass_start"  # a predicted pass rises above the minimum elevation
    PASS_END = "pass_end"  # the pass set (or its block is closed): wait for the next one


@dataclass(frozen=True)
class Transition:
    target: State
    guard: str | None = None  # name of a guard callable registered on the machine


S, E = State, Event

#: The whole behaviour of the node. Guards are named and registered at runtime.
TRANSITIONS: dict[tuple[State, Event], Transition] = {
    (S.OFFLINE, E.START): Transition(S.CONNECTING),
    (S.CONNECTING, E.CONNECTED): Transition(S.IDLE),
    (S.IDLE, E.CALIBRATE): Transition(S.CALIBRATING, "peer_connected"),
    (S.IDLE, E.SYNC): Transition(S.SYNCHRONIZING, "peer_connected"),
    (S.IDLE, E.EXCHANGE): Transition(S.EXCHANGING, "synchronized"),
    (S.CALIBRATING, E.CALIBRATED): Transition(S.IDLE),
    (S.CALIBRATING, E.FAILED): Transition(S.IDLE),
    (S.CALIBRATING, E.STOP): Transition(S.IDLE),
    (S.CALIBRATING, E.PEER_LOST): Transition(S.PAUSED),
    (S.SYNCHRONIZING, E.LOCKED): Transition(S.IDLE),
    (S.SYNCHRONIZING, E.FAILED): Transition(S.IDLE),
    (S.SYNCHRONIZING, E.STOP): Transition(S.IDLE),
    (S.SYNCHRONIZING, E.PEER_LOST): Transition(S.PAUSED),
    (S.EXCHANGING, E.STOP): Transition(S.IDLE),
    (S.EXCHANGING, E.PEER_LOST): Transition(S.PAUSED),
    (S.EXCHANGING, E.LOCK_LOST): Transition(S.IDLE),
    (S.EXCHANGING, E.QBER_HIGH): Transition(S.CALIBRATING),
    (S.EXCHANGING, E.CALIBRATE): Transition(S.CALIBRATING),
    (S.EXCHANGING, E.FAILED): Transition(S.IDLE),
    (S.PAUSED, E.PEER_BACK): Transition(S.IDLE),
    (S.PAUSED, E.STOP): Transition(S.IDLE),
    (S.FAULT, E.RECOVER): Transition(S.CONNECTING),
    # Links that carry light only in pass windows ([passes]): outside a window the pair
    # waits, calibration kept; the receiver closes the pass's block before PASS_END.
    (S.IDLE, E.PASS_END): Transition(S.AWAITING_PASS),
    (S.CALIBRATING, E.PASS_END): Transition(S.AWAITING_PASS),
    (S.SYNCHRONIZING, E.PASS_END): Transition(S.AWAITING_PASS),
    (S.EXCHANGING, E.PASS_END): Transition(S.AWAITING_PASS),
    (S.AWAITING_PASS, E.PASS_START): Transition(S.IDLE),
    (S.AWAITING_PASS, E.PEER_LOST): Transition(S.PAUSED),
}

#: Events accepted in every state (except SHUTDOWN, which is final).
FROM_ANY: dict[Event, Transition] = {
    E.FAULT: Transition(S.FAULT),
    E.SHUTDOWN: Transition(S.SHUTDOWN),
}


def lookup(state: State, event: Event) -> Transition | None:
    """The transition for ``event`` in ``state``, or None when it is not allowed."""
    if state is S.SHUTDOWN:
        return None
    if event in FROM_ANY:
        if state is S.FAULT and event is E.FAULT:
            return None
        return FROM_ANY[event]
    return TRANSITIONS.get((state, event))


def allowed_events(state: State) -> list[Event]:
    return [e for e in Event if lookup(state, e) is not None]


class TransitionRefused(Exception):
    """An event not allowed in the current state, or whose guard failed."""

    def __init__(self, state: State, event: Event, reason: str) -> None:
        self.state = state
        self.event = event
        self.reason = reason
        super().__init__(f"{event.value!r} refused in state {state.value}: {reason}")


@dataclass(frozen=True)
class TransitionRecord:
    old: State
    new: State
    event: Event
    reason: str
    at_unix_s: float


#: seconds a transition waits for the leaving state's activities to end after cancelling them
CANCEL_TIMEOUT_S = 20.0

Guard = Callable[[], bool]
EnterHandler = Callable[["StateMachine", TransitionRecord], Awaitable[None]]
Listener = Callable[[TransitionRecord], None]


@dataclass
class StateMachine:
    """Owner of the current state and of the tasks that belong to it."""

    state: State = S.OFFLINE
    guards: dict[str, Guard] = field(default_factory=dict)
    history: list[TransitionRecord] = field(default_factory=list)
    _enter: dict[State, EnterHandler] = field(default_factory=dict)
    _listeners: list[Listener] = field(default_factory=list)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _changed: asyncio.Condition | None = None

    def on_enter(self, state: State, handler: EnterHandler) -> None:
        self._enter[state] = handler

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def can(self, event: Event) -> bool:
        return lookup(self.state, event) is not None

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` as a task owned by the current state (cancelled on exit)."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        task.set_name(f"{self.state.value}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def trigger(self, event: Event, reason: str = "") -> TransitionRecord:
        """Apply ``event``. Raises :class:`TransitionRefused` when not allowed.

        Safe to call from a task owned by the current state: that task is not cancelled
        by its own transition until it next awaits.
        """
        async with self._lock:
            tr = lookup(self.state, event)
            if tr is None:
                allowed = ", ".join(e.value for e in allowed_events(self.state)) or "none"
                raise TransitionRefused(
                    self.state, event, f"not allowed in {self.state.value} (allowed: {allowed})"
                )
            if tr.guard is not None:
                guard = self.guards.get(tr.guard)
                if guard is None or not guard():
                    raise TransitionRefused(self.state, event, f"guard {tr.guard!r} is false")
            record = TransitionRecord(self.state, tr.target, event, reason, time.time())
            await self._cancel_owned()
            self.state = tr.target
            self.history.append(record)
            if len(self.history) > 1000:
                del self.history[:500]
            log.info(
                "state_changed",
                old=record.old.value,
                new=record.new.value,
                trigger=event.value,
                reason=reason,
            )
            for listener in self._listeners:
                try:
                    listener(record)
                except Exception:
                    log.exception("state_listener_failed")
            handler = self._enter.get(record.new)
            if handler is not None:
                self.spawn(handler(self, record), f"enter-{record.new.value}")
            if self._changed is None:
                self._changed = asyncio.Condition()
            async with self._changed:
                self._changed.notify_all()
            return record

    async def _cancel_owned(self) -> None:
        current = asyncio.current_task()
        victims = [t for t in self._tasks if t is not current and not t.done()]
        for t in victims:
            t.cancel()
        if victims:
            # An activity that ignores its cancellation must not hold the machine (and every
            # later transition) forever: after the bound it is left behind, loudly.
            done, stuck = await asyncio.wait(victims, timeout=CANCEL_TIMEOUT_S)
            for t in done:
                if not t.cancelled():
                    t.exception()  # retrieved: the owner is gone
            for t in stuck:
                self._tasks.discard(t)
                log.error("activity_did_not_stop", task=t.get_name(), after_s=CANCEL_TIMEOUT_S)
        if current is not None and current in self._tasks:
            # The caller is an activity of the state being left: it ends itself after
            # this trigger returns; detach it so it is not cancelled twice.
            self._tasks.discard(current)

    async def wait_for(self, *states: State, timeout_s: float | None = None) -> State:
        """Wait until the machine is in one of ``states``."""
        if self._changed is None:
            self._changed = asyncio.Condition()
        cond = self._changed

        async def _wait() -> State:
            async with cond:
                await cond.wait_for(lambda: self.state in states)
                return self.state

        # asyncio.timeout, not asyncio.wait_for: on Python 3.11 wait_for swallows a
        # cancellation that arrives as the wait completes, and the caller (a supervisor
        # loop being stopped) would run on.
        async with asyncio.timeout(timeout_s):
            return await _wait()

    async def close(self) -> None:
        await self._cancel_owned()
