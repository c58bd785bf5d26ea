"""The unit sets MemoryDenyWriteExecute=yes: the node's libraries must live without W+X memory.

systemd implements the setting with a seccomp filter refusing writable+executable
mappings and mprotect() calls that make memory executable. Linux >= 6.3 offers the same
rule per process, ``prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)``, which a test can set
without root or systemd. A child Python sets it first, proves it bites (an anonymous
W+X mmap fails), then imports and exercises what the daemon uses. A library with a JIT
(numba, PyPy) would fail here, which is the risk the unit's comment names.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap

import pytest

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1


def mdwe_supported() -> bool:
    # Probe in a child: the flag cannot be cleared once set.
    probe = textwrap.dedent(
        f"""
        import ctypes, sys
        libc = ctypes.CDLL(None, use_errno=True)
        sys.exit(0 if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0 else 1)
        """
    )
    return subprocess.run([sys.executable, "-c", probe], timeout=30).returncode == 0


CHILD = textwrap.dedent(
    f"""
    import ctypes, mmap, sys
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:
        pass
    else:
        sys.exit("W+X mapping was allowed: the rule is not in force")

    import asyncio
    import numpy as np
    import scipy.fft, scipy.linalg
    import zmq, zmq.asyncio
    import aiohttp, structlog, pydantic, prometheus_client
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.poly1305 import Poly1305

    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2, 1 << 16, dtype=np.uint8)
    spectrum = np.fft.rfft(bits.astype(np.float64))
    assert spectrum.shape[0] == (1 << 15) + 1
    a = rng.random((64, 64))
    np.testing.assert_allclose(a @ np.linalg.inv(a), np.eye(64), atol=1e-8)
    scipy.linalg.lu_factor(a)
    scipy.fft.fft(bits)
    key = AESGCM.generate_key(bit_length=256)
    AESGCM(key).encrypt(b"\\0" * 12, b"block", None)
    Poly1305.generate_tag(b"k" * 32, b"message")
    public, secret = zmq.curve_keypair()
    assert len(public) == 40
    # A ctypes callback needs an executable trampoline from libffi.
    cb = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x + 1)
    assert cb(41) == 42

    import qkdnode.metrics, qkdnode.sdnotify, qkdnode.postproc.cascade, drivers.registry
    try:
        import numba
    except OSError as exc:  # llvmlite cannot map its code
        assert "Permission" in str(exc) or isinstance(exc, PermissionError), exc
    else:
        sys.exit("numba loaded without W+X memory?")
    import qkdnode.jit
    assert qkdnode.jit.BACKEND != "numba"

    # the ahead-of-time kernels (or the numpy twins where not built) run instead
    from qkdnode.postproc.params import CascadeParams
    key = rng.integers(0, 2, 20000, dtype=np.uint8)
    noisy = key.copy()
    noisy[::50] ^= 1
    fixed, _ = qkdnode.postproc.cascade.reconcile_local(key, noisy, 0.02, CascadeParams(), 3)
    assert (fixed == key).all()
    # privacy amplification: every backend here (the native carry-less product and
    # ducc0's FFTs are compiled ahead of time), the default one included
    from qkdnode.postproc import toeplitz
    x, seed = key[:3000], key[5000:7999]
    for backend in toeplitz.available_backends():
        got = toeplitz.pa_hash(x, seed, 1000, backend=backend)
        assert (got == toeplitz.pa_hash_direct(x, seed, 1000)).all(), backend
    assert (toeplitz.pa_hash(x, seed, 1000) == toeplitz.pa_hash_direct(x, seed, 1000)).all()
    print("pa backends", toeplitz.available_backends())
    from drivers.interfaces import TAG_DTYPE
    from qkdnode.procedures.sync import ClockModel, SlotTracker
    tags = np.zeros(2000, TAG_DTYPE)
    tags["time_ps"] = np.arange(2000) * 40000
    tags["channel"] = 1
    mapped, status = SlotTracker(ClockModel(0.0, 1.0), 25e6, 200.0).update(tags)
    assert mapped.slot_index.shape[0] == 2000 and status.locked
    m = qkdnode.metrics.NodeMetrics("a", "transmitter")
    m.set_state("EXCHANGING")

    async def serve_once():
        port = await m.start_http("127.0.0.1", 0)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{{port}}/metrics") as r:
                assert r.status == 200
        await m.stop()

    asyncio.run(serve_once())
    print("ok")
    """
)


def test_node_libraries_work_without_write_execute_memory() -> None:
    if not mdwe_supported():
        pytest.skip("prctl(PR_SET_MDWE) unavailable (needs Linux >= 6.3)")
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("ok")
    from qkdnode.postproc import toeplitz

    # what runs here without the rule runs under it: the native product needs no W+X
    assert f"pa backends {toeplitz.available_backends()}" in r.stdout


# The kernels' work in a child: a Cascade block of 2e5 bits at 3 % QBER, a 4e6-position
# permutation gather and the slot-tracking loop over drifting tags; digests of the results.
KERNEL_WORK = textwrap.dedent(
    """
    import ctypes, hashlib, json, mmap, sys
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        wx = True
    except OSError:
        wx = False
    try:
        import numba
        numba.njit(lambda x: x + 1)(1)
        numba_runs = True
    except (ImportError, OSError) as exc:
        numba_runs = False
    import numpy as np
    from qkdnode import jit
    from qkdnode.daemon import warm_up_kernels
    from qkdnode.postproc import cascade, shuffle
    from qkdnode.postproc.params import CascadeParams
    from qkdnode.procedures import track_kernel

    warm_up_kernels()
    rng = np.random.default_rng(11)
    n = 200_000
    key = rng.integers(0, 2, n, dtype=np.uint8)
    noisy = key ^ (rng.random(n) < 0.03).astype(np.uint8)
    fixed, stats = cascade.reconcile_local(key, noisy, 0.03, CascadeParams(), 5)
    bits = rng.integers(0, 2, 4_000_000, dtype=np.uint8)
    gathered = shuffle.KeyedPermutation(bits.size, 3, 2).gather(bits)
    slots = np.sort(rng.choice(10_000_000, 200_000, replace=False))
    times = np.rint(slots * 40_000.8 + rng.normal(0, 30, slots.size)).astype(np.int64)
    tr = track_kernel.track(times, segment_ps=2_000_000_000, offset_ps=0.0, rate=1.0,
                            period_ps=40_000.0, capture_ps=20_000.0, window_ps=1_000.0,
                            min_fit_tags=16, phase_gain=0.5, rate_gain=0.1)
    digest = lambda *arrays: hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest()
    print(json.dumps({
        "wx": wx, "numba_runs": numba_runs, "backend": jit.BACKEND, "why_not": jit.WHY_NOT,
        "corrected": bool((fixed == key).all()), "disclosed": int(stats.disclosed_bits),
        "rounds": int(stats.rounds), "cascade": digest(fixed), "gather": digest(gathered),
        "tracking": digest(tr.slot, tr.residual_ps, tr.in_window, tr.segments),
        "model": [tr.offset_ps, tr.rate],
    }))
    """
)


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: the hook only calls


def _set_mdwe() -> None:
    """preexec hook: the rule the unit's MemoryDenyWriteExecute=yes sets (kept across
    exec), in the forked child before it runs Python."""
    if _LIBC.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")


def test_native_kernels_run_where_numba_is_refused_with_the_same_results() -> None:
    """Under the unit's rule numba cannot compile, the kernels compiled at install run
    (the daemon's warm-up included), and a Cascade block, a permutation and the tracking
    loop give exactly what numba gives without the rule."""
    from qkdnode import jit

    if not mdwe_supported():
        pytest.skip("prctl(PR_SET_MDWE) unavailable (needs Linux >= 6.3)")
    if not jit._load_native()[0]:
        pytest.skip(f"native kernels not built: {jit._load_native()[1]}")
    env = {k: v for k, v in os.environ.items() if k not in ("QKDNODE_NO_JIT", "QKDNODE_KERNELS")}
    runs = {}
    for name, preexec, extra in (
        ("production", _set_mdwe, {"QKDNODE_NO_JIT": "1"}),  # as the unit sets
        ("jit", None, {"QKDNODE_KERNELS": "numba"}),
    ):
        r = subprocess.run(
            [sys.executable, "-c", KERNEL_WORK],
            capture_output=True,
            text=True,
            timeout=300,
            env={**env, **extra},
            preexec_fn=preexec,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        runs[name] = json.loads(r.stdout.strip().splitlines()[-1])
    prod, ref = runs["production"], runs["jit"]
    assert not prod["wx"] and not prod["numba_runs"], prod
    assert prod["backend"] == "native", prod
    assert ref["wx"] and ref["numba_runs"] and ref["backend"] == "numba", ref
    assert prod["corrected"] and ref["corrected"]
    for field in ("disclosed", "rounds", "cascade", "gather", "tracking", "model"):
        assert prod[field] == ref[field], field
