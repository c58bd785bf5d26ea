"""Messages of one key block on the wire: the next expected message (:func:`expect`), the
abort errors, and Cascade's query/answer loops over the block's frames (both sides),
frames built in a worker thread while earlier ones run (:class:`FrameBuilds`).

The block's protocol as a whole is :mod:`.pipeline`; the message formats are in
docs/protocol.md (4.1).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from qkdnode.postproc import cascade, sifting
from qkdnode.postproc.auth import AuthenticatedTransport
from qkdnode.postproc.params import PostprocParams
from qkdnode.postproc.transport import PeerMessage, PeerTransport

_T = TypeVar("_T")


class ProtocolAbortError(Exception):
    """The block cannot produce key (reason is safe to log)."""


class PeerAbortError(ProtocolAbortError):
    """The peer announced that it aborted the block (no abort notice is sent back)."""


async def expect(
    t: PeerTransport, kind: str, params: PostprocParams | float, *, tagged: bool = False
) -> PeerMessage:
    """The next message, which must be ``kind``; ``tagged``: and must carry a verified
    transcript tag (``t`` is then an :class:`AuthenticatedTransport`)."""
    timeout_s = params if isinstance(params, float) else params.recv_timeout_s
    if tagged:
        if not isinstance(t, AuthenticatedTransport):
            raise ProtocolAbortError(f"{kind!r} needs an authenticated transport")
        msg = await t.recv(timeout_s, tagged=True)
    else:
        msg = await t.recv(timeout_s)
    if msg.kind == "abort":
        raise PeerAbortError(f"peer aborted: {str(msg.header.get('reason', ''))[:200]}")
    if msg.kind != kind:
        raise ProtocolAbortError(f"expected message {kind!r}, got {msg.kind!r}")
    return msg


def _frame_of(msg: PeerMessage, frames: int) -> int:
    k = msg.header.get("frame")
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < frames:
        raise ProtocolAbortError(f"{msg.kind} frame {k!r} is not one of 0..{frames - 1}")
    return k


class FrameBuilds(Generic[_T]):
    """Frames ``0 .. count - 1`` built one after the other in a worker thread (the numba
    kernels release the GIL), so that Cascade on the first frames runs while the next are
    built; then, in the same thread, ``then(frame)`` for each frame in turn (work the
    frames need only later). :meth:`get` waits for one; :meth:`cancel` drops those not
    built yet and the ``then`` calls not begun."""

    def __init__(
        self,
        build: Callable[[int], _T],
        count: int,
        then: Callable[[_T], object] | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self._futures: list[asyncio.Future[_T]] = [loop.create_future() for _ in range(count)]
        self._task = asyncio.create_task(self._run(build, then))

    async def _run(self, build: Callable[[int], _T], then: Callable[[_T], object] | None) -> None:
        built: list[_T] = []
        for k, fut in enumerate(self._futures):
            try:
                obj = await asyncio.to_thread(build, k)
            except Exception as exc:  # handed to whoever waits for this or a later frame
                for later in self._futures[k:]:
                    if not later.done():
                        later.set_exception(exc)
                return
            built.append(obj)
            if not fut.done():
                fut.set_result(obj)
        if then is not None:
            for obj in built:  # an error here is the frame's to meet when it needs the work
                await asyncio.to_thread(_quietly, then, obj)

    def ready(self, k: int) -> bool:
        return self._futures[k].done()

    async def get(self, k: int) -> _T:
        return await self._futures[k]

    def cancel(self) -> None:
        self._task.cancel()
        for fut in self._futures:
            if fut.done() and not fut.cancelled():
                fut.exception()  # retrieved: no "never retrieved" warning for unused frames
            fut.cancel()


def _quietly(fn: Callable[[_T], object], obj: _T) -> None:
    """``fn(obj)`` ahead of need: an error is met again, and raised, where the work is needed."""
    with contextlib.suppress(Exception):
        fn(obj)


async def serve_cascade(
    t: PeerTransport,
    build: Callable[[int], cascade.CascadeResponder],
    frames: int,
    timeout_s: float,
) -> tuple[dict[str, Any], list[cascade.CascadeResponder]]:
    """Transmitter's Cascade loop over the ``frames`` frames of a key (``build(k)`` sets up
    frame ``k``, in a worker thread): answer ``ec_q`` until the ``done`` one. Returns its
    header and the responders of the frames that were asked about.

    ``ec_q {"frame": k, "blocks": true}`` asks for the top-level block parities of all passes
    of frame ``k``; ``ec_q {"frame": k, "n": m}`` carries ``m`` node ids of frame ``k`` (one
    buffer, ``layout.wire_dtype``). Each answer is ``ec_a {"frame": k, "n": m}`` with the
    parities as packed bits, in the order of the queries. A malformed query raises
    :class:`ProtocolAbortError` or :class:`cascade.CascadeError` (a ValueError).
    """
    builds = FrameBuilds(build, frames)
    used: dict[int, cascade.CascadeResponder] = {}
    try:
        while True:
            msg = await expect(t, "ec_q", timeout_s)
            if msg.header.get("done"):
                return msg.header, list(used.values())
            k = _frame_of(msg, frames)
            if k not in used:
                used[k] = await builds.get(k)
            if msg.header.get("blocks"):
                par = used[k].block_parities()
            else:
                count = msg.header.get("n")
                if not isinstance(count, int) or isinstance(count, bool) or len(msg.buffers) != 1:
                    raise ProtocolAbortError("ec_q needs a node count and one node-id buffer")
                par = used[k].answer(msg.buffers[0], count)
            await t.send("ec_a", {"frame": k, "n": int(par.shape[0])}, [sifting.pack_bits(par)])
    finally:
        builds.cancel()


async def run_cascade(
    t: PeerTransport,
    build: Callable[[int], cascade.CascadeCorrector],
    frames: int,
    timeout_s: float,
) -> list[cascade.CascadeCorrector]:
    """Receiver's Cascade loop over the ``frames`` frames of a key (``build(k)`` sets up
    frame ``k``, in a worker thread); returns the frames' correctors, in order (the caller
    sends the final ``done``).

    Every started frame has one query in flight: its block parities first, then a batch of
    node queries per round. Bob works on one frame's answers while the other frames'
    queries travel and are answered, and a frame starts as soon as it is built, so the
    round trips of one frame and the set-up of the next overlap the work on the others.
    Once every frame is built, the same worker thread computes what the frames' later
    passes need (:meth:`cascade.CascadeCorrector.prepare_later_passes`) while the first
    passes run.
    """
    builds = FrameBuilds(build, frames, then=cascade.CascadeCorrector.prepare_later_passes)
    started: list[cascade.CascadeCorrector] = []
    in_flight: collections.deque[tuple[int, int]] = collections.deque()  # (frame, count)
    try:
        while in_flight or len(started) < frames:
            k = len(started)
            if k < frames and (not in_flight or builds.ready(k)):
                corr = await builds.get(k)
                started.append(corr)
                await t.send("ec_q", {"frame": k, "blocks": True}, [])
                in_flight.append((k, int(corr.layout.block_offsets[-1])))
                continue
            msg = await expect(t, "ec_a", timeout_s)
            k, count = in_flight.popleft()
            if _frame_of(msg, frames) != k or len(msg.buffers) != 1:
                raise ProtocolAbortError(f"ec_a out of order or malformed (expected frame {k})")
            corr = started[k]
            parities = sifting.unpack_bits(msg.buffers[0], count)
            if corr.stats.rounds == 0:
                corr.set_block_parities(parities)
            else:
                corr.give_answers(parities)
            q = corr.next_queries()
            if q is not None:
                await t.send("ec_q", {"frame": k, "n": int(q.shape[0])}, [corr.layout.encode(q)])
                in_flight.append((k, int(q.shape[0])))
        return started
    finally:
        builds.cancel()
