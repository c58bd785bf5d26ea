"""The auditor's view of a block: every message on the wire, field by field, classified, and
the leak the block pays for checked against what the captured messages can carry.

A field that is not in :data:`FIELDS` fails the audit: adding a message field that depends
on the key means adding it here, with the bits it can leak, and to the block's accounting
(:mod:`qkdnode.postproc.leak`, docs/architecture.md "Leak accounting").
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.asyncio

from qkdnode.postproc import finitekey, sifting
from qkdnode.postproc.auth import AuthenticatedTransport, AuthKeyPool
from qkdnode.postproc.leak import BlockLeak, integer_bits
from qkdnode.postproc.params import CascadeParams, PostprocParams
from qkdnode.postproc.pipeline import BlockResult, run_block_receiver, run_block_transmitter
from qkdnode.postproc.transport import PeerMessage, ZmqPairTransport, decode_frames
from tests.postproc.synth import Synth, generate

PARAMS = PostprocParams(
    recv_timeout_s=5.0,
    p_basis_z=0.5,
    p_signal=0.6,
    p_decoy=0.2,
    cascade=CascadeParams(min_frame_bits=100_000),
)
N_PULSES = 6_000_000
PSK = bytes(range(256)) * 128

# --- the classification --------------------------------------------------------------------
PUBLIC = "public by the protocol"  # sifting, X-basis estimation: the security proof has them public
RANDOM = "fresh randomness"  # drawn after the key exists, independently of it
DERIVED = "derived"  # a function of public data and of counted quantities
AUTH = "authentication"  # counters, one-time-padded tags, per-message checks
PARITY = "transmitter parities"  # one bit per parity: the ec_a header's n
TAG = "verification tag"  # its bits
COUNT = "error count"  # an integer in 0..n_z: bit_length(n_z)
ERROR_PATTERN = "receiver, error pattern"  # paid for by withdrawing the vacuum credit s_Z0
OUTCOME = "outcome"  # the same on every block that produces key
#: whether a node could store the block's keys: its store's room and health and the public
#: final length decide, never the key's value (the two-phase commit inside the block)
STORE = "key store outcome"

#: (kind, field) -> class; a header field by name, a buffer by its index.
FIELDS: dict[tuple[str, str | int], str] = {
    ("sift", "slots"): PUBLIC,
    ("sift", "pulses"): PUBLIC,  # slots the detections span: their times are public
    ("sift", 0): PUBLIC,  # slot gaps
    ("sift", 1): PUBLIC,  # escaped gaps
    ("sift", 2): PUBLIC,  # receiver's bases
    ("sift_reply", "n_matched"): PUBLIC,
    ("sift_reply", 0): PUBLIC,  # basis-match mask
    ("sift_reply", 1): PUBLIC,  # intensity classes
    ("pe", 0): PUBLIC,  # receiver's X-basis bits
    ("pe_reply", "ec_seed"): RANDOM,
    ("pe_reply", "levels"): DERIVED,  # from qber_x and the public ratio of an earlier block
    ("pe_reply", "frames"): DERIVED,  # from n_z
    ("pe_reply", "qber_x"): PUBLIC,  # X basis: parameter estimation
    ("ec_q", "frame"): ERROR_PATTERN,
    ("ec_q", "blocks"): ERROR_PATTERN,
    ("ec_q", "n"): ERROR_PATTERN,
    ("ec_q", 0): ERROR_PATTERN,  # node ids
    ("ec_q", "done"): ERROR_PATTERN,
    ("ec_q", "z_error_count"): COUNT,
    ("ec_a", "frame"): DERIVED,  # echoes the query
    ("ec_a", "n"): DERIVED,  # echoes the query
    ("ec_a", 0): PARITY,
    ("verify", "hash_key"): RANDOM,
    ("verify", "tag"): TAG,
    ("verify_reply", "ok"): OUTCOME,
    ("pa", "m"): DERIVED,  # the final length: public counts and counted leak
    ("pa", "reserve"): DERIVED,  # authentication key spent
    ("pa", "stored"): STORE,
    ("pa", "next_block_detections"): DERIVED,  # the link fitted to earlier blocks' counts
    ("pa", 0): RANDOM,  # Toeplitz seed
    ("done", "committed"): STORE,
}
AUTH_FIELDS = ("_auth", "_mac", "_tag")


@dataclass
class Wire:
    """One captured message: ``sender`` is "tx" or "rx"."""

    sender: str
    msg: PeerMessage


def classify(wire: list[Wire]) -> dict[str, list[tuple[Wire, str | int]]]:
    """Every field of every message by class; raises AssertionError naming the fields that
    have no class (a new, unaccounted field) or a message kind no successful block sends."""
    out: dict[str, list[tuple[Wire, str | int]]] = {}
    unknown = []
    for w in wire:
        for name in AUTH_FIELDS:
            if name in w.msg.header:
                out.setdefault(AUTH, []).append((w, name))
        fields: list[str | int] = [k for k in w.msg.header if k not in AUTH_FIELDS]
        fields += list(range(len(w.msg.buffers)))
        for f in fields:
            cls = FIELDS.get((w.msg.kind, f))
            if cls is None:
                unknown.append((w.sender, w.msg.kind, f))
                continue
            out.setdefault(cls, []).append((w, f))
    assert not unknown, f"unclassified message fields (account for them): {unknown}"
    return out


def wire_counts(wire: list[Wire]) -> finitekey.DecoyCounts:
    """Per-class Z and X detection counts recomputed from the wire alone (X errors are not
    on the wire: left at 0, they do not enter s_Z0)."""
    sift = next(w.msg for w in wire if w.msg.kind == "sift")
    reply = next(w.msg for w in wire if w.msg.kind == "sift_reply")
    slots = sifting.decode_slots(sift.header["slots"], sift.buffers[:2])
    bob_basis = sifting.unpack_bits(sift.buffers[2], int(slots.shape[0]))
    match = sifting.unpack_bits(reply.buffers[0], int(slots.shape[0])).astype(bool)
    cls = sifting.unpack_trits(reply.buffers[1], int(match.sum()))
    is_z = bob_basis[match] == 0
    n_z = np.bincount(cls[is_z], minlength=3)[:3]
    n_x = np.bincount(cls[~is_z], minlength=3)[:3]
    return finitekey.DecoyCounts(
        n_z=tuple(float(c) for c in n_z),  # type: ignore[arg-type]
        n_x=tuple(float(c) for c in n_x),  # type: ignore[arg-type]
        m_x=(0.0, 0.0, 0.0),
    )


def _value(w: Wire, field: str | int) -> Any:
    return w.msg.header[field] if isinstance(field, str) else w.msg.buffers[field]


def leak_bound_from_wire(wire: list[Wire], params: PostprocParams) -> BlockLeak:
    """What the captured messages can disclose about the sifted Z key, item by item."""
    by_class = classify(wire)
    parity = 0
    for w, _ in by_class.get(PARITY, []):
        n = int(w.msg.header["n"])
        assert len(w.msg.buffers[0]) == (n + 7) // 8  # no more bits than announced
        parity += n
    tag = sum(4 * len(str(_value(w, f))) for w, f in by_class.get(TAG, []))
    counts = wire_counts(wire)
    n_z = int(sum(counts.n_z))
    count = 0
    for w, f in by_class.get(COUNT, []):
        assert 0 <= int(_value(w, f)) <= n_z
        count += integer_bits(n_z)
    for w, f in by_class.get(OUTCOME, []):
        assert _value(w, f) is True  # a block that produced key: always the same value
    for w, f in by_class.get(STORE, []):
        assert isinstance(_value(w, f), bool)  # whether a store took the block, not its value
    vacuum = 0.0
    if by_class.get(ERROR_PATTERN):
        vacuum = finitekey.estimate_from_params(counts, params).s_z0_lower
    return BlockLeak(
        ec_parity_bits=parity,
        verification_bits=tag,
        error_count_bits=count,
        vacuum_credit_bits=vacuum,
    )


# --- running a block with a tap on the wire ---------------------------------------------------
class Tap:
    """Forwards frames between the two nodes unchanged and records every message."""

    def __init__(self, ctx: zmq.asyncio.Context) -> None:
        self.front = ctx.socket(zmq.PAIR)  # the receiver connects here
        self.back = ctx.socket(zmq.PAIR)  # connects to the transmitter
        for s in (self.front, self.back):
            s.setsockopt(zmq.LINGER, 0)
        port = self.front.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.wire: list[Wire] = []

    async def pump(self, src: zmq.asyncio.Socket, dst: zmq.asyncio.Socket, sender: str) -> None:
        while True:
            frames = await src.recv_multipart()
            self.wire.append(Wire(sender, decode_frames(frames)))
            await dst.send_multipart(frames)


@dataclass
class Audited:
    tx: BlockResult
    rx: BlockResult
    wire: list[Wire]
    key_length_calls: list[tuple[float, int]]  # (leak_ec_bits, result) of the final length


@functools.lru_cache(maxsize=2)
def _synth(y0: float = 1e-5) -> Synth:
    return generate(N_PULSES, PARAMS, 41, eta=0.5, y0=y0)


def run_tapped_block(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    synth: Synth,
    *,
    key_slots: sifting.KeySlotFloor | None = None,
) -> Audited:
    calls: list[tuple[float, int]] = []
    real: Callable[..., int] = finitekey.secret_key_length

    def spy(est: Any, leak_ec_bits: float, eps_sec: float, eps_cor: float) -> int:
        out = real(est, leak_ec_bits, eps_sec, eps_cor)
        calls.append((leak_ec_bits, out))
        return out

    monkeypatch.setattr(finitekey, "secret_key_length", spy)

    async def main() -> Audited:
        ctx = zmq.asyncio.Context()
        tap = Tap(ctx)
        tx = ZmqPairTransport.bind_random(ctx)
        tap.back.connect(tx.endpoint)
        rx = ZmqPairTransport.connect(ctx, tap.endpoint)
        pumps = [
            asyncio.create_task(tap.pump(tap.front, tap.back, "rx")),
            asyncio.create_task(tap.pump(tap.back, tap.front, "tx")),
        ]
        a_tx = AuthenticatedTransport(
            tx, AuthKeyPool.bootstrap(tmp_path / "tx.pool", PSK), "transmitter"
        )
        a_rx = AuthenticatedTransport(
            rx, AuthKeyPool.bootstrap(tmp_path / "rx.pool", PSK), "receiver"
        )
        try:
            t_res, r_res = await asyncio.gather(
                run_block_transmitter(a_tx, 0, synth.prepared, PARAMS, key_slots=key_slots),
                run_block_receiver(a_rx, 0, synth.slot_index, synth.channel, PARAMS),
            )
            await asyncio.sleep(0.05)  # the last message through the tap
        finally:
            for p in pumps:
                p.cancel()
            for closeable in (tx, rx, tap.front, tap.back):
                closeable.close()
            ctx.term()
        return Audited(t_res, r_res, tap.wire, calls)

    return asyncio.run(main())


# --- the tests --------------------------------------------------------------------------------
@pytest.mark.parametrize("y0", [1e-5, 2e-3])
def test_the_leak_a_block_pays_for_covers_everything_on_the_wire(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, y0: float
) -> None:
    """The auditor: capture every message of a block that produced key, classify every
    field, bound what the messages can disclose, and check that the final length was
    computed with at least that leak. With many background clicks (``y0`` per pulse) the
    vacuum events would earn credit ``s_Z0``, which the receiver's messages cost."""
    block = run_tapped_block(tmp_path, monkeypatch, _synth(y0))
    assert block.tx.ok and block.rx.ok, (block.tx.abort_reason, block.rx.abort_reason)
    assert block.tx.key_bytes == block.rx.key_bytes

    # every message authenticated: a per-message check, and two transcript tags each way
    assert all({"_auth", "_mac"} <= set(w.msg.header) for w in block.wire)
    tagged = [(w.sender, w.msg.kind) for w in block.wire if "_tag" in w.msg.header]
    assert tagged == [("rx", "pe"), ("tx", "pe_reply"), ("tx", "pa"), ("rx", "done")]

    bound = leak_bound_from_wire(block.wire, PARAMS)
    assert bound.ec_parity_bits == block.tx.stats.ec_disclosed_bits > 0
    assert bound.verification_bits == 128
    assert bound.error_count_bits == integer_bits(block.tx.stats.sifted_z) > 0

    accounted = block.tx.stats.leak
    assert accounted["total_bits"] >= bound.total_bits
    for item in ("ec_parity_bits", "verification_bits", "error_count_bits"):
        assert accounted[item] >= getattr(bound, item), item
    assert accounted["vacuum_credit_bits"] >= bound.vacuum_credit_bits - 1e-6
    if y0 > 1e-4:
        assert bound.vacuum_credit_bits > 1000

    # The length on the wire is the formula's output for a lambda_EC covering the bound.
    pa = next(w.msg for w in block.wire if w.msg.kind == "pa")
    final = [(leak, out) for leak, out in block.key_length_calls if out == pa.header["m"]]
    assert final, "the final length was not computed by finitekey.secret_key_length"
    leak_ec_bits, _ = final[-1]
    assert leak_ec_bits + math.log2(2 / PARAMS.eps_cor) >= bound.total_bits - 1e-6
    assert block.tx.stats.secret_bits == pa.header["m"]


def test_an_unclassified_field_fails_the_audit() -> None:
    """A key-dependent field added to a message without accounting is caught: here the
    per-class Z error counts that the receiver's last Cascade message used to carry."""
    done = PeerMessage("ec_q", {"done": True, "z_errors": [3, 1, 0], "_auth": {}}, [])
    with pytest.raises(AssertionError, match="z_errors"):
        classify([Wire("rx", done)])
    extra = PeerMessage("verify_reply", {"ok": True}, [b"\x01"])
    with pytest.raises(AssertionError, match="verify_reply"):
        classify([Wire("rx", extra)])
    assert classify([Wire("rx", PeerMessage("ec_q", {"done": True, "z_error_count": 4}, []))])


def test_block_leak_lambda_ec() -> None:
    leak = BlockLeak(
        ec_parity_bits=1000, verification_bits=128, error_count_bits=20, vacuum_credit_bits=5.5
    )
    assert leak.total_bits == 1153.5
    # the formula subtracts log2(2 / eps_cor) itself: lambda_EC adds only the rest
    assert leak.lambda_ec(1e-15) == pytest.approx(1153.5 - math.log2(2e15))
    short = BlockLeak(ec_parity_bits=10, verification_bits=32)
    assert short.lambda_ec(1e-15) == 10
    assert [integer_bits(n) for n in (0, 1, 2, 3, 4, 255, 256)] == [0, 1, 2, 2, 3, 8, 9]
    with pytest.raises(ValueError):
        integer_bits(-1)


def test_key_slot_floor() -> None:
    floor = sifting.KeySlotFloor(100)
    floor.claim(np.array([100, 101, 150], np.int64))
    assert floor.floor == 151
    with pytest.raises(sifting.SiftingError, match="below the first usable slot 151"):
        floor.claim(np.array([150, 200], np.int64))
    with pytest.raises(sifting.SiftingError, match="repeat"):
        floor.claim(np.array([300, 300], np.int64))
    with pytest.raises(sifting.SiftingError, match="out of order"):
        floor.claim(np.array([310, 305], np.int64))
    assert floor.floor == 151  # nothing was disclosed about refused slots
    floor.claim(np.array([151], np.int64))
    assert floor.floor == 152
    floor.disclosed(np.array([400, 420], np.int64))
    floor.key_states_from(410)  # never moves down
    assert floor.floor == 421
    floor.key_states_from(1000)
    assert floor.floor == 1000
    floor.claim(np.zeros(0, np.int64))
    assert floor.floor == 1000


def test_transmitter_refuses_slots_below_its_own_floor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Detections announced from before the transmitter's key states began (a forged start
    slot on the coordination channel, say) end the block at sifting: no key on either side,
    and nothing of the transmitter's states disclosed."""
    synth = _synth()
    middle = int(synth.slot_index[synth.slot_index.shape[0] // 2])
    floor = sifting.KeySlotFloor(middle)
    block = run_tapped_block(tmp_path, monkeypatch, synth, key_slots=floor)
    assert not block.tx.ok and not block.rx.ok
    assert "below the first usable slot" in block.tx.abort_reason
    assert [w.msg.kind for w in block.wire if w.sender == "tx"] == ["abort"]
    assert floor.floor == middle
