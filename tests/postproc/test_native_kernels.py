"""Every compiled kernel exists three ways (qkdnode.jit): numba, native (Cython, built at
install), numpy twin; all three give the same results.

The registry test reads the sources: each ``@njit`` function of qkdnode must have a
function of the same name in its ``qkdnode/native/<module>.pyx`` and a case below that
compares it, so a kernel added later without a native version (or without a check) fails
here. The agreement tests load a copy of each kernel module per backend and feed them the
same random (hypothesis) inputs: node states, searches and flips through real pass trees,
permutations of random lengths, tag streams with random drift and jitter.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkdnode import jit
from qkdnode.postproc import cascade
from tests.source_trees import parse_file

ROOT = Path(__file__).resolve().parents[2] / "qkdnode"
#: numba's disk cache of the numba copies of the kernel modules
COPY_CACHE = ROOT.parent / ".pytest_cache" / "numba-copies"

#: every @njit kernel -> the test below that compares its backends
COVERED: dict[str, str] = {
    **{
        f"qkdnode.postproc.cascade_kernels.{name}": "test_cascade_steps_agree"
        for name in [
            "_get",
            "_put",
            "_toggle",
            "_leaf_slot",
            "_get_many",
            "_put_many",
            "_smallest_odd",
            "_descend",
            "_distinct_searches",
            "_odd_searches",
            "_left_children",
            "_apply_answers",
            "_locate",
            "_flip_all_passes",
            "_block_trees",
            "_pass_tree",
            "_permuted_blocks",
            "_unbuilt_blocks",
            "_block_parities",
            "_toggle_bits",
        ]
    },
    **{
        f"qkdnode.postproc.shuffle.{name}": "test_permutations_agree"
        for name in [
            "_rounds",
            "_rounds_inv",
            "_forward",
            "_backward",
            "_walk_batch",
            "_gather_batch",
            "_gather",
        ]
    },
    "qkdnode.procedures.track_kernel._residuals": "test_tracking_agrees",
    "qkdnode.procedures.track_kernel._track": "test_tracking_agrees",
}


def njit_kernels() -> dict[str, Path]:
    """``module.name`` of every function decorated ``@njit`` in qkdnode -> its file."""
    found: dict[str, Path] = {}
    for path in sorted(ROOT.rglob("*.py")):
        tree = parse_file(path)
        module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any(
                (isinstance(d, ast.Name) and d.id == "njit")
                or (isinstance(d, ast.Attribute) and d.attr == "njit")
                for d in node.decorator_list
            ):
                found[f"{module}.{node.name}"] = path
    return found


def native_functions(stem: str) -> set[str]:
    """Names of the Python-callable functions (``def``/``cpdef``) of ``native/<stem>.pyx``."""
    pyx = ROOT / "native" / f"{stem}.pyx"
    if not pyx.exists():
        return set()
    names = set()
    for line in pyx.read_text("utf-8").splitlines():
        for head in ("def ", "cpdef "):
            if line.startswith(head):
                names.add(line[len(head) :].split("(", 1)[0].split()[-1])
    return names


def test_every_njit_kernel_has_a_native_version_and_a_check() -> None:
    kernels = njit_kernels()
    assert len(kernels) >= 25, sorted(kernels)  # the scan finds the kernels we know of
    missing = []
    for qual in kernels:
        module, name = qual.rsplit(".", 1)
        stem = module.rsplit(".", 1)[-1]
        if stem not in jit.NATIVE_MODULES or name not in native_functions(stem):
            missing.append(f"{qual}: no {name} in qkdnode/native/{stem}.pyx")
    assert not missing, "kernels without a native version:\n" + "\n".join(missing)
    unchecked = sorted(set(kernels) - set(COVERED))
    assert not unchecked, f"kernels no agreement test compares: {unchecked}"
    assert set(COVERED) <= set(kernels), sorted(set(COVERED) - set(kernels))
    # the check qkdnode.jit makes before it picks native (a build from older sources
    # falls back instead of failing at import) sees the same kernels
    seen = {
        f"qkdnode.{jit.NATIVE_SOURCES[stem][:-3].replace('/', '.')}.{name}"
        for stem in jit.NATIVE_MODULES
        for name in jit.kernel_names(stem)
    }
    assert seen == set(kernels)
    # the modules the decorator registered at import are the ones the scan found
    import qkdnode.postproc.cascade_kernels
    import qkdnode.procedures.track_kernel  # noqa: F401

    assert set(jit.KERNELS) <= set(kernels)


# --- one copy of a kernel module per backend -----------------------------------------------


@contextlib.contextmanager
def _backend(backend: jit.Backend, native: dict[str, ModuleType]) -> Iterator[None]:
    saved = (jit.BACKEND, jit.JIT, jit._native, jit._numba, dict(jit.KERNELS))
    jit.BACKEND, jit.JIT = backend, backend != "numpy"
    jit._native = native
    try:
        yield
    finally:
        jit.BACKEND, jit.JIT, jit._native, jit._numba = saved[:4]
        jit.KERNELS.clear()
        jit.KERNELS.update(saved[4])


#: kernel modules whose numba kernels call another module's (by its module-level name)
DEPENDS = {"qkdnode.postproc.cascade_kernels": "qkdnode.postproc.shuffle"}


def _copy(module: str, backend: jit.Backend, native: dict[str, ModuleType]) -> ModuleType:
    """A fresh copy of ``module`` whose kernels are ``backend``'s (with copies of the
    kernel modules it calls, of the same backend)."""
    dep = DEPENDS.get(module)
    inner = _copy(dep, backend, native) if dep else None
    path = ROOT.parent / (module.replace(".", "/") + ".py")
    spec = importlib.util.spec_from_file_location(f"_{backend}_copy.{module}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    # registered under its own name: numba's disk cache records the module of each
    # kernel and imports it by that name when a later run loads the entry
    sys.modules[spec.name] = mod
    with _backend(backend, native), contextlib.ExitStack() as stack:
        if dep and inner is not None:
            package, name = dep.rsplit(".", 1)
            pkg = importlib.import_module(package)
            stack.callback(setattr, pkg, name, getattr(pkg, name))
            setattr(pkg, name, inner)  # what `from package import name` binds in the copy
        if backend == "numba":  # the copies' cache apart from the real modules' (their
            # index is keyed by the source file: a real module would load a copy's entry)
            from numba.core import config

            stack.callback(setattr, config, "CACHE_DIR", config.CACHE_DIR)
            config.CACHE_DIR = str(COPY_CACHE)
        spec.loader.exec_module(mod)
    return mod


def _numba_loads() -> bool:
    try:
        import numba  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def implementations(module: str) -> dict[str, ModuleType]:
    """``module`` as each backend that can run here runs it (the process's own backend is
    the imported module, the others are copies)."""
    real = importlib.import_module(module)
    native, why = jit._load_native()
    out: dict[str, ModuleType] = {}
    if jit.BACKEND == "numba":
        out["numba"] = real
    elif _numba_loads():
        import numba

        with _backend("numba", {}):
            jit._numba = numba
            out["numba"] = _copy(module, "numba", {})
    if native:
        out["native"] = real if jit.BACKEND == "native" else _copy(module, "native", native)
    out["numpy"] = real if jit.BACKEND == "numpy" else _copy(module, "numpy", {})
    if "native" not in out:
        pytest.skip(f"native kernels not built: {why}")
    return out


_SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _same(results: dict[str, Any]) -> None:
    names = list(results)
    ref = results[names[0]]
    for name in names[1:]:
        for i, (a, b) in enumerate(zip(ref, results[name], strict=True)):
            a, b = np.asarray(a), np.asarray(b)
            nan = a.dtype.kind == "f" and b.dtype.kind == "f"  # NaN: a segment without a fit
            assert np.array_equal(a, b, equal_nan=nan), f"{names[0]} vs {name}, item {i}"


@st.composite
def cascade_cases(draw: st.DrawFn) -> tuple[int, list[int], int]:
    n = draw(st.integers(2, 5000))
    cap = max(1, (n - 1).bit_length())
    tops = draw(st.lists(st.integers(1, cap), min_size=1, max_size=5))
    return n, tops, draw(st.integers(0, 2**32))


@_SETTINGS
@given(case=cascade_cases())
def test_cascade_steps_agree(case: tuple[int, list[int], int]) -> None:
    """Both sides' tree builds (whole first pass, a random part of the later passes' blocks
    built, the others' roots from the block parities) and Bob's round steps through them:
    same states, parities, unbuilt blocks, searches, leaves and positions from every
    backend."""
    n, tops, seed = case
    impls = implementations("qkdnode.postproc.cascade_kernels")
    from qkdnode.postproc import shuffle

    lay = cascade.TreeLayout(n, tops)
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, n, dtype=np.uint8)
    flags = rng.choice(np.array([0, 2], np.uint8), len(tops))
    perms = [shuffle.KeyedPermutation(n, seed, q) for q in range(1, len(tops))]
    args = shuffle.stacked_kernel_args(perms)
    pbase, tt, boff = lay.pass_base, lay.tops, lay.block_offsets
    counts = np.diff(boff)
    # later passes: a random subset of blocks built (sorted, so runs of consecutive ones)
    share = rng.random()
    subsets = [np.flatnonzero(rng.random(int(c)) < share) for c in counts[1:]]
    ids = rng.permutation(lay.total)[: rng.integers(1, lay.total + 1)].astype(np.int64)
    values = rng.integers(0, 4, ids.shape[0]).astype(np.uint8)
    asked = rng.integers(0, lay.total, rng.integers(1, 300)).astype(lay.wire_dtype)
    first_lazy = int(pbase[1]) if len(tops) > 1 else lay.total
    found = np.unique(rng.integers(0, n, rng.integers(1, 200)))
    parities_seed = int(rng.integers(0, 2**32))
    results: dict[str, Any] = {}
    for name, ck in impls.items():
        state = np.zeros(ck.state_bytes(lay.total), np.uint8)
        built = np.zeros(int(boff[-1]), np.uint8)
        packed = np.packbits(bits)
        ck.pass_tree(bits, tops[0], state, int(pbase[0]), flags[0])
        built[boff[0] : boff[1]] = 1
        pars = ck.block_parities(bits, perms, tops[1:])
        for q in range(1, len(tops)):
            ck.put(state, lay.top_ids(q), pars[q - 1] | flags[q])
            blocks = subsets[q - 1]
            if blocks.shape[0]:  # (callers never ask for no block)
                ck.permuted_blocks(
                    bits, packed, perms[q - 1], tops[q], state, int(pbase[q]), flags[q], blocks
                )
            built[boff[q] + blocks] = 1
        trees, built_before = state.copy(), built.copy()
        need = ck.unbuilt_blocks(asked, pbase, tt, boff, built, first_lazy)
        assert np.array_equal(built, built_before)  # the kernel's marks are undone
        ck.put(state, ids, values)
        got = ck.get(state, np.arange(lay.total, dtype=np.int32))
        ck.toggle_bits(packed, found)
        rows = ck.flip_all_passes(state, pbase, tt, found, perms, args, boff, built)
        flipped = state.copy()
        odd = ck.smallest_odd(state, pbase, tt, rows, boff, built)
        dup = np.concatenate([odd, odd[:, : odd.shape[1] // 2]], axis=1)
        distinct = ck.distinct_searches(state, dup)
        still = ck.odd_searches(state, distinct)
        keep, leaf = ck.descend(state, pbase, tt, n, still)
        descended = state.copy()
        leaf = leaf[:, np.lexsort(leaf[::-1])]  # the numpy twin finds them in another order
        where = ck.locate(leaf, perms, args)
        first = np.sort(np.unique(keep[0], return_index=True)[1])
        keep = keep[:, first[keep[2, first] >= 1]]
        left = ck.left_children(pbase, tt, keep)
        parities = np.random.default_rng(parities_seed).integers(0, 2, left.shape[0])
        # answers as a round brings them: no parent among the children being answered
        ok = ~np.isin(keep[0], np.concatenate([left, left + 1]))
        ck.apply_answers(state, left[ok], keep[0][ok], parities[ok].astype(np.uint8))
        results[name] = (
            trees,
            *pars,
            need,
            got,
            packed,
            rows,
            flipped,
            odd,
            distinct,
            still,
            keep,
            leaf,
            descended,
            where,
            state,
        )
    _same(results)
    # the toggles are those of the flipped key; block parities are those of the permuted key
    assert np.array_equal(
        np.unpackbits(results["numpy"][len(pars) + 3])[:n],
        bits ^ np.isin(np.arange(n), found).astype(np.uint8),
    )
    for q in range(1, len(tops)):
        leaves = np.zeros(int(counts[q]) << tops[q], np.uint8)
        leaves[:n] = perms[q - 1].gather(bits)
        want = np.bitwise_xor.reduce(leaves.reshape(int(counts[q]), -1), axis=1)
        assert np.array_equal(results["numpy"][q], want)


@_SETTINGS
@given(
    n=st.integers(1, 70_000),
    seed=st.integers(0, 2**32),
    pass_index=st.integers(0, 9),
    picks=st.integers(1, 500),
)
def test_permutations_agree(n: int, seed: int, pass_index: int, picks: int) -> None:
    """Forward, backward and gather of keyed permutations of random lengths; the round
    function itself on random words (numba and native)."""
    impls = implementations("qkdnode.postproc.shuffle")
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, n, dtype=np.uint8)
    idx = rng.integers(0, n, picks).astype(np.int64)
    words = rng.integers(0, 2**63, 16, dtype=np.uint64)
    size = min(picks, n)
    i0 = int(rng.integers(0, n - size + 1))
    results: dict[str, Any] = {}
    for name, sh in impls.items():
        p = sh.KeyedPermutation(n, seed, pass_index)
        out = (p.forward(idx), p.backward(idx), p.gather(bits), p.array())
        if name != "numpy":  # the round functions have no numpy twin of their own
            c, k, m = p.kernel_args
            masked = words & c[1]
            out += (
                [int(sh._rounds(w, c, tuple(k), tuple(m))) for w in masked],
                [int(sh._rounds_inv(w, c, tuple(k), tuple(p._inv_mults))) for w in masked],
            )
            batch, dest = np.empty(picks, np.uint64), np.empty(size, np.uint8)
            todo = np.empty(picks, np.int64)
            sh._gather_batch(np.packbits(bits), c, tuple(k), tuple(m), i0, batch, dest, todo)
            out += (dest,)
            # one round evaluation of each position, then the cycle walk on: perm / perm⁻¹
            walked = []
            for inverse, mm in ((False, m), (True, p._inv_mults)):
                f = sh._rounds_inv if inverse else sh._rounds
                one = np.array([int(f(int(i), c, tuple(k), tuple(mm))) for i in idx], np.uint64)
                sh._walk_batch(one, picks, c, tuple(k), tuple(mm), inverse, todo)
                walked.append(one.astype(np.int64))
            assert np.array_equal(walked[0], p.forward(idx))
            assert np.array_equal(walked[1], p.backward(idx))
            out += tuple(walked)
        results[name] = out
    compiled = {k: v for k, v in results.items() if k != "numpy"}
    _same(compiled)
    _same({k: v[:4] for k, v in results.items()})


@_SETTINGS
@given(
    n=st.integers(2, 20_000),
    seed=st.integers(0, 2**32),
    ppm=st.floats(-150.0, 150.0),
    jitter_ps=st.floats(1.0, 400.0),
    offset_ps=st.floats(-30_000.0, 30_000.0),
    segment_ps=st.sampled_from([100_000_000, 2_000_000_000, 10_000_000_000]),
    min_fit=st.integers(3, 64),
    gains=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 0.5)),
)
def test_tracking_agrees(
    n: int,
    seed: int,
    ppm: float,
    jitter_ps: float,
    offset_ps: float,
    segment_ps: int,
    min_fit: int,
    gains: tuple[float, float],
) -> None:
    """The slot-tracking loop over tag streams with random drift, jitter and clock offset:
    numba and native identical to the last bit, the numpy twin as close as its own test
    asks."""
    impls = implementations("qkdnode.procedures.track_kernel")
    rng = np.random.default_rng(seed)
    period = 40_000.0 * (1 + ppm * 1e-6)
    slots = np.sort(rng.choice(50 * n, n, replace=False)).astype(np.int64) + 1000
    times = np.rint(slots * period + rng.normal(0.0, jitter_ps, n)).astype(np.int64)
    times.sort()
    kw = dict(
        segment_ps=segment_ps,
        offset_ps=offset_ps,
        rate=1.0,
        period_ps=40_000.0,
        capture_ps=20_000.0,
        window_ps=1_000.0,
        min_fit_tags=min_fit,
        phase_gain=gains[0],
        rate_gain=gains[1],
    )
    results = {name: tuple(tk.track(times, **kw)) for name, tk in impls.items()}
    _same({k: v for k, v in results.items() if k != "numpy"})
    native, twin = results["native"], results["numpy"]
    assert np.array_equal(native[0], twin[0]) and np.array_equal(native[2], twin[2])
    assert native[3].shape == twin[3].shape
    np.testing.assert_allclose(native[1], twin[1], atol=1e-6)
    np.testing.assert_allclose(native[3], twin[3], rtol=1e-9, atol=1e-6, equal_nan=True)
    assert native[4] == pytest.approx(twin[4], abs=1e-6)
    assert native[5] == pytest.approx(twin[5], abs=1e-15)
    # the residuals module-level kernel on its own (numba and native)
    if "numba" in impls:
        outs = []
        for name in ("numba", "native"):
            n_out, r_out = np.zeros(n, np.int64), np.zeros(n, np.float64)
            impls[name]._residuals(times, 1, n, offset_ps, 1.0 + 1e-6, 40_000.0, n_out, r_out)
            outs.append((n_out, r_out))
        _same({"numba": outs[0], "native": outs[1]})


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({"QKDNODE_NO_JIT": "1"}, "native"),  # what the unit sets
        ({}, "native"),  # preferred wherever built
        ({"QKDNODE_KERNELS": "numba"}, "numba"),
        ({"QKDNODE_KERNELS": "numpy", "QKDNODE_NO_JIT": "1"}, "numpy"),
    ],
)
def test_selection_follows_the_environment(env: dict[str, str], want: str) -> None:
    """Which kernels a fresh process runs, as docs/operations.md tells an operator; with
    QKDNODE_NO_JIT numba is not even imported."""
    if want == "native" and not jit._load_native()[0]:
        pytest.skip("native kernels not built")
    base = {k: v for k, v in os.environ.items() if k not in ("QKDNODE_NO_JIT", "QKDNODE_KERNELS")}
    code = "import sys, qkdnode.jit as j; print(j.BACKEND, 'numba' in sys.modules)"
    r = subprocess.run(
        [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    backend, numba_loaded = r.stdout.split()
    assert backend == want
    if "QKDNODE_NO_JIT" in env:
        assert numba_loaded == "False"


def test_an_unknown_kernel_choice_is_refused_by_name() -> None:
    env = {**os.environ, "QKDNODE_KERNELS": "fortran"}
    r = subprocess.run(
        [sys.executable, "-c", "import qkdnode.jit"], env=env, capture_output=True, text=True
    )
    assert r.returncode != 0
    assert "QKDNODE_KERNELS='fortran'" in r.stderr and "numba, native, numpy" in r.stderr
