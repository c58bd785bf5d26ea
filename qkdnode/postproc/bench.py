"""Benchmarks of the post-processing cores (medians of repeated runs).

Run: ``.venv/bin/python -m qkdnode.postproc.bench [--quick]``.
"""

from __future__ import annotations

import asyncio
import functools
import math
import multiprocessing as mp
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import zmq
import zmq.asyncio

from drivers.interfaces import PreparedStates
from qkdnode.postproc import auth, cascade, sifting, toeplitz
from qkdnode.postproc.block_wire import run_cascade, serve_cascade
from qkdnode.postproc.params import CascadeParams, PostprocParams
from qkdnode.postproc.pipeline import run_block_receiver, run_block_transmitter
from qkdnode.postproc.transport import ZmqPairTransport


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _row(name: str, value: float, unit: str, target: str, note: str) -> dict[str, object]:
    return {"name": name, "value": value, "unit": unit, "target": target, "note": note}


def bench_sifting(n: int, repeats: int) -> dict[str, object]:
    rng = np.random.default_rng(0)
    slots = np.cumsum(rng.integers(1, 2000, n)).astype(np.int64)
    channel = rng.integers(0, 4, n).astype(np.int8)
    alice_basis = rng.integers(0, 2, n).astype(np.uint8)

    def run() -> None:
        s, b, _ = sifting.squash(slots, channel, rng)
        head, bufs = sifting.encode_slots(s)
        dec = sifting.decode_slots(head, bufs)
        bb = sifting.unpack_bits(sifting.pack_bits(b), dec.shape[0])
        sifting.pack_bits(sifting.basis_match(alice_basis, bb).astype(np.uint8))

    t = _median_s(run, repeats)
    return _row(
        "sifting_throughput",
        n / t / 1e6,
        "M detections/s",
        ">= 30",
        f"squash+encode+decode+match, {n} detections, 1 core",
    )


def _cascade_inputs(n: int, qber: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.random.default_rng(seed).integers(0, 2, n, dtype=np.uint8)
    e = (np.random.default_rng(1000 + seed).random(n) < qber).astype(np.uint8)
    return a, a ^ e


def doubling_levels(n: int, qber: float) -> list[int]:
    """The schedule the nodes ran before :func:`cascade.schedule` (four passes, blocks of
    ~1.4 / QBER bits doubling from pass to pass): the same-run reference of the efficiency
    rows."""
    cap = max(1, math.ceil(math.log2(n)))
    first = min(cap, max(1, round(math.log2(1.4 / max(qber, 0.005)))))
    return [min(cap, first + i) for i in range(4)]


@dataclass
class EfficiencyRun:
    """Cascade on ``frames`` random frames: f against each frame's own error rate (the
    literature's "realistic" efficiency), round trips, frames left with an error."""

    f: list[float]
    rounds: list[int]
    residual_frames: int


def cascade_efficiency_run(n: int, qber: float, frames: int, levels: list[int]) -> EfficiencyRun:
    run = EfficiencyRun([], [], 0)
    for seed in range(frames):
        a, b = _cascade_inputs(n, qber, seed)
        alice = cascade.CascadeResponder(a, levels, seed)
        bob = cascade.CascadeCorrector(b, levels, seed)
        bob.set_block_parities(alice.block_parities())
        while (q := bob.next_queries()) is not None:
            bob.give_answers(alice.node_parities(q))
        run.residual_frames += int(not np.array_equal(bob.corrected(), a))
        run.f.append(bob.stats.disclosed_bits / (n * cascade.binary_entropy(float((a ^ b).mean()))))
        run.rounds.append(bob.stats.rounds)
    return run


def bench_cascade_efficiency(
    n: int, qber: float, frames: int, target: str
) -> tuple[dict[str, object], EfficiencyRun]:
    """Median f of :func:`cascade.schedule` on ``frames`` frames, beside the doubling
    schedule of before on the same frames (:func:`doubling_levels`); the row and the run."""
    levels = cascade.schedule(n, qber, CascadeParams())
    now = cascade_efficiency_run(n, qber, frames, levels)
    old = cascade_efficiency_run(n, qber, frames, doubling_levels(n, qber))
    f_now, f_old = statistics.median(now.f), statistics.median(old.f)
    row = _row(
        f"cascade_f_q{qber:g}_n{n:g}",
        f_now,
        "f",
        target,
        f"disclosed / (n h(e)), e each frame's own error rate; median of {frames} frames, "
        f"{now.residual_frames} left with errors; {statistics.median(now.rounds):.0f} round "
        f"trips; passes {levels}. Same frames, 4-pass doubling schedule of before: f "
        f"{f_old:.4f} (ratio {f_now / f_old:.3f}), {statistics.median(old.rounds):.0f} round "
        f"trips, {old.residual_frames} left with errors",
    )
    return row, now


def residual_frames_row(n: int, left: dict[float, EfficiencyRun]) -> dict[str, object]:
    """Frames of ``n`` bits left with an error after Cascade (the verification hash would
    then drop the block), from the efficiency runs at each error rate."""
    frames = sorted({len(r.f) for r in left.values()})
    return _row(
        f"cascade_residual_frames_n{n:g}",
        float(sum(r.residual_frames for r in left.values())),
        "frames",
        "<= 0",
        f"frames of {n:g} bits left with an error, {frames[0]} frames at each QBER: "
        + ", ".join(f"{q:g}: {r.residual_frames}" for q, r in left.items()),
    )


def bench_cascade_in_process(n: int, qber: float, repeats: int) -> list[dict[str, object]]:
    times, rounds = [], []
    for seed in range(repeats):
        a, b = _cascade_inputs(n, qber, seed)
        t0 = time.perf_counter()
        out, st = cascade.reconcile_local(a, b, qber, CascadeParams(), seed)
        times.append(time.perf_counter() - t0)
        rounds.append(st.rounds)
        assert np.array_equal(out, a)
    return [
        _row(
            "cascade_in_process_mbit_per_s",
            n / statistics.median(times) / 1e6,
            "Mbit/s",
            "",
            f"n={n:g}, QBER {qber:g}, both sides in one process incl. set-up",
        ),
        _row(
            "cascade_round_trips_per_block",
            statistics.median(rounds),
            "round trips",
            "",
            f"n={n:g}, QBER {qber:g}, block parities included",
        ),
    ]


def _ec_server(endpoint_q: Any, n: int, qber: float, blocks: int, frames: int) -> None:
    async def main() -> None:
        cascade.warm_up()  # numba's cached kernels load on first use: not in the timings
        ctx = zmq.asyncio.Context()
        tr = ZmqPairTransport.bind_random(ctx)
        endpoint_q.put(tr.endpoint)
        while (msg := await tr.recv(30.0)).kind == "ping":  # bare round trips first
            await tr.send("pong", {}, msg.buffers)
        cpus = []
        for b in range(blocks):
            a, _ = _cascade_inputs(n, qber, b)
            levels = cascade.schedule(n // frames, qber, CascadeParams())
            c0 = time.process_time()
            build = functools.partial(cascade.frame_responder, a, levels, b, frames)
            await serve_cascade(tr, build, frames, 30.0)
            cpus.append(time.process_time() - c0)
        endpoint_q.put(statistics.median(cpus))
        tr.close()
        ctx.term()

    asyncio.run(main())


def bench_cascade_loopback(n: int, qber: float, blocks: int, frames: int) -> dict[str, object]:
    """Cascade between two processes over loopback, the key cut into ``frames`` frames
    reconciled concurrently (as the nodes do: ``CascadeParams.frames``)."""
    ctxmp = mp.get_context("spawn")
    q: Any = ctxmp.Queue()
    proc = ctxmp.Process(target=_ec_server, args=(q, n, qber, blocks, frames))
    proc.start()
    endpoint = q.get(timeout=60)
    times: list[float] = []
    cpus: list[float] = []
    rounds: list[int] = []
    rtts: list[float] = []
    cascade.warm_up()

    async def client() -> None:
        ctx = zmq.asyncio.Context()
        tr = ZmqPairTransport.connect(ctx, endpoint)
        # The floor of this machine: bare round trips of a small message on the same sockets.
        payload = np.zeros(256, dtype=np.uint8)
        for _ in range(300):
            t0 = time.perf_counter()
            await tr.send("ping", {}, [payload])
            await tr.recv(30.0)
            rtts.append(time.perf_counter() - t0)
        await tr.send("go", {}, [])
        for b in range(blocks):
            a, bob = _cascade_inputs(n, qber, b)
            levels = cascade.schedule(n // frames, qber, CascadeParams())
            t0, c0 = time.perf_counter(), time.process_time()
            build = functools.partial(cascade.frame_corrector, bob, levels, b, frames)
            corr = await run_cascade(tr, build, frames, 30.0)
            await tr.send("ec_q", {"done": True, "z_error_count": 0}, [])
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            rounds.append(max(c.stats.rounds for c in corr))
            assert np.array_equal(np.concatenate([c.corrected() for c in corr]), a)
        tr.close()
        ctx.term()

    try:
        asyncio.run(client())
        server_cpu_s = q.get(timeout=30)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    t_med, rtt = statistics.median(times), statistics.median(rtts[50:])
    r_med = statistics.median(rounds)
    overlap = (
        f"{frames} frames of {n // frames:g} bits concurrently, {r_med:.0f} round trips each"
        if frames > 1
        else f"1 frame, {r_med:.0f} round trips"
    )
    return _row(
        f"cascade_two_process_n{n:g}_f{frames}_mbit_per_s",
        n / t_med / 1e6,
        "Mbit/s",
        # The target is for the nodes' frames at a block's size; at 1e6 bits the 100-200
        # round trips alone take longer than 0.04 s on a loopback round trip of >= 250 us.
        ">= 25" if frames == cascade.frame_count(n, CascadeParams()) and n >= 8_000_000 else "",
        f"n={n:g}, QBER {qber:g}, zmq PAIR tcp loopback, no auth, incl. set-up of both sides; "
        f"{overlap}; {t_med:.2f} s per key, CPU receiver {statistics.median(cpus):.2f} s, "
        f"transmitter {server_cpu_s:.2f} s (medians); "
        f"bare round trip {rtt * 1e6:.0f} us (same run)",
    )


def _bare_transforms(n: int, m: int) -> Callable[[], None]:
    """The FFT calls of ``pa_hash(n -> m)`` (:func:`toeplitz.pa_transforms`) on
    preallocated arrays, nothing else: the floor of the hash."""
    rng = np.random.default_rng(1)
    calls: list[Callable[[], object]] = []
    arrays: dict[tuple[int, int], tuple[Any, Any]] = {}  # one pair per shape, as the hash
    for t in toeplitz.pa_transforms(n, m):
        if (t.batch, t.length) not in arrays:
            arrays[t.batch, t.length] = (
                rng.random((t.batch, t.length // 2 + 1)).astype(np.complex128),
                rng.random((t.batch, t.length)),
            )
        spec, real = arrays[t.batch, t.length]
        if t.inverse:
            calls.append(
                functools.partial(
                    toeplitz.inverse_real_fft, spec, t.length, real, toeplitz.DEFAULT_WORKERS
                )
            )
        else:
            calls.append(functools.partial(toeplitz.real_fft, real, spec, toeplitz.DEFAULT_WORKERS))

    def run() -> None:
        for call in calls:
            call()

    return run


def bench_toeplitz(
    n: int, repeats: int, with_plain: bool = True, with_fft: bool = True
) -> list[dict[str, object]]:
    """Privacy amplification as the nodes run it, (I | T) x with :func:`toeplitz.pa_hash`'s
    default backend, beside the FFT path (``backend="fft"``, what ran before the carry-less
    product) and its FFT floor (the FFT path's transforms, bare), all three timed
    alternately in the same run, one thread; and a plain m x n Toeplitz. ``with_fft``
    False leaves the FFT path out (at 1e8 bits it alone takes most of a minute)."""
    rng = np.random.default_rng(0)
    m = n // 2
    x = rng.integers(0, 2, n, dtype=np.uint8)
    seed = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
    pa_seed = seed[: toeplitz.pa_seed_bits(n, m)]
    backend = toeplitz.default_backend()
    runs: dict[str, Callable[[], object]] = {
        "pa": lambda: toeplitz.pa_hash(x, pa_seed, m),
        "floor": _bare_transforms(n, m),
    }
    if with_fft and backend != "fft":
        runs["fft"] = lambda: toeplitz.pa_hash(x, pa_seed, m, backend="fft")
        # the backends are exact: a difference here is a defect, not noise
        same = np.array_equal(
            toeplitz.pa_hash(x, pa_seed, m), toeplitz.pa_hash(x, pa_seed, m, backend="fft")
        )
        if not same:
            raise RuntimeError(f"pa_hash: the {backend} and fft backends differ at n={n}")
    for run in runs.values():  # work arrays allocated once, as in a running node
        run()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, run in runs.items():
            times[k].append(_median_s(run, 1))
    med = {k: statistics.median(v) for k, v in times.items()}
    pa_s, floor_s = med["pa"], med["floor"]
    fft_s = med.get("fft", pa_s if backend == "fft" else math.nan)
    calls = toeplitz.pa_transforms(n, m)
    lengths = sorted({c.length for c in calls})
    n_fft = sum(c.batch for c in calls)
    how = {
        "vpclmul": "middle product of binary polynomials, Karatsuba over VPCLMULQDQ "
        "(AVX-512), native",
        "pclmul": "middle product of binary polynomials, Karatsuba over PCLMULQDQ, native",
        "portable": "middle product of binary polynomials, Karatsuba, portable C, native",
        "fft": "exact FFT (ducc0)",
    }[backend]
    vs_fft = f", {fft_s / pa_s:.2f}x faster than the FFT path" if "fft" in med else ""
    rows = [
        _row(
            f"toeplitz_n{n:g}",
            n / pa_s / 1e6,
            "Mbit/s input",
            ">= 50" if n == 1_000_000 else "",  # the target is for 1 Mbit blocks
            f"compression 0.5, (I|T) Toeplitz as the nodes hash, backend {backend}: {how}, "
            f"one thread; {pa_s * 1e3:.2f} ms, {floor_s / pa_s:.2f}x faster than its FFT "
            f"floor{vs_fft} (same run, medians of {repeats} alternating)",
        ),
        _row(
            f"toeplitz_fft_floor_n{n:g}",
            n / floor_s / 1e6,
            "Mbit/s input",
            "floor",
            f"the FFT path's {n_fft} real FFTs of {', '.join(str(v) for v in lengths)} "
            f"points alone, bare, on preallocated arrays, one thread; {floor_s * 1e3:.2f} ms; "
            f"median of {repeats} alternating with the hash",
        ),
    ]
    rows.append(
        _row(
            f"toeplitz_vs_fft_floor_n{n:g}",
            floor_s / pa_s,
            "x",
            "> 1" if backend != "fft" else "",
            f"the FFT floor's time over the hash's (backend {backend}), same run: above 1 "
            f"the hash beats any FFT path with these transforms",
        )
    )
    if "fft" in med:
        rows.append(
            _row(
                f"toeplitz_fft_n{n:g}",
                n / fft_s / 1e6,
                "Mbit/s input",
                "",
                f"the same hash by the FFT path (backend fft, the fallback without "
                f"PCLMULQDQ or the native extension), one thread; {fft_s * 1e3:.2f} ms, "
                f"{fft_s / floor_s:.2f}x its FFT floor; median of {repeats} alternating",
            )
        )
    if with_plain:
        t_plain = _median_s(lambda: toeplitz.toeplitz_hash(x, seed, m), repeats)
        rows.append(
            _row(
                f"toeplitz_plain_n{n:g}",
                n / t_plain / 1e6,
                "Mbit/s input",
                "",
                f"compression 0.5, m x n Toeplitz, backend {backend}, same run",
            )
        )
    return rows


def bench_auth(nbytes: int, repeats: int) -> dict[str, object]:
    data = np.zeros(nbytes, dtype=np.uint8)
    key = bytes(range(32))
    t = _median_s(lambda: auth.compute_tag(key, "ec_q", {"a": 1}, [data]), repeats)
    return _row("auth_tag_throughput", nbytes / t / 1e9, "GB/s", ">= 1", "Poly1305 (OpenSSL)")


def default_block_detections() -> int:
    """The daemon's default ``[protocol] block_detections``."""
    from qkdnode.config.sections import ProtocolSection

    return int(ProtocolSection.model_fields["block_detections"].default)


class SyntheticBlock:
    """One block of detections of a decoy-state BB84 link, drawn per detection (not per
    pulse, so a block of the daemon's default size fits in memory): the receiver's
    ``slot_index`` / ``channel`` and the transmitter's :meth:`prepared` lookup."""

    def __init__(
        self,
        n: int,
        params: PostprocParams,
        seed: int,
        *,
        eta: float = 0.1,
        y0: float = 1e-5,
        e_d: float = 0.02,
    ) -> None:
        rng = np.random.default_rng(seed)
        mus = np.array([params.mu_signal, params.mu_decoy, params.mu_vacuum])
        probs = np.array([params.p_signal, params.p_decoy, params.p_vacuum])
        p_click = 1.0 - (1.0 - y0) * np.exp(-mus * eta)  # per intensity class
        p_det = float(probs @ p_click)
        self.slot_index = np.cumsum(rng.geometric(p_det, n)).astype(np.int64)
        self.intensity = rng.choice(3, n, p=probs * p_click / p_det).astype(np.uint8)
        dark_only = rng.random(n) < (y0 * np.exp(-mus * eta) / p_click)[self.intensity]
        self.basis = (rng.random(n) >= params.p_basis_z).astype(np.uint8)
        self.bit = rng.integers(0, 2, n, dtype=np.uint8)
        bob_basis = (rng.random(n) >= params.p_basis_z).astype(np.uint8)
        flip = (rng.random(n) < e_d).astype(np.uint8)
        random_bit = rng.integers(0, 2, n, dtype=np.uint8)
        keep = (bob_basis == self.basis) & ~dark_only
        bob_bit = np.where(keep, self.bit ^ flip, random_bit)
        self.channel = (bob_basis * 2 + bob_bit).astype(np.int8)

    def prepared(self, slots: npt.NDArray[np.int64]) -> PreparedStates:
        i = np.searchsorted(self.slot_index, slots)
        return PreparedStates(self.basis[i], self.bit[i], self.intensity[i])


def run_block_pair(
    block: SyntheticBlock, params: PostprocParams, pool_dir: Path, psk: bytes, blocks: int = 1
) -> list[tuple[Any, Any, auth.AuthenticatedTransport, auth.AuthenticatedTransport]]:
    """Both nodes' sides of ``blocks`` blocks in one process over a loopback PAIR socket
    pair, through the real pipeline and authentication (pools bootstrapped from ``psk``)."""

    async def main() -> list[Any]:
        ctx = zmq.asyncio.Context()
        tx = ZmqPairTransport.bind_random(ctx)
        rx = ZmqPairTransport.connect(ctx, tx.endpoint)
        a_tx = auth.AuthenticatedTransport(
            tx, auth.AuthKeyPool.bootstrap(pool_dir / "tx.pool", psk), "transmitter"
        )
        a_rx = auth.AuthenticatedTransport(
            rx, auth.AuthKeyPool.bootstrap(pool_dir / "rx.pool", psk), "receiver"
        )
        out = []
        try:
            for b in range(blocks):
                t_res, r_res = await asyncio.gather(
                    run_block_transmitter(a_tx, b, block.prepared, params),
                    run_block_receiver(a_rx, b, block.slot_index, block.channel, params),
                )
                out.append((t_res, r_res, a_tx, a_rx))
        finally:
            tx.close()
            rx.close()
            ctx.term()
        return out

    return asyncio.run(main())


def bench_auth_key_per_block(n: int | None = None) -> dict[str, object]:
    """Authentication key consumed per block and direction, through the real pipeline."""
    n = default_block_detections() if n is None else n
    params = PostprocParams(recv_timeout_s=60.0)
    block = SyntheticBlock(n, params, seed=1)
    with tempfile.TemporaryDirectory() as d:
        psk = secrets.token_bytes(auth.min_psk_bytes())
        ((t_res, r_res, a_tx, a_rx),) = run_block_pair(block, params, Path(d), psk)
    if not (t_res.ok and r_res.ok):
        raise RuntimeError(f"block failed: {t_res.abort_reason or r_res.abort_reason}")
    t2r, r2t = a_tx.sent_pad_bits, a_rx.sent_pad_bits
    return _row(
        "auth.key_bits_per_block",
        float(max(t2r, r2t)),
        "bits/direction",
        "<= 4096",
        f"{n:g} detections{' (default block)' if n == default_block_detections() else ''}, "
        f"QBER {r_res.stats.qber_z or 0.0:.3f}: "
        f"T->R {t2r} bits / {a_tx.tags_sent} tags, R->T {r2t} bits / {a_rx.tags_sent} tags, "
        f"{a_tx.messages_sent + a_rx.messages_sent} messages",
    )


#: (frame bits, QBER, target) of the efficiency rows. 1e4-bit frames against the best
#: published variants (Martinez-Mateo et al. 2015; "yanetal" and "biconf" reach 1.077-1.093
#: at 5 % and 1.092-1.111 at 10 %), and at 1-2 % against the schedule of before (1.079,
#: 1.089); 1e6-bit frames as the nodes run them.
EFFICIENCY_CASES: list[tuple[int, float, str]] = [
    (10_000, 0.01, "<= 1.079 (f of the schedule before)"),
    (10_000, 0.02, "<= 1.089 (f of the schedule before)"),
    (10_000, 0.05, "<= 1.08"),
    (10_000, 0.10, "<= 1.10"),
    (100_000, 0.03, "<= 1.06"),
    (1_000_000, 0.01, "<= 1.06"),
    (1_000_000, 0.02, "<= 1.06"),
    (1_000_000, 0.03, "<= 1.06"),
    (1_000_000, 0.05, "<= 1.06"),
    (1_000_000, 0.10, "<= 1.10"),
]


def cascade_efficiency_rows(quick: bool = False) -> list[dict[str, object]]:
    """Efficiency rows (1000 frames of 1e4 bits per error rate, fewer of the larger), and
    the residual frame errors of 1000 frames of 1e4 bits at 1, 2, 5 and 10 %."""
    frames = {10_000: 1000, 100_000: 20, 1_000_000: 5}
    if quick:
        return [bench_cascade_efficiency(10_000, 0.05, 100, "<= 1.08")[0]]
    rows, left = [], {}
    for n, q, target in EFFICIENCY_CASES:
        row, run = bench_cascade_efficiency(n, q, frames[n], target)
        rows.append(row)
        if n == 10_000:
            left[q] = run
    rows.append(residual_frames_row(10_000, left))
    return rows


def run_benchmarks(quick: bool = False) -> list[dict[str, object]]:
    if quick:
        return [
            bench_sifting(1_000_000, 3),
            *cascade_efficiency_rows(quick=True),
            *bench_cascade_in_process(1_000_000, 0.03, 1),
            bench_cascade_loopback(2_000_000, 0.03, 2, 2),
            *bench_toeplitz(1_000_000, 3),
            bench_auth(16 << 20, 3),
            bench_auth_key_per_block(4_000_000),
        ]
    rows = [bench_sifting(10_000_000, 5)]
    rows += cascade_efficiency_rows()
    rows += bench_cascade_in_process(1_000_000, 0.03, 3)
    # The daemons reconcile a block's whole sifted Z key (~6e6-1e7 bits with the default
    # block_detections) in cascade.frame_count frames; one frame is the peer row.
    for n in (1_000_000, 8_000_000):
        for frames in sorted({1, cascade.frame_count(n, CascadeParams())}):
            rows.append(bench_cascade_loopback(n, 0.03, 5, frames))
    rows += bench_toeplitz(100_000, 21)
    rows += bench_toeplitz(1_000_000, 7)
    rows += bench_toeplitz(10_000_000, 3)
    rows += bench_toeplitz(100_000_000, 1, with_plain=False, with_fft=False)
    rows.append(bench_auth(256 << 20, 5))
    rows.append(bench_auth_key_per_block())
    return rows


if __name__ == "__main__":  # pragma: no cover
    for row in run_benchmarks(quick="--quick" in sys.argv):
        print(f"{row['name']:<32} {row['value']:>10.3f} {row['unit']:<16} target {row['target']}")
