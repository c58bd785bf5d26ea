"""End-to-end blocks over real ZeroMQ sockets on loopback: two processes, Eve, and a MITM."""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import json
import multiprocessing as mp
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.asyncio

from qkdnode.postproc import cascade
from qkdnode.postproc.auth import (
    REGION_BYTES,
    AuthenticatedTransport,
    AuthKeyPool,
    message_digest,
    message_mac_key,
)
from qkdnode.postproc.block_wire import (
    FrameBuilds,
    ProtocolAbortError,
    run_cascade,
    serve_cascade,
)
from qkdnode.postproc.blockstats import BlockStats
from qkdnode.postproc.params import CascadeParams, PostprocParams
from qkdnode.postproc.pipeline import BlockResult, run_block_receiver, run_block_transmitter
from qkdnode.postproc.transport import ZmqPairTransport, decode_frames
from tests.postproc.synth import generate

# Frames of >= 100 kbit: the blocks of these tests (~1e6 sifted Z bits) run as 2 frames.
PARAMS = PostprocParams(
    recv_timeout_s=5.0,
    p_basis_z=0.5,
    p_signal=0.6,
    p_decoy=0.2,
    cascade=CascadeParams(min_frame_bits=100_000),
)
N_PULSES = 15_000_000
PSK = (
    bytes(range(256)) * 128
)  # 32 KiB shared secret (test only): a block may use ~28 kbit per direction


def _pools(tmp_path: Path) -> tuple[AuthKeyPool, AuthKeyPool]:
    return (
        AuthKeyPool.bootstrap(tmp_path / "tx.pool", PSK),
        AuthKeyPool.bootstrap(tmp_path / "rx.pool", PSK),
    )


def _tx_process(endpoint_q: Any, result_q: Any, pool_path: str, seed: int, blocks: int) -> None:
    async def main() -> None:
        ctx = zmq.asyncio.Context()
        tr = ZmqPairTransport.bind_random(ctx)
        endpoint_q.put(tr.endpoint)
        auth = AuthenticatedTransport(tr, AuthKeyPool.load(pool_path), "transmitter")
        for b in range(blocks):
            synth = generate(N_PULSES, PARAMS, seed + b, eta=0.5)
            res = await run_block_transmitter(auth, b, synth.prepared, PARAMS)
            result_q.put((res.ok, res.abort_reason, res.key_bytes, res.stats.final_key_bits))
        tr.close()
        ctx.term()

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_two_processes_produce_identical_keys(tmp_path: Path) -> None:
    tx_pool, _ = _pools(tmp_path)
    mpc = mp.get_context("spawn")
    endpoint_q, result_q = mpc.Queue(), mpc.Queue()
    proc = mpc.Process(target=_tx_process, args=(endpoint_q, result_q, str(tx_pool.path), 11, 2))
    proc.start()
    try:
        endpoint = endpoint_q.get(timeout=30)

        async def rx() -> list[BlockResult]:
            ctx = zmq.asyncio.Context()
            tr = ZmqPairTransport.connect(ctx, endpoint)
            auth = AuthenticatedTransport(tr, AuthKeyPool.load(tmp_path / "rx.pool"), "receiver")
            out = []
            for b in range(2):
                synth = generate(N_PULSES, PARAMS, 11 + b, eta=0.5)
                out.append(
                    await run_block_receiver(auth, b, synth.slot_index, synth.channel, PARAMS)
                )
            tr.close()
            ctx.term()
            return out

        rx_results = asyncio.run(rx())
        for res in rx_results:
            ok, reason, key_bytes, bits = result_q.get(timeout=30)
            assert res.ok, res.abort_reason
            assert ok, reason
            assert bits == res.stats.final_key_bits > 1000
            assert key_bytes == res.key_bytes
            assert res.stats.ec_disclosed_bits > 0
            assert res.stats.seconds["error_correction"] > 0
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    # both pools replenished with the same material
    a, b = AuthKeyPool.load(tmp_path / "tx.pool"), AuthKeyPool.load(tmp_path / "rx.pool")
    assert a.stream_digest("t2r") == b.stream_digest("t2r")
    assert a.segments() == b.segments() == [-1, 0, 1]


async def _pair(
    tmp_path: Path, ctx: zmq.asyncio.Context
) -> tuple[ZmqPairTransport, ZmqPairTransport]:
    tx = ZmqPairTransport.bind_random(ctx)
    rx = ZmqPairTransport.connect(ctx, tx.endpoint)
    return tx, rx


async def _run_block(
    tx_auth: AuthenticatedTransport,
    rx_auth: AuthenticatedTransport,
    block_id: int,
    seed: int,
    eve: bool = False,
    params: PostprocParams = PARAMS,
) -> tuple[BlockResult, BlockResult]:
    synth = generate(N_PULSES, params, seed, eve=eve, eta=0.5)
    return await asyncio.gather(
        run_block_transmitter(tx_auth, block_id, synth.prepared, params),
        run_block_receiver(rx_auth, block_id, synth.slot_index, synth.channel, params),
    )


def test_cascade_block_sizes_follow_the_z_over_x_error_ratio(tmp_path: Path) -> None:
    """With Z errors rarer than X errors (as in time-bin encodings), the transmitter sizes
    the Cascade blocks of the next block by the Z/X ratio measured on the first one: bigger
    blocks, less disclosure, same keys on both sides."""

    async def main() -> list[tuple[BlockResult, BlockResult]]:
        ctx = zmq.asyncio.Context()
        tx, rx = await _pair(tmp_path, ctx)
        p_tx, p_rx = _pools(tmp_path)
        tx_auth = AuthenticatedTransport(tx, p_tx, "transmitter")
        rx_auth = AuthenticatedTransport(rx, p_rx, "receiver")
        synth = generate(N_PULSES, PARAMS, 11, eta=0.9, e_d=0.01, e_d_x=0.04)
        out: list[tuple[BlockResult, BlockResult]] = []
        ratio = None
        for block_id in range(2):
            t_res, r_res = await asyncio.gather(
                run_block_transmitter(
                    tx_auth, block_id, synth.prepared, PARAMS, z_over_x_error_ratio=ratio
                ),
                run_block_receiver(rx_auth, block_id, synth.slot_index, synth.channel, PARAMS),
            )
            out.append((t_res, r_res))
            ratio = t_res.stats.qber_z / t_res.stats.qber_x
        tx.close(), rx.close(), ctx.term()
        return out

    (t0, r0), (t1, r1) = asyncio.run(main())
    assert t0.ok and r0.ok and t1.ok and r1.ok
    assert np.array_equal(t0.key, r0.key) and np.array_equal(t1.key, r1.key)
    n, qx = t0.stats.sifted_z // t0.stats.ec_frames, t0.stats.qber_x
    assert t0.stats.ec_frames == 2 == cascade.frame_count(t0.stats.sifted_z, PARAMS.cascade)
    assert t0.stats.ec_levels == cascade.schedule(n, qx, PARAMS.cascade)
    ratio = t0.stats.qber_z / qx
    assert ratio < 0.5
    assert t1.stats.ec_levels == cascade.schedule(n, qx * ratio, PARAMS.cascade)
    assert t1.stats.ec_levels[0] > t0.stats.ec_levels[0]
    assert t1.stats.ec_efficiency < t0.stats.ec_efficiency


def test_intercept_resend_yields_no_key(tmp_path: Path) -> None:
    async def main() -> tuple[BlockResult, BlockResult]:
        ctx = zmq.asyncio.Context()
        tx, rx = await _pair(tmp_path, ctx)
        p_tx, p_rx = _pools(tmp_path)
        res = await _run_block(
            AuthenticatedTransport(tx, p_tx, "transmitter"),
            AuthenticatedTransport(rx, p_rx, "receiver"),
            0,
            5,
            eve=True,
        )
        tx.close(), rx.close(), ctx.term()
        return res

    t_res, r_res = asyncio.run(main())
    assert not t_res.ok and not r_res.ok
    assert t_res.key is None and r_res.key is None
    assert "error rate" in t_res.abort_reason
    assert 0.2 < t_res.stats.qber_x < 0.3


class Mitm:
    """Forwards frames between two PAIR sockets and misbehaves on message number ``at``."""

    def __init__(self, ctx: zmq.asyncio.Context, action: str, at: int) -> None:
        self.front = ctx.socket(zmq.PAIR)  # the receiver connects here
        self.back = ctx.socket(zmq.PAIR)  # connects to the transmitter
        self.front.setsockopt(zmq.LINGER, 0)
        self.back.setsockopt(zmq.LINGER, 0)
        port = self.front.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.action, self.at, self.count = action, at, 0
        self.seen: list[list[bytes]] = []
        self.acted = False

    async def pump(self, src: zmq.asyncio.Socket, dst: zmq.asyncio.Socket) -> None:
        held: list[bytes] | None = None
        while True:
            frames = await src.recv_multipart()
            self.count += 1
            self.seen.append(frames)
            if self.count == self.at:
                self.acted = True
                if self.action == "drop":
                    continue
                if self.action == "tamper":
                    msg = decode_frames(frames)
                    if len(frames) > 2 and len(frames[2]):
                        buf = bytearray(frames[2])
                        buf[0] ^= 1
                        frames = [frames[0], frames[1], bytes(buf), *frames[3:]]
                    else:
                        del msg
                        frames = [frames[0], frames[1].replace(b'"_auth"', b'"_auth" ', 1)]
                        frames[1] = frames[1].replace(b"{", b'{"x":1,', 1)
                elif self.action == "replay":
                    await dst.send_multipart(frames)
                    frames = self.seen[0] if src is self.front else frames
                elif self.action == "reorder":
                    held = frames
                    continue
            await dst.send_multipart(frames)
            if held is not None and self.count > self.at:
                await dst.send_multipart(held)
                held = None


@pytest.mark.slow
@pytest.mark.parametrize(
    ("action", "at"),
    [
        ("tamper", 3),
        # a dropped or reordered message ends the block at its timeout (~9 s each):
        # make test-system
        pytest.param("drop", 4, marks=pytest.mark.system),
        ("replay", 3),
        pytest.param("reorder", 5, marks=pytest.mark.system),
        ("tamper", 1),
    ],
)
def test_mitm_aborts_block_and_pools_stay_usable(tmp_path: Path, action: str, at: int) -> None:
    params = PARAMS.model_copy(update={"recv_timeout_s": 6.0})

    async def main() -> list[tuple[BlockResult, BlockResult]]:
        ctx = zmq.asyncio.Context()
        p_tx, p_rx = _pools(tmp_path)
        tx = ZmqPairTransport.bind_random(ctx)
        mitm = Mitm(ctx, action, at)
        mitm.back.connect(tx.endpoint)
        rx = ZmqPairTransport.connect(ctx, mitm.endpoint)
        pumps = [
            asyncio.create_task(mitm.pump(mitm.front, mitm.back)),
            asyncio.create_task(mitm.pump(mitm.back, mitm.front)),
        ]
        a_tx = AuthenticatedTransport(tx, p_tx, "transmitter")
        a_rx = AuthenticatedTransport(rx, p_rx, "receiver")
        results = [await _run_block(a_tx, a_rx, 0, 21, params=params)]
        assert mitm.acted
        # drain anything left in flight (e.g. the abort notice) before the next block
        await asyncio.sleep(0.2)
        for t in (tx, rx):
            while await t._socket.poll(timeout=50):
                await t._socket.recv_multipart()
        results.append(await _run_block(a_tx, a_rx, 1, 22, params=params))
        for p in pumps:
            p.cancel()
        for s in (tx, rx):
            s.close()
        mitm.front.close(), mitm.back.close()
        ctx.term()
        return results

    (t0, r0), (t1, r1) = asyncio.run(main())
    assert not t0.ok and not r0.ok, (t0.abort_reason, r0.abort_reason)
    assert t0.key is None and r0.key is None
    assert t1.ok and r1.ok, (t1.abort_reason, r1.abort_reason)
    assert t1.key_bytes == r1.key_bytes
    a, b = AuthKeyPool.load(tmp_path / "tx.pool"), AuthKeyPool.load(tmp_path / "rx.pool")
    assert a.stream_digest("t2r") == b.stream_digest("t2r")
    assert a.stream_digest("r2t") == b.stream_digest("r2t")
    assert a.segments() == b.segments() == [-1, 1]


class PhaseMitm:
    """Forwards frames between the two nodes and changes the ``nth`` message of ``kind``
    (the receiver's final ``ec_q`` counts as kind ``ec_q.done``): ``tamper`` flips a bit of
    its last non-empty buffer (or adds a header field), ``strip`` removes its transcript
    tag, ``none`` forwards everything unchanged. ``forge_tamper`` / ``forge_strip`` do the
    same and recompute the per-message check with the sender's key (``senders``): an
    adversary who broke that computational check, against whom only the transcript tags
    stand."""

    senders: dict[str, AuthenticatedTransport]

    def __init__(self, ctx: zmq.asyncio.Context, action: str, kind: str, nth: int) -> None:
        self.front = ctx.socket(zmq.PAIR)  # the receiver connects here
        self.back = ctx.socket(zmq.PAIR)  # connects to the transmitter
        self.front.setsockopt(zmq.LINGER, 0)
        self.back.setsockopt(zmq.LINGER, 0)
        port = self.front.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.action, self.kind, self.nth = action, kind, nth
        self.counts: collections.Counter[str] = collections.Counter()
        self.acted = False

    def _change(self, frames: list[bytes], sender: AuthenticatedTransport) -> list[bytes]:
        head = json.loads(frames[1])
        if self.action.endswith("strip"):
            del head["_tag"], head["_auth"]["t"]
        else:
            for i in reversed(range(2, len(frames))):  # a bit of the last byte: still valid
                if frames[i]:
                    flipped = frames[i][:-1] + bytes([frames[i][-1] ^ 1])
                    frames = [*frames[:i], flipped, *frames[i + 1 :]]
                    break
            else:
                head["x"] = 1
        if self.action.startswith("forge"):
            region = sender._send_region
            assert region is not None
            content = {k: v for k, v in head.items() if k not in ("_tag", "_mac")}
            key = message_mac_key(region.k_mac, head["_auth"]["b"], head["_auth"]["q"])
            buffers = frames[2:]
            head["_mac"] = message_digest(region.k_in, frames[0].decode(), content, buffers, key)[
                2
            ].hex()
        return [frames[0], json.dumps(head).encode(), *frames[2:]]

    async def pump(self, src: zmq.asyncio.Socket, dst: zmq.asyncio.Socket) -> None:
        sender = self.senders["rx" if src is self.front else "tx"]
        while True:
            frames = await src.recv_multipart()
            kind = frames[0].decode()
            if kind == "ec_q" and json.loads(frames[1]).get("done"):
                kind = "ec_q.done"
            self.counts[kind] += 1
            if kind == self.kind and self.counts[kind] == self.nth and self.action != "none":
                self.acted = True
                frames = self._change(frames, sender)
            await dst.send_multipart(frames)


PHASE_PARAMS = PARAMS.model_copy(update={"recv_timeout_s": 5.0})
N_PULSES_PHASE = 6_000_000


@functools.lru_cache(maxsize=1)
def _phase_block() -> Any:
    return generate(N_PULSES_PHASE, PHASE_PARAMS, 31, eta=0.5)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("action", "kind", "nth"),
    [
        ("none", "", 0),
        ("tamper", "sift", 1),
        ("tamper", "sift_reply", 1),
        ("tamper", "pe", 1),
        ("tamper", "pe_reply", 1),
        ("tamper", "ec_q", 1),
        ("tamper", "ec_a", 1),
        ("tamper", "ec_q", 5),
        ("tamper", "ec_a", 8),
        ("tamper", "ec_q.done", 1),
        ("tamper", "verify", 1),
        ("tamper", "verify_reply", 1),
        ("tamper", "pa", 1),
        ("tamper", "done", 1),
        ("strip", "pe", 1),
        ("strip", "done", 1),
        # Not Cascade's messages: Cascade assumes consistent answers (a forged one can keep
        # the receiver's Cascade from ending), which the message check provides.
        ("forge_tamper", "sift", 1),
        ("forge_tamper", "sift_reply", 1),
        ("forge_tamper", "pe", 1),
        ("forge_tamper", "pe_reply", 1),
        ("forge_tamper", "ec_q.done", 1),
        ("forge_tamper", "verify", 1),
        ("forge_tamper", "verify_reply", 1),
        ("forge_tamper", "pa", 1),
        ("forge_tamper", "done", 1),
        ("forge_strip", "pe", 1),
        ("forge_strip", "pe_reply", 1),
        ("forge_strip", "pa", 1),
        ("forge_strip", "done", 1),
    ],
)
def test_mitm_changing_any_message_of_any_phase_keeps_no_key(
    tmp_path: Path, action: str, kind: str, nth: int
) -> None:
    """Messages are authenticated by transcript tags at phase ends, not one by one: a change
    to any single message, in any phase and either direction, or a stripped tag, still
    aborts the block before either side outputs key or refills its pool: at once by the
    message check, and by the transcript tags when the adversary can forge that check.
    The one exception is the receiver's final ``done``: the receiver has checked the whole
    transcript and holds its key before sending it (the pair's two-phase commit then
    discards it)."""
    synth = _phase_block()

    async def main() -> tuple[BlockResult, BlockResult, PhaseMitm]:
        ctx = zmq.asyncio.Context()
        p_tx, p_rx = _pools(tmp_path)
        tx = ZmqPairTransport.bind_random(ctx)
        mitm = PhaseMitm(ctx, action, kind, nth)
        mitm.back.connect(tx.endpoint)
        rx = ZmqPairTransport.connect(ctx, mitm.endpoint)
        a_tx = AuthenticatedTransport(tx, p_tx, "transmitter")
        a_rx = AuthenticatedTransport(rx, p_rx, "receiver")
        mitm.senders = {"tx": a_tx, "rx": a_rx}
        pumps = [
            asyncio.create_task(mitm.pump(mitm.front, mitm.back)),
            asyncio.create_task(mitm.pump(mitm.back, mitm.front)),
        ]
        t_res, r_res = await asyncio.gather(
            run_block_transmitter(a_tx, 0, synth.prepared, PHASE_PARAMS),
            run_block_receiver(a_rx, 0, synth.slot_index, synth.channel, PHASE_PARAMS),
        )
        for p in pumps:
            p.cancel()
        tx.close(), rx.close(), mitm.front.close(), mitm.back.close()
        ctx.term()
        return t_res, r_res, mitm

    t_res, r_res, mitm = asyncio.run(main())
    a, b = AuthKeyPool.load(tmp_path / "tx.pool"), AuthKeyPool.load(tmp_path / "rx.pool")
    for res in (t_res, r_res):
        assert res.stats.auth_bits_sent <= 8 * REGION_BYTES
    if action == "none":
        assert t_res.ok and r_res.ok and t_res.key_bytes == r_res.key_bytes
        assert a.segments() == b.segments() == [-1, 0]
        return
    assert mitm.acted
    assert not t_res.ok and t_res.key is None, t_res.abort_reason
    assert a.segments() == [-1]
    if kind == "done":
        assert r_res.ok and b.segments() == [-1, 0]
    else:
        assert not r_res.ok and r_res.key is None, r_res.abort_reason
        assert b.segments() == [-1]
    reasons = t_res.abort_reason + " | " + r_res.abort_reason
    if not action.startswith("forge"):
        assert "message check failed" in reasons  # refused at once, nothing ran on it
    elif action == "forge_strip":
        assert "lacks its transcript tag" in reasons
    else:
        assert "transcript tag" in reasons  # caught by the next checkpoint


def test_block_result_repr_hides_key() -> None:
    key = np.ones(64, dtype=np.uint8)
    res = BlockResult(True, 3, BlockStats(block_id=3, final_key_bits=64), key=key)
    assert "key=" not in repr(res) and "1, 1" not in str(res)
    assert res.key_bytes == b"\xff" * 8
    assert os.environ is not None


def _frames_inputs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    alice = rng.integers(0, 2, n, dtype=np.uint8)
    return alice, alice ^ (rng.random(n) < 0.03).astype(np.uint8)


def test_cascade_frames_run_concurrently_over_zmq() -> None:
    """The key cut into 3 frames, their queries interleaved on one socket pair: Bob ends with
    Alice's key, and both count the same disclosure."""
    params = CascadeParams(frames=3, min_frame_bits=1000)
    n = 30_001
    alice, bob = _frames_inputs(n, 3)
    frames = cascade.frame_count(n, params)
    assert frames == 3
    levels = cascade.schedule(n // frames, 0.03, params)
    built: list[str] = []

    def alice_frame(k: int) -> cascade.CascadeResponder:
        built.append(f"alice {k}")
        return cascade.frame_responder(alice, levels, 77, frames, k)

    def bob_frame(k: int) -> cascade.CascadeCorrector:
        built.append(f"bob {k}")
        return cascade.frame_corrector(bob, levels, 77, frames, k)

    async def main() -> Any:
        ctx = zmq.asyncio.Context()
        tx = ZmqPairTransport.bind_random(ctx)
        rx = ZmqPairTransport.connect(ctx, tx.endpoint)

        async def receiver() -> list[cascade.CascadeCorrector]:
            out = await run_cascade(rx, bob_frame, frames, 5.0)
            await rx.send("ec_q", {"done": True}, [])
            return out

        served, received = await asyncio.gather(
            serve_cascade(tx, alice_frame, frames, 5.0), receiver()
        )
        tx.close(), rx.close(), ctx.term()
        return served, received

    (done, responders), correctors = asyncio.run(main())
    assert done == {"done": True}
    assert sorted(built) == [f"{who} {k}" for who in ("alice", "bob") for k in range(3)]
    assert np.array_equal(np.concatenate([c.corrected() for c in correctors]), alice)
    assert [c.layout.n for c in correctors] == [10_000, 10_000, 10_001]
    assert sum(r.disclosed_bits for r in responders) == sum(
        c.stats.disclosed_bits for c in correctors
    )
    # each frame has its own permutations
    assert cascade.frame_seed(77, 1) != cascade.frame_seed(77, 2)


def test_cascade_answer_for_the_wrong_frame_aborts() -> None:
    alice, bob = _frames_inputs(5000, 4)
    levels = cascade.schedule(2500, 0.03, CascadeParams())
    build = functools.partial(cascade.frame_corrector, bob, levels, 5, 2)

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        tx = ZmqPairTransport.bind_random(ctx)
        rx = ZmqPairTransport.connect(ctx, tx.endpoint)

        async def wrong_alice() -> None:
            await tx.recv(5.0)  # frame 0's block parities
            await tx.send("ec_a", {"frame": 1, "n": 1}, [b"\x00"])

        try:
            await asyncio.gather(run_cascade(rx, build, 2, 5.0), wrong_alice())
        finally:
            tx.close(), rx.close(), ctx.term()

    with pytest.raises(ProtocolAbortError, match="expected frame 0"):
        asyncio.run(main())


def test_frame_bounds() -> None:
    for n, count in ((10, 3), (1_000_003, 2), (7, 7)):
        bounds = cascade.frame_bounds(n, count)
        assert bounds[0][0] == 0 and bounds[-1][1] == n and len(bounds) == count
        lengths = [b - a for a, b in bounds]
        assert max(lengths) - min(lengths) <= 1
        assert all(b0[1] == b1[0] for b0, b1 in itertools.pairwise(bounds))
    for n, count in ((5, 0), (5, 6), (100, 65)):
        with pytest.raises(cascade.CascadeError):
            cascade.frame_bounds(n, count)
    params = CascadeParams(frames=4, min_frame_bits=1000)
    assert [cascade.frame_count(n, params) for n in (999, 2500, 10**6)] == [1, 2, 4]


def test_frame_builds_hand_a_failure_to_every_later_frame() -> None:
    """A frame whose set-up fails (say, tree levels the peer sent that do not fit) fails it
    and every later frame: nobody waits for a frame that will never be built."""

    def build(k: int) -> int:
        if k == 1:
            raise cascade.CascadeError("bad tree levels")
        return k * 10

    async def main() -> tuple[int, list[str]]:
        builds = FrameBuilds(build, 3)
        first = await builds.get(0)
        errors = []
        for k in (2, 1):
            try:
                await builds.get(k)
            except cascade.CascadeError as exc:
                errors.append(f"{k}: {exc}")
        builds.cancel()
        return first, errors

    assert asyncio.run(main()) == (0, ["2: bad tree levels", "1: bad tree levels"])
