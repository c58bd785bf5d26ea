"""One key block between the two nodes: sifting -> estimation -> Cascade -> verification ->
privacy amplification, the whole transcript authenticated (see :mod:`.auth`).

Message sequence (R = receiver, T = transmitter; [tag j] = the message ends a phase and
carries the sender's j-th tag over everything both sides sent and received so far)::

    R->T sift        announced slots (compact gaps) + receiver bases (packed bits)
    T->R sift_reply  basis-match mask + intensity class of every matched detection
    R->T pe [tag 1]  receiver's X-basis bits (the X basis is disclosed for estimation)
    T->R pe_reply [tag 1]   X error rate, Cascade seed and schedule
    R->T ec_q / T->R ec_a   Cascade per frame: block parities, then batched parity
                     queries per round (frames interleaved, one query each in flight)
    R->T ec_q done   the total number of Z errors corrected
    T->R verify      public hash key + transmitter's tag;  R->T verify_reply ok flag
    T->R pa [tag 2]  final length + Toeplitz seed, whether T holds the block's key
                     (stored, pending) and its advice on the next block's size
    R->T done [tag 2]  whether R committed the key (T stored it and so did R)
    either           abort (reason) at any point (not authenticated: it only ends a block)

One block is one conversation: the receiver's ``sift`` starts it (the transmitter learns
of the block from it, with the number of slots it spans), and the two-phase commit of the
block's keys rides on its last round trip. Each side hands the key to its
:class:`KeyLanding`: the transmitter stores it (pending) before ``pa``, the receiver
stores it and, when both hold it, commits it before ``done``; the transmitter commits on
``done``. A lost ``done`` leaves the transmitter's copy pending and the landing told
(``unconfirmed``): the pair's key-ID sync settles the block, no key is served meanwhile.

Checkpoints: the transmitter estimates only after verifying the receiver's tag 1 (sifting
and its X bits are authentic), the receiver runs Cascade only after verifying the
transmitter's tag 1; the receiver computes and outputs its key only after verifying the
transmitter's tag 2 (the whole transcript, both directions), the transmitter only after
verifying the receiver's tag 2. Everything in between is acted upon before it is
authenticated information-theoretically and is covered by the next checkpoint: a change
anywhere aborts the block before any key is kept. (Each message's computational check
refuses a changed message at once, so no code, Cascade in particular, runs on it.)

What each message discloses about the key, and how the final length pays for it, is in
:mod:`.leak` and docs/architecture.md ("Leak accounting").

Any failure (authentication, ordering, timeout, estimation, verification) aborts the block
on both sides: no key, and the auth pool stays consistent (see :mod:`.auth`). The last
message (``done``) cannot be confirmed: if it is lost or tampered with, the receiver may
hold a committed key that the transmitter holds pending, and the key-ID sync settles it.
"""

from __future__ import annotations

import asyncio
import functools
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import structlog

from drivers.interfaces import PreparedStates
from qkdnode.postproc import cascade, finitekey, finitekey_model, sifting, toeplitz, verify
from qkdnode.postproc.auth import AuthenticatedTransport, AuthError
from qkdnode.postproc.block_wire import (
    PeerAbortError,
    ProtocolAbortError,
    expect,
    run_cascade,
    serve_cascade,
)
from qkdnode.postproc.blockstats import BlockStats
from qkdnode.postproc.leak import BlockLeak, integer_bits
from qkdnode.postproc.params import PostprocParams
from qkdnode.postproc.transport import PeerMessage, TransportError

log = structlog.get_logger(__name__)
_T = TypeVar("_T")

U8 = npt.NDArray[np.uint8]


class KeyLanding(Protocol):
    """Where a block's key goes, on one side: the two-phase commit inside the block.

    ``store`` keeps the key pending (never served) and says whether it could (a full or
    failing store drops the block: False); ``commit`` makes it available and says whether
    it could (False: the block stays pending here and the landing has put the pair out of
    step, so the key-ID sync settles it); ``discard`` drops it; ``unconfirmed``: the
    outcome on the other side is unknown (the block stays pending until the pair's key-ID
    sync settles it). ``key`` is the 0/1 array of the block's final key (after the
    authentication reserve). None of them raises: a store's failure is the landing's to
    report.
    """

    async def store(self, block_id: int, key: U8, stats: BlockStats) -> bool: ...

    async def commit(self, block_id: int) -> bool: ...

    async def discard(self, block_id: int) -> None: ...

    async def unconfirmed(self, block_id: int, why: str) -> None: ...


@dataclass
class BlockResult:
    """Outcome of one block. ``key`` (0/1 uint8 array) is never shown by repr/str.

    ``committed``: the block's keys were committed on this side through its
    :class:`KeyLanding`. ``advised_block_detections`` (receiver): the transmitter's advice
    on the size of the next block (None: none given)."""

    ok: bool
    block_id: int
    stats: BlockStats
    abort_reason: str = ""
    key: U8 | None = field(default=None, repr=False)
    committed: bool = False
    advised_block_detections: int | None = None

    @property
    def key_bytes(self) -> bytes:
        return b"" if self.key is None else np.packbits(self.key).tobytes()

    def __str__(self) -> str:
        return repr(self)


class _Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._t
        self._t = now


def _counts(values: U8, classes: U8) -> list[int]:
    return [int(np.count_nonzero(values[classes == k])) for k in range(3)]


def _error_count(done: dict[str, Any], n_bits: int) -> int:
    """The receiver's total Z error count from its final ``ec_q``: an integer in 0..n_bits
    (only the total is sent: it is what the leak accounting counts, see :mod:`.leak`)."""
    count = done.get("z_error_count")
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= n_bits:
        raise ProtocolAbortError(f"ec_q done needs z_error_count in 0..{n_bits}, got {count!r}")
    return count


async def _finish(
    t: AuthenticatedTransport, block_id: int, exc: BaseException, stats: BlockStats
) -> BlockResult:
    reason = f"{type(exc).__name__}: {exc}"
    log.warning("postproc_block_abort", block_id=block_id, reason=reason)
    # Tell the peer (it would otherwise wait for a timeout), also after a failed tag: an
    # abort notice costs no key and can only end the block, never make it succeed.
    if not isinstance(exc, (TransportError, PeerAbortError)):
        try:
            await t.send("abort", {"reason": reason[:200]}, [])
        except Exception:
            pass
    _record_auth(stats, t)
    t.pool.save()
    return BlockResult(False, block_id, stats, abort_reason=reason)


def _record_auth(stats: BlockStats, t: AuthenticatedTransport) -> None:
    stats.auth_bits_sent = t.sent_pad_bits
    stats.auth_bits_received = t.recv_pad_bits
    stats.auth_tags_sent = t.tags_sent
    stats.auth_tags_verified = t.tags_verified
    stats.auth_forgery_bound = t.forgery_bound


def _split_key(final: U8, reserve_bits: int) -> tuple[U8, bytes, bytes]:
    reserve = np.packbits(final[:reserve_bits]).tobytes()
    half = len(reserve) // 2
    return final[reserve_bits:], reserve[:half], reserve[half:]


def _succeed(
    t: AuthenticatedTransport,
    block_id: int,
    final: U8,
    *,
    ell: int,
    reserve: int,
    stats: BlockStats,
) -> BlockResult:
    """Both sides, after privacy amplification: refill the auth pool, record, return."""
    key, t2r, r2t = _split_key(final, reserve)
    t.pool.add_segment(block_id, t2r, r2t)
    _record_key(stats, key, ell, reserve)
    _record_auth(stats, t)
    log.info("postproc_block_ok", block_id=block_id, final_key_bits=int(key.shape[0]))
    return BlockResult(True, block_id, stats, key=key)


def _record_key(stats: BlockStats, key: U8, ell: int, reserve: int) -> None:
    stats.final_key_bits = int(key.shape[0])
    stats.secret_bits = ell
    stats.auth_reserve_bits = reserve


def _reserve_bits(params: PostprocParams, spent_bits: int) -> int:
    # Replace what this block spent (both directions) plus a margin for the next block.
    need = spent_bits + params.auth_reserve_bits
    return int(math.ceil(need / 256) * 256)


async def run_block_transmitter(
    transport: AuthenticatedTransport,
    block_id: int,
    prepared: Callable[[npt.NDArray[np.int64]], PreparedStates],
    params: PostprocParams,
    *,
    z_over_x_error_ratio: float | None = None,
    key_slots: sifting.KeySlotFloor | None = None,
    first: PeerMessage | None = None,
    landing: KeyLanding | None = None,
    advice: int | None = None,
) -> BlockResult:
    """Transmitter side of one block. Never raises for protocol failures: returns ok=False.

    ``first``: the block's ``sift``, already read (the exchange learns of a new block from
    it). ``landing``: where the key goes (None: kept in the result only, nothing stored or
    committed). ``advice``: the next block's size to advise the receiver (detections).

    ``key_slots``: the transmitter's own floor of usable slots (see
    :class:`.sifting.KeySlotFloor`); the announced slots are claimed from it before any
    state is looked up. Without it, the slots must still be strictly increasing.

    The Cascade block sizes follow this block's X-basis error rate times
    ``z_over_x_error_ratio``, the ratio of Z- to X-basis error rates measured on an earlier
    block (clipped to [0.1, 2]; None: 1). The two bases need not err alike (time-bin
    encodings err more in the phase basis), and block sizes chosen for a too-high error rate
    disclose more than needed. The schedule is public and the disclosure counted exactly,
    so a wrong guess costs efficiency or round trips, never security.
    """
    t = transport
    t.begin_block(block_id, first)
    clock = _Clock()
    stats = BlockStats(block_id=block_id, seconds=clock.seconds)
    stored = False
    try:
        msg = await expect(t, "sift", params)
        slots = await asyncio.to_thread(sifting.decode_slots, msg.header["slots"], msg.buffers[:2])
        stats.withheld_slots = (key_slots or sifting.KeySlotFloor()).claim(slots)
        n = int(slots.shape[0])
        bob_basis = sifting.unpack_bits(msg.buffers[2], n)
        states = await asyncio.to_thread(prepared, slots)
        if states.basis.shape != (n,):
            raise ProtocolAbortError("prepared() returned the wrong number of states")
        match = sifting.basis_match(states.basis, bob_basis)
        cls = states.intensity[match].astype(np.uint8)
        await t.send(
            "sift_reply",
            {"n_matched": int(match.sum())},
            [sifting.pack_bits(match.astype(np.uint8)), sifting.pack_trits(cls)],
        )
        basis_m = states.basis[match]
        bits_m = states.bit[match]
        is_z = basis_m == 0
        stats.detections = n
        stats.sifted_z = int(is_z.sum())
        stats.sifted_x = int((~is_z).sum())
        # kept here (never sent): what the link fit for the next blocks takes
        stats.detections_per_class = [
            int(c) for c in np.bincount(states.intensity.astype(np.int64), minlength=3)[:3]
        ]
        stats.rx_basis_z_fraction = float(np.mean(bob_basis == 0)) if n else 0.0
        clock.lap("sifting")

        msg = await expect(t, "pe", params, tagged=True)  # checkpoint: sifting + X bits
        x_bits_bob = sifting.unpack_bits(msg.buffers[0], int((~is_z).sum()))
        x_err = (bits_m[~is_z] ^ x_bits_bob).astype(np.uint8)
        cls_x, cls_z = cls[~is_z], cls[is_z]
        counts = finitekey_model.DecoyCounts(
            n_z=tuple(float(c) for c in np.bincount(cls_z, minlength=3)[:3]),  # type: ignore[arg-type]
            n_x=tuple(float(c) for c in np.bincount(cls_x, minlength=3)[:3]),  # type: ignore[arg-type]
            m_x=tuple(float(c) for c in _counts(x_err, cls_x)),  # type: ignore[arg-type]
        )
        est = finitekey.estimate_from_params(counts, params)
        n_x = max(1, x_err.shape[0])
        qber_x = float(x_err.sum()) / n_x
        stats.qber_x = qber_x
        stats.qber_x_per_class = [
            m / max(1.0, c) for m, c in zip(counts.m_x, counts.n_x, strict=True)
        ]
        stats.decoy = est.as_dict()
        key_a = bits_m[is_z].astype(np.uint8)
        optimistic = finitekey.secret_key_length(
            est, key_a.shape[0] * cascade.binary_entropy(qber_x), params.eps_sec, params.eps_cor
        )
        reason = ""
        if key_a.shape[0] < params.min_sifted_bits:
            reason = f"too few sifted Z bits ({key_a.shape[0]} < {params.min_sifted_bits})"
        elif qber_x > params.qber_abort:
            reason = f"X-basis error rate {qber_x:.4f} above qber_abort {params.qber_abort}"
        elif optimistic <= 0:
            reason = "finite-key analysis allows no key (phase error or statistics)"
        if reason:
            raise ProtocolAbortError(reason)
        ec_seed = secrets.randbits(63)
        ratio = 1.0 if z_over_x_error_ratio is None else min(2.0, max(0.1, z_over_x_error_ratio))
        frames = cascade.frame_count(key_a.shape[0], params.cascade)
        shortest = key_a.shape[0] // frames
        levels = cascade.schedule(shortest, qber_x * ratio, params.cascade)
        stats.ec_levels, stats.ec_frames = levels, frames
        await t.send(
            "pe_reply",
            {"ec_seed": ec_seed, "levels": levels, "frames": frames, "qber_x": qber_x},
            [],
            tag=True,
        )
        clock.lap("estimation")

        # Heavy set-up (permutations of the whole key) off the event loop, in a worker
        # thread: the node keeps answering its control socket and heartbeats meanwhile.
        build = functools.partial(cascade.frame_responder, key_a, levels, ec_seed, frames)
        done, responders = await serve_cascade(t, build, frames, params.recv_timeout_s)
        n_z = int(key_a.shape[0])
        z_err = _error_count(done, n_z)
        leak_ec = sum(r.disclosed_bits for r in responders)
        stats.ec_disclosed_bits = leak_ec
        stats.qber_z = z_err / max(1, n_z)
        stats.ec_efficiency = leak_ec / max(
            1e-12, n_z * cascade.binary_entropy(z_err / max(1, n_z))
        )
        clock.lap("error_correction")

        if verify.collision_bound(key_a.shape[0]) > params.eps_cor:
            raise ProtocolAbortError("verification hash too weak for eps_cor at this size")
        hash_key = secrets.token_bytes(verify.HASH_KEY_BYTES)
        tag = await asyncio.to_thread(verify.key_tag, key_a, hash_key)
        await t.send("verify", {"hash_key": hash_key.hex(), "tag": tag.hex()}, [])
        msg = await expect(t, "verify_reply", params)
        if not msg.header.get("ok"):
            raise ProtocolAbortError("verification hash mismatch: block discarded")
        leak = BlockLeak(
            ec_parity_bits=leak_ec,
            verification_bits=verify.TAG_BITS,
            error_count_bits=integer_bits(n_z),
            vacuum_credit_bits=est.s_z0_lower,
        )
        stats.verification_bits = verify.TAG_BITS
        stats.leak = leak.as_dict()
        clock.lap("verification")

        ell = finitekey.secret_key_length(
            est, leak.lambda_ec(params.eps_cor), params.eps_sec, params.eps_cor
        )
        reserve = _reserve_bits(params, t.sent_pad_bits + t.recv_pad_bits + 1024)
        if ell <= reserve:
            raise ProtocolAbortError(
                f"secret key length {ell} does not exceed the auth reserve {reserve}"
            )
        n_seed = toeplitz.pa_seed_bits(key_a.shape[0], ell)
        seed = np.frombuffer(secrets.token_bytes((n_seed + 7) // 8), np.uint8)
        seed_bits = np.unpackbits(seed, count=n_seed)
        # The key first, stored pending: the receiver commits only if we hold it.
        final = await asyncio.to_thread(toeplitz.pa_hash, key_a, seed_bits, ell)
        key = final[reserve:]
        _record_key(stats, key, ell, reserve)
        if landing is not None:
            stored = await landing.store(block_id, key, stats)
        pa: dict[str, Any] = {"m": ell, "reserve": reserve, "stored": stored}
        if advice is not None:
            pa["next_block_detections"] = int(advice)
        await t.send("pa", pa, [sifting.pack_bits(seed_bits)], tag=True)
        msg = await expect(t, "done", params, tagged=True)  # the receiver verified everything
        clock.lap("privacy_amplification")
        peer_committed = msg.header.get("committed") is True
        committed = False
        if stored and landing is not None:
            if peer_committed:
                # False: pending here, the pair out of step until the key-ID sync
                committed = await landing.commit(block_id)
            else:
                await landing.discard(block_id)
                log.warning("block_discarded_peer_has_no_key", block_id=block_id)
        result = _succeed(t, block_id, final, ell=ell, reserve=reserve, stats=stats)
        result.committed = committed
        return result
    except (ProtocolAbortError, AuthError, TransportError, ValueError, KeyError, IndexError) as exc:
        if stored and landing is not None:
            # Stored here, perhaps committed there: pending until the key-ID sync.
            await landing.unconfirmed(block_id, f"{type(exc).__name__}: {exc}")
        return await _finish(t, block_id, exc, stats)
    except asyncio.CancelledError:
        # Cancelled by a state change (an operator's stop, a pass's end...) with the key
        # stored here, perhaps committed there: the same as a lost message.
        if stored and landing is not None:
            await landing.unconfirmed(block_id, "block cancelled")
        raise


async def run_block_receiver(
    transport: AuthenticatedTransport,
    block_id: int,
    slot_index: npt.NDArray[np.int64],
    channel: npt.NDArray[np.int8],
    params: PostprocParams,
    *,
    rng: np.random.Generator | None = None,
    pulses: int = 0,
    landing: KeyLanding | None = None,
) -> BlockResult:
    """Receiver side of one block. ``rng`` resolves multi-click slots (default: OS entropy).

    ``pulses``: the slots the block's detections span, announced with ``sift``.
    ``landing``: where the key goes (None: kept in the result only)."""
    t = transport
    t.begin_block(block_id)
    clock = _Clock()
    stats = BlockStats(block_id=block_id, seconds=clock.seconds)
    rng = rng or np.random.default_rng()
    stored = False
    try:
        slots, basis, bits = await asyncio.to_thread(sifting.squash, slot_index, channel, rng)
        slot_header, slot_bufs = await asyncio.to_thread(sifting.encode_slots, slots)
        await t.send(
            "sift",
            {"slots": slot_header, "pulses": int(pulses)},
            [*slot_bufs, sifting.pack_bits(basis)],
        )
        msg = await expect(t, "sift_reply", params)
        n = int(slots.shape[0])
        match = sifting.unpack_bits(msg.buffers[0], n).astype(np.bool_)
        n_m = int(match.sum())
        cls = sifting.unpack_trits(msg.buffers[1], n_m)
        basis_m, bits_m = basis[match], bits[match]
        is_z = basis_m == 0
        stats.detections = int(slot_index.shape[0])
        stats.sifted_z = int(is_z.sum())
        clock.lap("sifting")

        await t.send("pe", {}, [sifting.pack_bits(bits_m[~is_z])], tag=True)
        msg = await expect(t, "pe_reply", params, tagged=True)
        levels = [int(x) for x in msg.header["levels"]]
        ec_seed = int(msg.header["ec_seed"])
        frames = int(msg.header["frames"])
        key_b = bits_m[is_z].astype(np.uint8)
        cascade.frame_bounds(key_b.shape[0], frames)  # the peer's frame count, checked
        stats.qber_x = float(msg.header["qber_x"])
        clock.lap("estimation")

        build = functools.partial(cascade.frame_corrector, key_b, levels, ec_seed, frames)
        correctors = await run_cascade(t, build, frames, params.recv_timeout_s)
        key_c = np.concatenate([c.corrected() for c in correctors])
        z_err = _counts((key_c ^ key_b).astype(np.uint8), cls[is_z])  # per class: not sent
        await t.send("ec_q", {"done": True, "z_error_count": sum(z_err)}, [])
        n_z_class = np.bincount(cls[is_z], minlength=3)[:3]
        stats.ec_disclosed_bits = sum(c.stats.disclosed_bits for c in correctors)
        stats.ec_rounds = max(c.stats.rounds for c in correctors)
        stats.qber_z = sum(z_err) / max(1, key_b.shape[0])
        stats.qber_z_per_class = [e / max(1, int(c)) for e, c in zip(z_err, n_z_class, strict=True)]
        clock.lap("error_correction")

        msg = await expect(t, "verify", params)
        tag = await asyncio.to_thread(
            verify.key_tag, key_c, bytes.fromhex(str(msg.header["hash_key"]))
        )
        ok = tag.hex() == msg.header["tag"]
        await t.send("verify_reply", {"ok": ok}, [])
        if not ok:
            raise ProtocolAbortError("verification hash mismatch: block discarded")
        stats.verification_bits = verify.TAG_BITS
        clock.lap("verification")

        msg = await expect(t, "pa", params, tagged=True)  # the whole transcript so far
        ell, reserve = int(msg.header["m"]), int(msg.header["reserve"])
        peer_stored = msg.header.get("stored") is True
        advised = msg.header.get("next_block_detections")
        n_seed = toeplitz.pa_seed_bits(key_c.shape[0], ell)
        seed_bits = sifting.unpack_bits(msg.buffers[0], n_seed)
        final = await asyncio.to_thread(toeplitz.pa_hash, key_c, seed_bits, ell)
        key = final[reserve:]
        _record_key(stats, key, ell, reserve)
        committed = False
        # Both hold it durably once ours is stored: commit before we say so.
        if landing is not None and await landing.store(block_id, key, stats):
            stored = True
            if peer_stored:
                committed = await landing.commit(block_id)
            else:
                await landing.discard(block_id)
        try:
            await t.send("done", {"committed": committed}, [], tag=True)
        except TransportError as exc:
            if committed and landing is not None:  # ours committed, the transmitter's pending
                await landing.unconfirmed(block_id, f"'done' not sent: {exc}")
            raise
        clock.lap("privacy_amplification")
        result = _succeed(t, block_id, final, ell=ell, reserve=reserve, stats=stats)
        result.committed = committed
        if isinstance(advised, int) and not isinstance(advised, bool) and advised > 0:
            result.advised_block_detections = advised
        return result
    except (ProtocolAbortError, AuthError, TransportError, ValueError, KeyError, IndexError) as exc:
        return await _finish(t, block_id, exc, stats)
    except asyncio.CancelledError:
        # Cancelled once our copy was stored (a commit in its worker thread may even
        # finish after this): whatever the transmitter holds, the key-ID sync settles it.
        if stored and landing is not None:
            await landing.unconfirmed(block_id, "block cancelled")
        raise
