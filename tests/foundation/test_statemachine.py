"""Table-driven tests: every allowed and every forbidden (state, event) pair."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from qkdnode.statemachine import (
    FROM_ANY,
    TRANSITIONS,
    Event,
    State,
    StateMachine,
    TransitionRefused,
    lookup,
)

ALL_PAIRS = list(itertools.product(State, Event))


def _machine_in(state: State) -> StateMachine:
    sm = StateMachine(state=state)
    sm.guards = {"peer_connected": lambda: True, "synchronized": lambda: True}
    return sm


@pytest.mark.parametrize(("state", "event"), ALL_PAIRS, ids=str)
def test_every_pair(state: State, event: Event) -> None:
    expected = lookup(state, event)

    async def go() -> None:
        sm = _machine_in(state)
        if expected is None:
            with pytest.raises(TransitionRefused) as info:
                await sm.trigger(event)
            assert state.value in str(info.value)
            assert sm.state is state
        else:
            rec = await sm.trigger(event, reason="test")
            assert sm.state is expected.target
            assert (rec.old, rec.new, rec.event) == (state, expected.target, event)

    asyncio.run(go())


def test_fault_and_shutdown_reachable_from_every_live_state() -> None:
    for state in State:
        if state is State.SHUTDOWN:
            assert lookup(state, Event.FAULT) is None
            continue
        assert lookup(state, Event.SHUTDOWN) == FROM_ANY[Event.SHUTDOWN]
        if state is not State.FAULT:
            assert lookup(state, Event.FAULT) == FROM_ANY[Event.FAULT]


def test_table_only_names_known_states() -> None:
    for (src, ev), tr in TRANSITIONS.items():
        assert isinstance(src, State) and isinstance(ev, Event) and isinstance(tr.target, State)


def test_guard_false_refuses_with_guard_named() -> None:
    async def go() -> None:
        sm = StateMachine(state=State.IDLE)
        sm.guards = {"synchronized": lambda: False}
        with pytest.raises(TransitionRefused, match="synchronized"):
            await sm.trigger(Event.EXCHANGE)
        assert sm.state is State.IDLE

    asyncio.run(go())


def test_leaving_a_state_cancels_its_tasks_and_runs_enter_handler() -> None:
    async def go() -> None:
        sm = _machine_in(State.IDLE)
        cancelled = asyncio.Event()
        entered: list[State] = []

        async def exchanging(machine: StateMachine, rec: object) -> None:
            entered.append(machine.state)
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        sm.on_enter(State.EXCHANGING, exchanging)
        seen: list[tuple[State, State]] = []
        sm.add_listener(lambda r: seen.append((r.old, r.new)))
        await sm.trigger(Event.EXCHANGE)
        await asyncio.sleep(0.01)
        assert entered == [State.EXCHANGING]
        await sm.trigger(Event.STOP)
        assert cancelled.is_set()
        assert seen == [(State.IDLE, State.EXCHANGING), (State.EXCHANGING, State.IDLE)]

    asyncio.run(go())


def test_activity_may_trigger_its_own_exit() -> None:
    async def go() -> None:
        sm = _machine_in(State.IDLE)

        async def calibrating(machine: StateMachine, rec: object) -> None:
            await asyncio.sleep(0.01)
            await machine.trigger(Event.CALIBRATED)

        sm.on_enter(State.CALIBRATING, calibrating)
        await sm.trigger(Event.CALIBRATE)
        assert await sm.wait_for(State.IDLE, timeout_s=2) is State.IDLE

    asyncio.run(go())


def test_an_activity_that_ignores_cancellation_cannot_hold_the_machine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import qkdnode.statemachine as smod

    monkeypatch.setattr(smod, "CANCEL_TIMEOUT_S", 0.2)

    async def go() -> None:
        sm = _machine_in(State.IDLE)

        release = asyncio.Event()

        async def stubborn(machine: StateMachine, rec: object) -> None:
            while not release.is_set():  # swallows cancellations, as a buggy activity might
                try:
                    await asyncio.sleep(0.05)
                except asyncio.CancelledError:
                    continue

        sm.on_enter(State.EXCHANGING, stubborn)
        await sm.trigger(Event.EXCHANGE)
        await asyncio.sleep(0.01)
        await asyncio.wait_for(sm.trigger(Event.STOP), 5)
        assert sm.state is State.IDLE
        await asyncio.wait_for(sm.trigger(Event.CALIBRATE), 5)  # the machine still moves
        release.set()
        await sm.close()

    asyncio.run(go())


@pytest.mark.parametrize("spins", range(8))
def test_a_waiter_cancelled_as_its_state_arrives_is_cancelled(spins: int) -> None:
    """A supervisor loop waits for a state and is cancelled (the daemon stopping) in the
    same instant the state arrives: the cancellation must end it, whatever the interleaving
    (``asyncio.wait_for`` on Python 3.11 returned the result and swallowed it, and the
    daemon never exited)."""

    async def go() -> None:
        sm = _machine_in(State.CALIBRATING)

        async def supervisor() -> None:
            while True:  # like the node's supervisor: wait, then go round again
                await sm.wait_for(State.IDLE, State.SHUTDOWN, timeout_s=60)
                await asyncio.sleep(0.01)

        task = asyncio.create_task(supervisor())
        await asyncio.sleep(0)
        await sm.trigger(Event.SHUTDOWN, "test")
        for _ in range(spins):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=2)
        assert done, "the cancelled waiter is still running"
        assert task.cancelled()

    asyncio.run(go())
