"""Authentication: tags, pool persistence, tampering and replay on real sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.asyncio

from qkdnode.postproc.auth import AuthenticatedTransport, AuthError, AuthKeyPool, compute_tag
from qkdnode.postproc.transport import ZmqPairTransport

PSK = bytes(range(256)) * 32


def test_tag_depends_on_every_part() -> None:
    k = bytes(range(32))
    base = compute_tag(k, "sift", {"a": 1}, [b"xyz", np.arange(4, dtype=np.int64)])
    assert base != compute_tag(k, "sifu", {"a": 1}, [b"xyz", np.arange(4, dtype=np.int64)])
    assert base != compute_tag(k, "sift", {"a": 2}, [b"xyz", np.arange(4, dtype=np.int64)])
    assert base != compute_tag(k, "sift", {"a": 1}, [b"xy", b"z" + np.arange(4).tobytes()])
    assert base == compute_tag(
        k, "sift", {"a": 1}, [b"xyz", np.arange(4, dtype=np.int64).tobytes()]
    )


def test_pool_persists_and_never_reuses_pads(tmp_path: Path) -> None:
    pool = AuthKeyPool.bootstrap(tmp_path / "p", PSK)
    seg, off, pad = pool.take("t2r", 32)
    assert (seg, off) == (-1, 0) and len(pad) == 32
    reloaded = AuthKeyPool.load(tmp_path / "p")  # as after a crash
    seg2, off2, _ = reloaded.take("t2r", 16)
    assert (seg2, off2) > (seg, off)
    assert (tmp_path / "p").stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        AuthKeyPool.bootstrap(tmp_path / "p", PSK)
    with pytest.raises(ValueError, match="too short"):
        AuthKeyPool.bootstrap(tmp_path / "q", b"x" * 10)
    assert "secret" not in repr(reloaded.snapshot())


def test_tampered_and_replayed_messages_are_rejected(tmp_path: Path) -> None:
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
        # intercept the next message on the wire, then deliver an edited copy
        await ta.send("x", {"v": 2}, [b"payload"])
        frames = await b._socket.recv_multipart()
        tampered = [frames[0], frames[1], b"pay1oad"]
        await a._socket.send_multipart(tampered)  # looped back towards b
        with pytest.raises(AuthError, match="tag mismatch"):
            await tb.recv(2.0)  # tampered payload
        await a._socket.send_multipart(frames)
        assert (await tb.recv(2.0)).header == {"v": 2}  # the untouched original is fine
        await a._socket.send_multipart(frames)
        with pytest.raises(AuthError, match=r"replayed|sequence"):
            await tb.recv(2.0)  # ... but not twice
        # replay of the first message in a new block is ignored as stale, then times out
        tb.begin_block(2)
        await ta.send("y", {}, [])  # still block 1 on the sender side
        from qkdnode.postproc.transport import TransportTimeoutError

        with pytest.raises(TransportTimeoutError):
            await tb.recv(0.3)
        for t in (a, b):
            t.close()
        ctx.term()

    asyncio.run(main())
