"""Authentication: tags, pool persistence, transcript checkpoints, tampering and replay."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.asyncio

from qkdnode.postproc.auth import (
    REGION_BYTES,
    AuthenticatedTransport,
    AuthError,
    AuthKeyPool,
    AuthPoolExhaustedError,
    compute_tag,
    message_digest,
    message_mac_key,
    min_psk_bytes,
)
from qkdnode.postproc.transport import (
    Buffer,
    PeerMessage,
    TransportTimeoutError,
    ZmqPairTransport,
    decode_frames,
    encode_frames,
)

PSK = bytes(range(256)) * 32

Frames = list[bytes]


def test_tag_depends_on_every_part() -> None:
    k = bytes(range(32))
    base = compute_tag(k, "sift", {"a": 1}, [b"xyz", np.arange(4, dtype=np.int64)])
    assert base != compute_tag(k, "sifu", {"a": 1}, [b"xyz", np.arange(4, dtype=np.int64)])
    assert base != compute_tag(k, "sift", {"a": 2}, [b"xyz", np.arange(4, dtype=np.int64)])
    assert base != compute_tag(k, "sift", {"a": 1}, [b"xy", b"z" + np.arange(4).tobytes()])
    assert base == compute_tag(
        k, "sift", {"a": 1}, [b"xyz", np.arange(4, dtype=np.int64).tobytes()]
    )
    # the transcript digest is the same polynomial hash with a zero pad
    d, length, mac = message_digest(k[:16], "sift", {"a": 1}, [b"xyz"], k)
    assert d == compute_tag(k[:16] + bytes(16), "sift", {"a": 1}, [b"xyz"])
    assert mac == compute_tag(k, "sift", {"a": 1}, [b"xyz"])
    assert length == 4 + 4 + 8 + len(b'{"a":1}') + 8 + 3
    assert message_mac_key(k[:16], 1, 2) != message_mac_key(k[:16], 1, 3)


def test_pool_persists_and_never_reuses_key(tmp_path: Path) -> None:
    pool = AuthKeyPool.bootstrap(tmp_path / "p", PSK)
    seg, off, key = pool.take("t2r")
    assert (seg, off) == (-1, 0) and len(key) == REGION_BYTES
    reloaded = AuthKeyPool.load(tmp_path / "p")  # as after a crash
    seg2, off2, _ = reloaded.take("t2r", 16)
    assert (seg2, off2) == (-1, REGION_BYTES)  # next region: the cursor was on disk
    _, off3, _ = reloaded.take("t2r")
    assert off3 == 2 * REGION_BYTES  # a partly used region is skipped, never shared
    assert (tmp_path / "p").stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        AuthKeyPool.bootstrap(tmp_path / "p", PSK)
    assert "secret" not in repr(reloaded.snapshot())
    before = reloaded.available_bytes("t2r")
    reloaded.add_segment(0, b"\x01" * 640, b"\x02" * 640)  # refill from a block's key
    assert reloaded.available_bytes("t2r") == before  # usable once the peer announces it
    reloaded.peer_has.add(0)
    assert reloaded.available_bytes("t2r") == before + 640
    assert reloaded.available_bytes("r2t") == len(PSK) // 2 // REGION_BYTES * REGION_BYTES + 640


def test_pool_exhaustion_says_so(tmp_path: Path) -> None:
    pool = AuthKeyPool.bootstrap(tmp_path / "p", bytes(min_psk_bytes()))
    regions = pool.available_bytes("t2r") // REGION_BYTES
    assert regions == 16
    for _ in range(regions):
        pool.take("t2r")
    with pytest.raises(AuthPoolExhaustedError, match="exhausted"):
        pool.take("t2r")
    assert pool.spent_bits == 8 * REGION_BYTES * regions


class Wire:
    """In-memory peer channel (frames as on the wire) with an adversary hook per message."""

    def __init__(self) -> None:
        self.queues: dict[str, asyncio.Queue[Frames]] = {"a": asyncio.Queue(), "b": asyncio.Queue()}
        self.hook: Callable[[str, Frames], list[Frames]] | None = None
        self.log: list[tuple[str, Frames]] = []

    def end(self, me: str) -> End:
        return End(self, me)

    def deliver(self, to: str, frames: Frames) -> None:
        self.queues[to].put_nowait(frames)


class End:
    def __init__(self, wire: Wire, me: str) -> None:
        self.wire, self.me, self.peer = wire, me, "b" if me == "a" else "a"

    async def send(self, kind: str, header: dict[str, Any], buffers: Sequence[Buffer]) -> None:
        frames = [bytes(f) for f in encode_frames(kind, header, buffers)]
        self.wire.log.append((self.me, frames))
        out = [frames] if self.wire.hook is None else self.wire.hook(self.me, frames)
        for f in out:
            self.wire.deliver(self.peer, f)

    async def recv(self, timeout_s: float) -> PeerMessage:
        try:
            frames = await asyncio.wait_for(self.wire.queues[self.me].get(), timeout_s)
        except TimeoutError:
            raise TransportTimeoutError("timeout") from None
        return decode_frames(frames)


def _pair(tmp_path: Path, wire: Wire) -> tuple[AuthenticatedTransport, AuthenticatedTransport]:
    return (
        AuthenticatedTransport(
            wire.end("a"), AuthKeyPool.bootstrap(tmp_path / "a", PSK), "transmitter"
        ),
        AuthenticatedTransport(
            wire.end("b"), AuthKeyPool.bootstrap(tmp_path / "b", PSK), "receiver"
        ),
    )


async def _phase(
    ta: AuthenticatedTransport, tb: AuthenticatedTransport, block: int, tamper_at: int = -1
) -> list[PeerMessage]:
    """A miniature block: R sends 2 messages and tags, T answers 2 and tags (repeated)."""
    got = []
    for round_ in range(2):
        await tb.send("q", {"r": round_, "i": 0}, [b"first"])
        await tb.send("q", {"r": round_, "i": 1}, [np.arange(3, dtype=np.int64)], tag=True)
        got.append(await ta.recv(1.0))
        got.append(await ta.recv(1.0, tagged=True))
        await ta.send("a", {"r": round_}, [b"answer"])
        await ta.send("a", {"r": round_, "last": True}, [], tag=True)
        got.append(await tb.recv(1.0))
        got.append(await tb.recv(1.0, tagged=True))
    return got


def test_transcript_checkpoints_cost_one_region_per_direction(tmp_path: Path) -> None:
    async def main() -> None:
        wire = Wire()
        ta, tb = _pair(tmp_path, wire)
        for block in (1, 2):
            ta.begin_block(block)
            tb.begin_block(block)
            got = await _phase(ta, tb, block)
            assert [m.kind for m in got] == ["q", "q", "a", "a"] * 2
            assert got[1].header == {"r": 0, "i": 1}  # _auth and _tag removed
            assert got[1].buffers == [np.arange(3, dtype=np.int64).tobytes()]
            for t in (ta, tb):
                assert t.sent_pad_bits == t.recv_pad_bits == 8 * REGION_BYTES == 640
                assert t.tags_sent == t.tags_verified == 2
                assert 0 < t.forgery_bound < 1e-28
        for pool, stream in ((ta.pool, "t2r"), (tb.pool, "r2t")):
            assert pool.snapshot()[stream]["send_cursor"] == (-1, 2 * REGION_BYTES)
        # the receiving side's cursors moved past the regions it verified
        assert tb.pool.snapshot()["t2r"]["recv_cursor"] == (-1, 2 * REGION_BYTES)
        assert ta.pool.snapshot()["r2t"]["recv_cursor"] == (-1, 2 * REGION_BYTES)

    asyncio.run(main())


def _edit_header(frames: Frames, edit: Callable[[dict[str, Any]], None]) -> Frames:
    head = json.loads(frames[1])
    edit(head)
    return [frames[0], json.dumps(head, separators=(",", ":")).encode(), *frames[2:]]


def _remac(frames: Frames, sender: AuthenticatedTransport) -> Frames:
    """The message check recomputed with the sender's key: what an adversary who broke
    the (computational) check could send. Only the transcript tags stand in its way."""
    msg = decode_frames(frames)
    head = {k: v for k, v in msg.header.items() if k not in ("_tag", "_mac")}
    region = sender._send_region
    assert region is not None
    key = message_mac_key(region.k_mac, head["_auth"]["b"], head["_auth"]["q"])
    mac = message_digest(region.k_in, msg.kind, head, msg.buffers, key)[2]
    return _edit_header(frames, lambda h: h.update(_mac=mac.hex()))


def _flip_payload(frames: Frames) -> Frames:
    if len(frames) > 2 and frames[2]:
        return [frames[0], frames[1], bytes([frames[2][0] ^ 1]) + frames[2][1:], *frames[3:]]
    return _edit_header(frames, lambda h: h.update(x=1))


@pytest.mark.parametrize("victim", range(8))
@pytest.mark.parametrize("how", ["payload", "header", "kind", "drop", "inject", "renumber"])
@pytest.mark.parametrize("breaks_check", [False, True])
def test_any_change_to_any_message_fails(
    tmp_path: Path, victim: int, how: str, breaks_check: bool
) -> None:
    """Tampering with message number ``victim`` of the miniature block (either direction,
    tagged or not) is refused at once by the message check (or the sequence number, or a
    timeout when a message is missing). An adversary who can also forge the message check
    (``breaks_check``: it is only computationally secure) is stopped by the next transcript
    tag; so is one who drops a message and renumbers the later ones (``renumber``)."""

    async def main() -> None:
        wire = Wire()
        ta, tb = _pair(tmp_path, wire)
        count = 0
        dropped_from = ""
        errors: list[str] = []

        def renumber(head: dict[str, Any]) -> None:
            head["_auth"]["q"] -= 1

        def forward(sender: str, frames: Frames) -> Frames:
            return _remac(frames, ta if sender == "a" else tb) if breaks_check else frames

        def hook(sender: str, frames: Frames) -> list[Frames]:
            nonlocal count, dropped_from
            count += 1
            if count - 1 != victim:
                if sender == dropped_from:
                    return [forward(sender, _edit_header(frames, renumber))]
                return [frames]
            if how == "renumber":
                dropped_from = sender
                return []
            if how == "payload":
                return [forward(sender, _flip_payload(frames))]
            if how == "header":
                edit = _edit_header(frames, lambda h: h["_auth"].update(segs=[-1, 7]))
                return [forward(sender, edit)]
            if how == "kind":
                return [forward(sender, [b"z" + frames[0][1:], *frames[1:]])]
            if how == "drop":
                return []
            return [forward(sender, _flip_payload(frames)), frames]  # slipped in before it

        wire.hook = hook
        ta.begin_block(1)
        tb.begin_block(1)
        with pytest.raises((AuthError, TransportTimeoutError)) as info:
            await _phase(ta, tb, 1)
        errors.append(str(info.value))
        if how in ("payload", "header", "kind") or (how == "inject" and victim % 2 == 1):
            expected = "transcript tag" if breaks_check else "message check failed"
            assert expected in errors[0]
        if how == "renumber" and breaks_check and victim % 2 == 0:
            assert "transcript tag" in errors[0]

    asyncio.run(main())


def test_missing_tag_and_replayed_tag_fail(tmp_path: Path) -> None:
    async def main() -> None:
        wire = Wire()
        ta, tb = _pair(tmp_path, wire)
        ta.begin_block(1)
        tb.begin_block(1)

        # a phase end whose tag was stripped (and the message check forged to match)
        def strip(head: dict[str, Any]) -> None:
            del head["_tag"], head["_auth"]["t"]

        wire.hook = lambda sender, frames: [_remac(_edit_header(frames, strip), tb)]
        await tb.send("q", {}, [b"x"], tag=True)
        with pytest.raises(AuthError, match="lacks its transcript tag"):
            await ta.recv(1.0, tagged=True)
        ta.begin_block(1)
        tb.begin_block(1)
        wire.hook = lambda sender, frames: [_edit_header(frames, lambda h: h.pop("_tag"))]
        await tb.send("q", {}, [b"x"], tag=True)
        with pytest.raises(AuthError, match="tag index without a tag"):
            await ta.recv(1.0, tagged=True)

        # a tag moved from one message to another of the same block
        wire.hook = None
        ta.begin_block(2)
        tb.begin_block(2)
        await tb.send("q", {}, [b"x"], tag=True)
        first = wire.log[-1][1]
        await ta.recv(1.0, tagged=True)
        tag1 = json.loads(first[1])["_tag"]

        def move_tag(sender: str, frames: Frames) -> list[Frames]:
            return [_edit_header(frames, lambda h: h.update(_tag=tag1))]

        wire.hook = move_tag
        await tb.send("q", {}, [b"x"], tag=True)  # tag 2, same content as message 1
        with pytest.raises(AuthError, match="tag 2 mismatch"):
            await ta.recv(1.0, tagged=True)

        # the same tagged message delivered twice: caught by the sequence check
        wire.hook = lambda s, f: [f, f]
        ta.begin_block(3)
        tb.begin_block(3)
        await tb.send("q", {}, [b"y"], tag=True)
        await ta.recv(1.0, tagged=True)
        with pytest.raises(AuthError, match="replay"):
            await ta.recv(1.0, tagged=True)

    asyncio.run(main())


def test_old_block_replayed_after_a_restart_is_rejected(tmp_path: Path) -> None:
    """A node that restarts may number a block as an earlier, aborted one. Replaying the
    earlier attempt's tagged messages then fails: verified regions are never accepted
    again, and an unverified one's tag covered the other side's old messages."""

    async def main() -> None:
        wire = Wire()
        ta, tb = _pair(tmp_path, wire)
        ta.begin_block(5)
        tb.begin_block(5)
        await tb.send("q", {"n": 1}, [b"same"], tag=True)
        await ta.recv(1.0, tagged=True)
        await ta.send("a", {"n": 1}, [b"same"], tag=True)
        old_answer = wire.log[-1][1]
        await tb.recv(1.0, tagged=True)  # verified: the receiver's cursor moves past it

        # same block id again (restart), same content; the adversary replays T's answer
        ta.begin_block(5)
        tb.begin_block(5)
        await tb.send("q", {"n": 1}, [b"same"], tag=True)
        wire.deliver("b", old_answer)
        with pytest.raises(AuthError, match="already used"):
            await tb.recv(1.0, tagged=True)

        # an attempt whose answer never arrived (region not verified by the receiver)
        ta.begin_block(6)
        tb.begin_block(6)
        await tb.send("q", {"n": 1}, [b"same"], tag=True)
        await ta.recv(1.0, tagged=True)
        wire.hook = lambda s, f: []  # the adversary keeps T's answer
        await ta.send("a", {"n": 1}, [b"same"], tag=True)
        kept = wire.log[-1][1]
        wire.hook = None
        ta.begin_block(6)
        tb.begin_block(6)
        await tb.send("q", {"n": 1}, [b"same"], tag=True)  # new region in R's header
        wire.deliver("b", kept)
        with pytest.raises(AuthError, match="tag 1 mismatch"):
            await tb.recv(1.0, tagged=True)

    asyncio.run(main())


def test_reflected_message_fails(tmp_path: Path) -> None:
    """A node's own tagged message sent back to it does not pass as the peer's."""

    async def main() -> None:
        wire = Wire()
        ta, tb = _pair(tmp_path, wire)
        ta.begin_block(1)
        tb.begin_block(1)
        await tb.send("q", {}, [b"x"], tag=True)  # R's region: (-1, 0) of stream r2t
        wire.deliver("b", wire.log[-1][1])  # reflect it to R
        with pytest.raises(AuthError):
            await tb.recv(1.0, tagged=True)

    asyncio.run(main())


def test_tampered_and_replayed_messages_on_real_sockets(tmp_path: Path) -> None:
    async def main() -> None:
        ctx = zmq.asyncio.Context()
        a = ZmqPairTransport.bind_random(ctx)
        b = ZmqPairTransport.connect(ctx, a.endpoint)
        ta = AuthenticatedTransport(a, AuthKeyPool.bootstrap(tmp_path / "a", PSK), "transmitter")
        tb = AuthenticatedTransport(b, AuthKeyPool.bootstrap(tmp_path / "b", PSK), "receiver")
        ta.begin_block(1)
        tb.begin_block(1)
        await ta.send("x", {"v": 1}, [b"payload"])
        msg = await tb.recv(2.0)
        assert msg.kind == "x" and msg.header == {"v": 1} and msg.buffers == [b"payload"]
        # intercept the next (tagged) message on the wire, then deliver an edited copy
        await ta.send("x", {"v": 2}, [b"payload"], tag=True)
        frames = await b._socket.recv_multipart()
        await a._socket.send_multipart([frames[0], frames[1], b"pay1oad"])
        with pytest.raises(AuthError, match="message check failed"):
            await tb.recv(2.0, tagged=True)
        # a stale message of an earlier block is ignored, then the receive times out
        tb.begin_block(2)
        await ta.send("y", {}, [])  # still block 1 on the sender side
        with pytest.raises(TransportTimeoutError):
            await tb.recv(0.3)
        for t in (a, b):
            t.close()
        ctx.term()

    asyncio.run(main())
