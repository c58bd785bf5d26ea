"""Finite-key decoy analysis: Chernoff tail inversion, intensity intervals, and the check
against published figures of Lim et al., PRA 89, 022307 (2014)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from qkdnode.postproc import finitekey as fk
from qkdnode.postproc import finitekey_decoy, finitekey_tails, optimize, theory
from qkdnode.postproc.cascade import binary_entropy
from qkdnode.postproc.params import PostprocParams
from tests.postproc.synth import generate

EPS = 1e-10 / 21


# --- Chernoff tail inversion -----------------------------------------------------------------
@pytest.mark.parametrize("x", [0.0, 0.3, 3.0, 40.0, 1e3, 1e6, 1e10])
def test_chernoff_bounds_solve_the_tail_equation(x: float) -> None:
    beta = math.log(1 / EPS)
    hi = fk.expectation_upper(x, EPS)
    assert hi > x
    assert hi * ((x / hi) * math.log(x / hi) - x / hi + 1 if x > 0 else 1) == pytest.approx(
        beta, rel=1e-6
    )
    lo = fk.expectation_lower(x, EPS)
    assert 0 <= lo < max(x, 1e-300) or x == 0
    if lo > 0:
        assert lo * ((x / lo) * math.log(x / lo) - x / lo + 1) == pytest.approx(beta, rel=1e-6)


@pytest.mark.parametrize("x", [1.0, 25.0, 400.0, 1e5, 1e8])
def test_chernoff_bounds_sit_inside_the_closed_forms_of_yin_et_al(x: float) -> None:
    """Yin et al., Sci. Rep. 10, 14312 (2020), as implemented in SatQuMA
    (cnqo-qcomms/SatQuMA, key/protocols/func_efficient_BB84.py, nXZpm): the closed forms are
    relaxations of the same Chernoff bound, so the exact inversion lies inside them."""
    beta = math.log(1 / EPS)
    closed_hi = x + beta + math.sqrt(2 * beta * x + beta**2)
    closed_lo = x - beta / 2 - math.sqrt(2 * beta * x + beta**2 / 4)
    assert fk.expectation_upper(x, EPS) <= closed_hi
    assert fk.expectation_lower(x, EPS) >= closed_lo
    # ... and not by much where counts are large
    if x >= 1e5:
        assert fk.expectation_upper(x, EPS) == pytest.approx(closed_hi, rel=2e-3)


@pytest.mark.parametrize("x", [0, 2, 17, 300, 20_000])
def test_chernoff_bounds_are_valid_confidence_limits(x: int) -> None:
    """The true tails at the limits are below eps: a Poisson (and a binomial, the sum of
    independent Bernoulli trials) with mean at the upper limit shows <= x counts with
    probability <= eps, one with mean at the lower limit >= x counts likewise."""
    eps = 1e-6
    hi, lo = fk.expectation_upper(x, eps), fk.expectation_lower(x, eps)
    assert stats.poisson.cdf(x, hi) <= eps
    n = int(10 * hi) + 10
    assert stats.binom.cdf(x, n, hi / n) <= eps
    if lo > 0:
        assert stats.poisson.sf(x - 1, lo) <= eps
        assert stats.binom.sf(x - 1, n, lo / n) <= eps


def test_chernoff_is_tighter_than_hoeffding_for_the_decoy_classes() -> None:
    eta, y0, mus, probs = 1e-3, 4e-7, (0.5, 0.1, 0.0), (0.6, 0.2, 0.2)
    exp = theory.expected_block(
        eta, y0, 0.01, list(zip(probs, mus, strict=True)), p_z_tx=0.8, p_z_rx=0.8, pulses=1e10
    )
    src = fk.DecoySource.exact(mus, probs)
    ch = fk.decoy_bounds(exp.counts, src, 1e-10, statistics=fk.Statistics.CHERNOFF)
    hf = fk.decoy_bounds(exp.counts, src, 1e-10, statistics=fk.Statistics.HOEFFDING)
    asym = fk.decoy_bounds(exp.counts, src, 1e-10, statistics=fk.Statistics.NONE)
    assert hf.s_z1_lower < ch.s_z1_lower < asym.s_z1_lower
    assert hf.s_z0_lower < ch.s_z0_lower < asym.s_z0_lower
    assert hf.phi_z_upper > ch.phi_z_upper > asym.phi_z_upper


# --- one Chernoff event per decoy combination ------------------------------------------------
def _upper(counts: tuple[float, float, float], eps: float) -> tuple[float, float, float]:
    up = [fk.expectation_upper(c, eps) for c in counts]
    return up[0], up[1], up[2]


@pytest.mark.parametrize("x", [0.0, 2.0, 150.0, 4e4, 1e8])
def test_combination_without_nuisance_is_the_single_class_bound(x: float) -> None:
    comb = fk.Combination((0.0, 2.5, 0.0))
    counts = (7.0, x, 3.0)
    assert fk.combination_lower(comb, counts, EPS, (0, 0, 0)) == 2.5 * fk.expectation_lower(x, EPS)


def test_combination_refuses_bad_input() -> None:
    with pytest.raises(fk.FiniteKeyError, match="exactly one"):
        fk.Combination((1.0, 2.0, -1.0))
    comb = fk.Combination((-1.0, 2.0, -1.0))
    with pytest.raises(fk.FiniteKeyError, match="eps"):
        fk.combination_lower(comb, (1.0, 1.0, 1.0), 0.0, (2, 2, 2))
    with pytest.raises(fk.FiniteKeyError, match="counts"):
        fk.combination_lower(comb, (1.0, -1.0, 1.0), EPS, (2, 2, 2))
    with pytest.raises(fk.FiniteKeyError, match="nuisance"):
        fk.combination_lower(comb, (1.0, 1.0, 1.0), EPS, (math.nan, 2, 2))


def test_combination_takes_the_best_lambda() -> None:
    """The bound holds for every lambda > 0 (module docstring); the one returned is the
    largest of them: scanning lambda finds nothing better."""
    weights = (-1.3, 2.6, -5.5)
    counts = (9e4, 4.7e4, 1.5e3)
    up = _upper(counts, EPS)
    best = fk.combination_lower(fk.Combination(weights), counts, EPS, up)
    beta = math.log(1 / EPS)
    w_obs = sum(w * c for w, c in zip(weights, counts, strict=True))
    scanned = []
    for lam in np.geomspace(1e-5, 1e-1, 400):
        num = lam * w_obs - beta - up[0] * math.expm1(-lam * 1.3) - up[2] * math.expm1(-lam * 5.5)
        scanned.append(2.6 * max(0.0, num / math.expm1(lam * 2.6)) - 1.3 * up[0] - 5.5 * up[2])
    assert max(scanned) <= best + 1e-9 * abs(best)
    assert max(scanned) >= best - 1e-4 * abs(best)  # and the scan does come close


def test_combinations_are_lims_bounds_for_exact_counts() -> None:
    """With exact counts of a channel (gain Y0 + 1 - e^(-eta mu)) the combinations give Lim
    et al.'s (A4)-(A6) as the per-class code evaluates them (point intensities, vacuum class
    dark or leaking)."""
    rng = np.random.default_rng(4)
    for _ in range(50):
        mu3 = float(rng.choice([0.0, rng.uniform(1e-4, 0.01)]))
        mu2 = float(rng.uniform(0.05, 0.3))
        mu1 = float(rng.uniform(mu2 + mu3 + 0.05, 0.9))
        p1, p2 = float(rng.uniform(0.2, 0.6)), float(rng.uniform(0.1, 0.3))
        src = fk.DecoySource.exact((mu1, mu2, mu3), (p1, p2, 1 - p1 - p2))
        eta, y0 = 10 ** float(rng.uniform(-4, -1)), 10 ** float(rng.uniform(-7, -4))
        counts = tuple(
            1e10 * p * theory.gain(m, eta, y0)
            for m, p in zip((mu1, mu2, mu3), (p1, p2, 1 - p1 - p2), strict=True)
        )
        comb = fk.DecoyCombinations.of(src)
        s0, s1 = finitekey_decoy._s0_s1(counts, src, EPS, fk.Statistics.NONE)  # type: ignore[arg-type]
        vacuum = src.tau0_min() * comb.vacuum.observed(counts) / comb.vacuum_den  # type: ignore[arg-type]
        single = src.tau1_min() * comb.single.observed(counts) / comb.single_den  # type: ignore[arg-type]
        if vacuum > 0:
            assert vacuum == pytest.approx(s0, rel=1e-9)
        if single > 0 and vacuum > 0:
            assert single == pytest.approx(s1, rel=1e-9)


def test_box_weights_are_never_better_than_the_weights_at_the_truth() -> None:
    """What makes the interval bound valid: at every true point of the box (corners and
    random points) each weight of the box's combinations is no larger than the true one
    (the counts are non-negative, so each combination is no larger), each denominator of
    the lower bounds no smaller, that of the error bound no larger, and the tau's likewise."""
    rng = np.random.default_rng(5)
    box = _box(0.04, 3e-3)
    wide = fk.DecoyCombinations.of(box)
    corners = [
        tuple(iv.upper if (c >> k) & 1 else iv.lower for k, iv in enumerate(box.mu))
        for c in range(8)
    ]
    randoms = [tuple(float(rng.uniform(iv.lower, iv.upper)) for iv in box.mu) for _ in range(200)]
    for mus in corners + randoms:
        truth = fk.DecoySource.exact(mus, PROBS)  # type: ignore[arg-type]
        at = fk.DecoyCombinations.of(truth)
        for name in ("vacuum", "single", "errors"):
            w_box, w_at = getattr(wide, name).weights, getattr(at, name).weights
            assert all(b <= a + 1e-12 * abs(a) for b, a in zip(w_box, w_at, strict=True)), name
        assert wide.vacuum_den >= at.vacuum_den
        assert wide.single_den >= at.single_den
        assert wide.errors_den <= at.errors_den
        assert box.tau0_min() <= truth.tau0_min()
        assert box.tau1_min() <= truth.tau1_min()
        assert box.tau1_max() >= truth.tau1_max()


# Conditional class probabilities q_k(n) of the decoy analysis and a population of detected
# pulses with known photon numbers (a long-distance-like mix: many vacuum detections).
MC_MUS, MC_PROBS = (0.5, 0.22, 0.0), (0.4, 0.45, 0.15)
MC_PHOTONS = np.array([600, 2500, 450, 70, 10])


def _class_given_photons(mus: tuple[float, ...], probs: tuple[float, ...]) -> np.ndarray:
    n = np.arange(len(MC_PHOTONS))
    fact = np.array([math.factorial(int(k)) for k in n], dtype=float)
    joint = np.array([p * np.exp(-m) * m**n / fact for m, p in zip(mus, probs, strict=True)])
    return joint / joint.sum(axis=0)  # [class, photon number]


def test_combination_bounds_hold_for_sampled_class_labels() -> None:
    """Monte Carlo: photon numbers fixed, class labels drawn independently (the model of the
    bound), eps = 2 %. The combination's own event, with the nuisance classes at their true
    expectations, fails in at most eps of the trials (measured: eps / 11 for the
    single-photon combination, eps / 20 for the errors; with ln(1/eps) halved, more than
    eps); as used, with the nuisance classes' upper bounds, in at most eps per event. The
    plug-in value (observed counts, no fluctuation term) fails about half the time."""
    eps, trials = 0.02, 4000
    rng = np.random.default_rng(2014)
    q = _class_given_photons(MC_MUS, MC_PROBS)
    expected = q @ MC_PHOTONS  # n*_k given the photon numbers
    truth_counts = (float(expected[0]), float(expected[1]), float(expected[2]))
    comb = fk.DecoyCombinations.of(fk.DecoySource.exact(MC_MUS, MC_PROBS))
    names = ("single", "errors")
    alone = dict.fromkeys(names, 0)
    as_used = dict.fromkeys(names, 0)
    plugin = dict.fromkeys(names, 0)
    for _ in range(trials):
        labels = sum(rng.multinomial(int(s), q[:, n]) for n, s in enumerate(MC_PHOTONS))
        counts = (float(labels[0]), float(labels[1]), float(labels[2]))
        up = _upper(counts, eps)
        for name in names:
            c = getattr(comb, name)
            truth = c.observed(truth_counts)
            alone[name] += fk.combination_lower(c, counts, eps, truth_counts) > truth
            as_used[name] += fk.combination_lower(c, counts, eps, up) > truth
            plugin[name] += c.observed(counts) > truth
    for name in names:
        assert alone[name] / trials <= eps, name
        assert as_used[name] / trials <= (1 + len(getattr(comb, name).nuisance)) * eps, name
        assert plugin[name] / trials > 0.3, name


def _per_class_single_photons(counts: tuple[float, float, float], eps: float) -> float:
    """The same bound with one Chernoff limit per class (the previous analysis)."""
    (mu1, mu2, _), (p1, p2, p3) = MC_MUS, MC_PROBS
    a1 = math.exp(mu1) * fk.expectation_upper(counts[0], eps) / p1
    a2 = math.exp(mu2) * fk.expectation_lower(counts[1], eps) / p2
    a3_hi = fk.expectation_upper(counts[2], eps) / p3
    a3_lo = fk.expectation_lower(counts[2], eps) / p3
    c = mu2**2 / mu1**2
    return (a2 - a3_hi - c * (a1 - a3_lo)) / (mu2 * (1 - mu2 / mu1))


def test_one_event_per_combination_is_tighter_than_one_per_class() -> None:
    q = _class_given_photons(MC_MUS, MC_PROBS)
    expected = q @ (40 * MC_PHOTONS)
    counts = (float(expected[0]), float(expected[1]), float(expected[2]))
    comb = fk.DecoyCombinations.of(fk.DecoySource.exact(MC_MUS, MC_PROBS))
    joint = fk.combination_lower(comb.single, counts, EPS, _upper(counts, EPS)) / comb.single_den
    per_class = _per_class_single_photons(counts, EPS)
    exact = comb.single.observed(counts) / comb.single_den
    assert per_class < joint < exact
    assert joint - per_class > 0.25 * (exact - per_class)  # a quarter of the gap, at least


# --- phase error: random sampling of the single-photon events ---------------------------------
@pytest.mark.parametrize(("key", "test", "errors"), [(5e4, 5e4, 3.4e3), (2e5, 4e4, 900.0)])
def test_phase_error_bound_is_tighter_than_lims_gamma(
    key: float, test: float, errors: float
) -> None:
    lam = errors / test
    ours = fk.phase_error_upper(key, test, errors, 1e-10 / 21)
    lim = lam + fk.gamma(1e-10, lam, key, test)
    assert lam < ours < lim


def test_phase_error_bound_solves_its_equation_and_is_monotone() -> None:
    beta = math.log(1 / EPS)
    phi = fk.phase_error_upper(6e4, 5e4, 3e3, EPS)
    assert finitekey_tails._sampling_exponent(phi, 6e4, 5e4, 3e3) == pytest.approx(beta, rel=1e-6)
    assert fk.phase_error_upper(7e4, 5e4, 3e3, EPS) < phi  # more key events: tighter
    assert fk.phase_error_upper(6e4, 6e4, 3e3 * 1.2, EPS) < phi  # same rate, more tests
    assert fk.phase_error_upper(6e4, 5e4, 3.1e3, EPS) > phi  # more errors: looser
    assert fk.phase_error_upper(6e4, 5e4, 0.0, EPS) > 0
    assert fk.phase_error_upper(0.0, 5e4, 3e3, EPS) == 0.5
    assert fk.phase_error_upper(6e4, 5e4, 2.6e4, EPS) == 0.5


@pytest.mark.parametrize(("key", "test"), [(300, 200), (1000, 1000), (400, 2500)])
def test_phase_error_bound_holds_under_random_sampling(key: int, test: int) -> None:
    """Exact check: N = key + test events of which E carry a phase error, the key events a
    uniformly random subset (Lim et al.'s sampling). For each E the probability that the
    key events' error rate exceeds the bound computed from the test events is summed over
    the hypergeometric law: it stays below eps for every E (at eps = 1e-3)."""
    eps, total = 1e-3, key + test
    worst = 0.0
    for errors in range(0, total // 3, max(1, total // 300)):
        x = np.arange(max(0, errors - test), min(errors, key) + 1)
        pmf = stats.hypergeom.pmf(x, total, key, errors)
        bound = np.array([fk.phase_error_upper(key, test, float(errors - xi), eps) for xi in x])
        worst = max(worst, float(pmf[x / key > bound].sum()))
    assert worst <= eps
    assert worst > eps / 100  # not vacuous: the bound is close to the true tail


def test_decoy_bounds_hold_for_sampled_blocks() -> None:
    """Monte Carlo of whole blocks at the true intensities: per (basis, class, photon number)
    Poisson detection counts, X errors with e_0 = 1/2, the Z phase errors of the single
    photons drawn with the single-photon error rate. At eps_sec = 0.4 (each event 0.019)
    no bound fails in more than its share of eps_sec; the asymptotic estimate of the vacuum
    detections (observed counts as expectations, exact in expectation when mu3 = 0) fails in
    about half of the blocks, so the check does see a bound without its fluctuation term."""
    rng = np.random.default_rng(22307)
    mus, probs = MC_MUS, MC_PROBS
    eta, y0, e_d, n_max = 0.02, 2e-4, 0.01, 9
    n = np.arange(n_max)
    fact = np.array([math.factorial(int(k)) for k in n], dtype=float)
    photons = np.array([p * np.exp(-m) * m**n / fact for m, p in zip(mus, probs, strict=True)])
    yields = 1 - (1 - y0) * (1 - eta) ** n
    errors = np.where(n == 0, 0.5, (y0 / 2 + e_d * (yields - y0)) / yields)
    e1 = errors[1]
    pulses = {"z": 6e7, "x": 3e7}
    eps_sec, trials = 0.4, 600
    src = fk.DecoySource.exact(mus, probs)
    fails = dict.fromkeys(("s_z0", "s_z1", "s_x1", "v_x1", "phi"), 0)
    plugin_fails = 0
    for _ in range(trials):
        cells = {b: rng.poisson(pulses[b] * photons * yields) for b in pulses}
        errs = rng.binomial(cells["x"], errors)
        counts = fk.DecoyCounts(
            tuple(float(c) for c in cells["z"].sum(axis=1)),  # type: ignore[arg-type]
            tuple(float(c) for c in cells["x"].sum(axis=1)),  # type: ignore[arg-type]
            tuple(float(c) for c in errs.sum(axis=1)),  # type: ignore[arg-type]
        )
        s_z0, s_z1 = cells["z"][:, 0].sum(), cells["z"][:, 1].sum()
        s_x1, v_x1 = cells["x"][:, 1].sum(), errs[:, 1].sum()
        phase = rng.binomial(s_z1, e1) / s_z1
        est = fk.decoy_bounds(counts, src, eps_sec)
        fails["s_z0"] += est.s_z0_lower > s_z0
        fails["s_z1"] += est.s_z1_lower > s_z1
        fails["s_x1"] += est.s_x1_lower > s_x1
        fails["v_x1"] += est.v_x1_upper < v_x1
        fails["phi"] += est.phi_z_upper < phase
        plug = fk.decoy_bounds(counts, src, eps_sec, statistics=fk.Statistics.NONE)
        plugin_fails += plug.s_z0_lower > s_z0
    share = eps_sec / fk.EPS_TERMS
    events = {"s_z0": 1, "s_z1": 3, "s_x1": 3, "v_x1": 2, "phi": 9}
    for name, count in fails.items():
        assert count / trials <= events[name] * share, name
    assert plugin_fails / trials > 0.3


# --- intensity intervals ---------------------------------------------------------------------
NOMINAL = (0.5, 0.1, 0.0)
PROBS = (0.6, 0.2, 0.2)


def _box(rel: float, vacuum_upper: float) -> fk.DecoySource:
    return fk.DecoySource(
        (
            fk.Interval.around(NOMINAL[0], rel),
            fk.Interval.around(NOMINAL[1], rel),
            fk.Interval(0.0, vacuum_upper),
        ),
        PROBS,
    )


def _expected_counts(mus: tuple[float, float, float], pulses: float) -> fk.DecoyCounts:
    exp = theory.expected_block(
        0.02,
        1e-6,
        0.015,
        list(zip(PROBS, mus, strict=True)),
        p_z_tx=0.8,
        p_z_rx=0.8,
        pulses=pulses,
    )
    return exp.counts


def _key(est: fk.DecoyEstimates, leak: float) -> float:
    return fk.key_length_raw(est, leak, 1e-10, 1e-15)


@pytest.mark.parametrize("statistics", [fk.Statistics.CHERNOFF, fk.Statistics.HOEFFDING])
def test_interval_bound_is_below_the_bound_at_every_point_of_the_box(
    statistics: fk.Statistics,
) -> None:
    box = _box(0.03, 2e-3)
    counts = _expected_counts(NOMINAL, 1e9)
    leak = 0.05 * sum(counts.n_z)
    wide = fk.decoy_bounds(counts, box, 1e-10, statistics=statistics)
    rng = np.random.default_rng(7)
    corners = [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    points = [
        tuple(iv.lower if k == 0 else iv.upper for iv, k in zip(box.mu, corner, strict=True))
        for corner in corners
    ]
    points += [tuple(float(rng.uniform(iv.lower, iv.upper)) for iv in box.mu) for _ in range(40)]
    for mus in points:
        at = fk.estimate(counts, mus, PROBS, 1e-10, statistics=statistics)  # type: ignore[arg-type]
        assert wide.s_z0_lower <= at.s_z0_lower + 1e-9
        assert wide.s_z1_lower <= at.s_z1_lower + 1e-9
        assert wide.s_x1_lower <= at.s_x1_lower + 1e-9
        assert wide.v_x1_upper >= at.v_x1_upper - 1e-9
        assert wide.phi_z_upper >= at.phi_z_upper - 1e-12
        assert _key(wide, leak) <= _key(at, leak) + 1e-6
    point = fk.estimate(counts, NOMINAL, PROBS, 1e-10, statistics=statistics)
    # the price of +-3 % and a vacuum leaking up to 2e-3: about a fifth of the key here
    assert 0.7 * _key(point, leak) < _key(wide, leak) < _key(point, leak)


def _single_photon_truth(s, cls_of):  # type: ignore[no-untyped-def]
    a = s.basis[s.slot_index]
    match = a == s.bob_basis
    cls = s.intensity[s.slot_index][match]
    z = a[match] == 0
    err = (s.channel.astype(np.uint8) & 1)[match] ^ s.bit[s.slot_index][match]
    counts = fk.DecoyCounts(
        tuple(float(np.sum(cls[z] == k)) for k in range(3)),  # type: ignore[arg-type]
        tuple(float(np.sum(cls[~z] == k)) for k in range(3)),  # type: ignore[arg-type]
        tuple(float(np.sum(err[~z][cls[~z] == k])) for k in range(3)),  # type: ignore[arg-type]
    )
    ph = s.photons_detected[match]
    truth = (
        int(np.sum(z & (ph == 0))),
        int(np.sum(z & (ph == 1))),
        int(np.sum(~z & (ph == 1))),
        int(np.sum(err[~z] & (ph[~z] == 1))),
    )
    return counts, truth


def test_interval_bound_holds_when_the_light_comes_from_the_worst_corner() -> None:
    """Data simulated with the true intensities at a corner of the calibrated box (signal
    high, decoy low, vacuum leaking): the bound computed from the box still contains the true
    vacuum and single-photon numbers, seed after seed."""
    box = _box(0.04, 3e-3)
    true = PostprocParams(
        mu_signal=0.52,
        mu_decoy=0.096,
        mu_vacuum=3e-3,
        p_signal=0.6,
        p_decoy=0.2,
        p_basis_z=0.5,
    )
    for seed in range(12):
        s = generate(300_000, true, seed, eta=0.4, y0=2e-4)
        counts, (s_z0, s_z1, s_x1, v_x1) = _single_photon_truth(s, None)
        est = fk.decoy_bounds(counts, box, 1e-10)
        assert est.s_z0_lower <= s_z0
        assert est.s_z1_lower <= s_z1
        assert est.s_x1_lower <= s_x1
        assert est.v_x1_upper >= v_x1


def test_point_value_away_from_the_truth_overstates_and_the_interval_does_not() -> None:
    """Why the box matters: expected counts from a decoy really at 0.11 but assumed to be
    0.1 give a single-photon 'lower bound' 10 % above the true value; the interval
    [0.09, 0.11] does not (asymptotic statistics, so only the intensity error is at play)."""
    true_mus = (0.5, 0.11, 0.0)
    counts = _expected_counts(true_mus, 1e9)
    eta, y0 = 0.02, 1e-6
    y1 = y0 + eta - y0 * eta
    s_z1_true = (
        1e9 * 0.64 * sum(p * mu * math.exp(-mu) * y1 for p, mu in zip(PROBS, true_mus, strict=True))
    )
    naive = fk.estimate(counts, NOMINAL, PROBS, 1e-10, statistics=fk.Statistics.NONE)
    boxed = fk.decoy_bounds(
        counts,
        fk.DecoySource(
            (fk.Interval.point(0.5), fk.Interval(0.09, 0.11), fk.Interval.point(0.0)), PROBS
        ),
        1e-10,
        statistics=fk.Statistics.NONE,
    )
    assert naive.s_z1_lower > s_z1_true
    assert boxed.s_z1_lower <= s_z1_true


def test_source_box_must_keep_the_intensities_apart() -> None:
    with pytest.raises(fk.FiniteKeyError, match="whole intensity box"):
        fk.DecoySource(
            (fk.Interval(0.3, 0.5), fk.Interval(0.2, 0.32), fk.Interval(0.0, 0.0)), PROBS
        )
    with pytest.raises(fk.FiniteKeyError, match="lower <= upper"):
        fk.Interval(0.2, 0.1)
    with pytest.raises(fk.FiniteKeyError, match="sum to 1"):
        fk.DecoySource.exact(NOMINAL, (0.5, 0.2, 0.2))


def test_params_intervals_reach_the_bound() -> None:
    p = PostprocParams()
    assert fk.source_from_params(p) == fk.DecoySource.exact(NOMINAL, PROBS)
    q = PostprocParams(
        mu_signal_lower=0.49,
        mu_signal_upper=0.51,
        mu_decoy_lower=0.098,
        mu_decoy_upper=0.102,
        mu_vacuum_upper=1e-3,
    )
    counts = _expected_counts(NOMINAL, 1e8)
    wide, point = fk.estimate_from_params(counts, q), fk.estimate_from_params(counts, p)
    assert wide.s_z1_lower < point.s_z1_lower
    hoeffding = fk.estimate_from_params(
        counts, p.model_copy(update={"decoy_statistics": "hoeffding"})
    )
    assert hoeffding.s_z1_lower < point.s_z1_lower
    with pytest.raises(ValueError, match="mu_decoy_lower <= mu_decoy"):
        PostprocParams(mu_decoy_lower=0.11)
    with pytest.raises(ValueError, match="overlap"):
        PostprocParams(mu_signal_lower=0.25, mu_decoy_upper=0.3, mu_decoy=0.2)


# --- published figures: Lim et al., PRA 89, 022307 (2014), Sec. IV and Fig. 1 ---------------
# System model of Sec. IV: eta_Bob = 10 %, p_dc = 6e-7, p_ap = 4e-2, mu3 = 2e-4, 0.2 dB/km,
# e_mis = 5e-3, f_EC = 1.16, eps_cor = 1e-15, eps_sec = kappa * l with kappa = 1e-15; rates
# R = l / N optimised over q_x, p_mu1, p_mu2, mu1, mu2 at fixed block size n_X (key basis);
# Hoeffding statistics. D_k = 1 - (1 - 2 p_dc) exp(-eta_sys k), R_k = D_k (1 + p_ap),
# e_k = p_dc + e_mis (1 - exp(-eta k)) + p_ap D_k / 2. The paper prints eta_ch in the
# misalignment term; with it the error rate floor is e_mis / eta_Bob = 5 % and neither
# published number comes out (ratio 2.7, reach < 60 km), so eta_sys is used, as SatQuMA does.
LIM_ETA_BOB, LIM_PDC, LIM_EMIS, LIM_FEC, LIM_KAPPA, LIM_MU3 = 0.1, 6e-7, 5e-3, 1.16, 1e-15, 2e-4
LIM_SOURCE = optimize.SourceModel(
    mu_vacuum=fk.Interval.point(LIM_MU3),
    p_basis_z_range=(0.5, 0.995),
    mu_signal_max=1.5,
    p_min=1e-3,
)


def _lim_key(
    length_km: float, st: optimize.Settings, n_key: float, p_ap_errors: float
) -> tuple[float, float]:
    p_ap = 0.04
    eta = 10 ** (-0.2 * length_km / 10) * LIM_ETA_BOB
    mus = (st.mu_signal, st.mu_decoy, LIM_MU3)
    ps = (st.p_signal, st.p_decoy, st.p_vacuum)
    d = [1 - (1 - 2 * LIM_PDC) * math.exp(-eta * k) for k in mus]
    r = [dk * (1 + p_ap) for dk in d]
    e = [
        LIM_PDC + LIM_EMIS * (1 - math.exp(-eta * k)) + p_ap_errors * dk / 2
        for k, dk in zip(mus, d, strict=True)
    ]
    q = st.p_basis_z
    pr = sum(p * rk for p, rk in zip(ps, r, strict=True))
    pulses = n_key / (q * q * pr)
    counts = fk.DecoyCounts(
        tuple(pulses * q * q * p * rk for p, rk in zip(ps, r, strict=True)),  # type: ignore[arg-type]
        tuple(pulses * (1 - q) ** 2 * p * rk for p, rk in zip(ps, r, strict=True)),  # type: ignore[arg-type]
        tuple(pulses * (1 - q) ** 2 * p * ek for p, ek in zip(ps, e, strict=True)),  # type: ignore[arg-type]
    )
    e_obs = sum(p * ek for p, ek in zip(ps, e, strict=True)) / pr
    leak = LIM_FEC * n_key * binary_entropy(e_obs)
    src = fk.DecoySource.exact(mus, ps)
    eps_sec, raw = 1e-10, 0.0
    for _ in range(4):  # eps_sec = kappa * l: a fixed point
        est = fk.decoy_bounds(counts, src, eps_sec, statistics=fk.Statistics.HOEFFDING)
        raw = fk.key_length_raw(est, leak, eps_sec, 1e-15)
        eps_sec = min(0.5, LIM_KAPPA * max(raw, 1.0))
    return raw, pulses


def _lim_best(length_km: float, n_key: float, p_ap_errors: float = 0.04) -> float:
    def score(st: optimize.Settings) -> float:
        raw, pulses = _lim_key(length_km, st, n_key, p_ap_errors)
        return optimize.per_pulse_score(raw, pulses, 1e9)

    best, _ = optimize.best_settings(score, source=LIM_SOURCE, max_evaluations=2000)
    return score(best)


def _lim_reach(n_key: float, p_ap_errors: float) -> float:
    lo, hi = 0.0, 250.0
    while hi - lo > 1.0:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _lim_best(mid, n_key, p_ap_errors) > 0 else (lo, mid)
    return lo


@pytest.mark.timeout(120)
def test_lim2014_block_size_gain_at_100_km() -> None:
    """Lim et al. 2014, Sec. IV on Fig. 1: 'at a fiber length of 100 km, the secret key rate
    obtained with n_X = 10^9 is about 1.75 times the one based on n_X = 10^7'. Ours: 1.71.
    Tolerance 10 % (the paper says 'about')."""
    ratio = _lim_best(100.0, 1e9) / _lim_best(100.0, 1e7)
    assert ratio == pytest.approx(1.75, rel=0.10)


@pytest.mark.timeout(120)
def test_lim2014_reach_of_the_smallest_block() -> None:
    """Lim et al. 2014, abstract of Sec. IV and Fig. 1: 'even if we use a block size of
    10^4, cryptographic keys can still be distributed over a fiber length of 135 km'.

    Reproduced (133 km, within 10 %) only when the after-pulse term p_ap D_k / 2 is left out
    of the error model; with it, as printed, the reach is about 108 km (-20 %), while the
    ratio of the test above needs it (1.56 without it). The paper's curves cannot be matched
    by one reading of its printed model; this test pins both numbers so that a change of
    the analysis that moves them is noticed."""
    without = _lim_reach(1e4, p_ap_errors=0.0)
    assert without == pytest.approx(135.0, rel=0.10)
    with_afterpulse = _lim_reach(1e4, p_ap_errors=0.04)
    assert 95.0 < with_afterpulse < without


def _counts_25km(mus: tuple[float, float, float], n_det: float = 1.6e7) -> fk.DecoyCounts:
    """Counts a block of ``n_det`` detections gives on the default link at 25 km."""
    probs, pz, eta, y0, e_d = (0.6, 0.2, 0.2), 0.8, 0.6 * 10 ** (-0.6), 4e-7, 0.01
    det = [y0 + 1 - math.exp(-eta * m) for m in mus]
    pulses = n_det / sum(p * d for p, d in zip(probs, det, strict=True))
    n_z = tuple(pulses * p * d * pz * pz for p, d in zip(probs, det, strict=True))
    n_x = tuple(pulses * p * d * (1 - pz) ** 2 for p, d in zip(probs, det, strict=True))
    err = [(y0 / 2 + e_d * (1 - math.exp(-eta * m))) / d for m, d in zip(mus, det, strict=True)]
    m_x = tuple(n * e for n, e in zip(n_x, err, strict=True))
    return fk.DecoyCounts(n_z, n_x, m_x)  # type: ignore[arg-type]


def test_common_scale_bound_holds_at_every_scale_and_beats_the_box() -> None:
    """One factor common to the three classes (meter calibration, tap attenuation, drift):
    the bound is below the exactly-known bound wherever the true factor lies, and far above
    what independent per-class corners of the same width allow."""
    nominal = (0.5, 0.1, 1e-4)
    probs = (0.6, 0.2, 0.2)
    scale = fk.Interval(0.88, 1.13)
    per_class = fk.DecoySource(tuple(fk.Interval.around(m, 0.005) for m in nominal), probs)  # type: ignore[arg-type]

    def privacy(est: fk.DecoyEstimates) -> float:
        return est.s_z1_lower * (1 - fk.binary_entropy(est.phi_z_upper))

    for true_scale in (0.88, 0.93, 1.0, 1.07, 1.13):
        truth = tuple(true_scale * m for m in nominal)
        counts = _counts_25km(truth)  # type: ignore[arg-type]
        common = fk.decoy_bounds_common_scale(counts, per_class, scale, 1e-10)
        exact = fk.decoy_bounds(counts, fk.DecoySource.exact(truth, probs), 1e-10)  # type: ignore[arg-type]
        assert common.s_z1_lower <= exact.s_z1_lower
        assert common.phi_z_upper >= exact.phi_z_upper
        assert privacy(common) <= privacy(exact)
        assert privacy(common) > 0.75 * privacy(exact)
    counts = _counts_25km(nominal)
    box = fk.DecoySource(
        tuple(fk.Interval(m * 0.88 * 0.995, m * 1.13 * 1.005) for m in nominal),  # type: ignore[arg-type]
        probs,
    )
    assert privacy(fk.decoy_bounds(counts, box, 1e-10)) < 0.5 * privacy(
        fk.decoy_bounds_common_scale(counts, per_class, scale, 1e-10)
    )


def test_common_scale_refuses_a_bad_scale() -> None:
    src = fk.DecoySource.exact((0.5, 0.1, 0.0), (0.6, 0.2, 0.2))
    counts = _counts_25km((0.5, 0.1, 1e-4))
    with pytest.raises(fk.FiniteKeyError):
        fk.decoy_bounds_common_scale(counts, src, fk.Interval(0.0, 1.1), 1e-10)
    with pytest.raises(fk.FiniteKeyError):
        fk.decoy_bounds_common_scale(counts, src, fk.Interval(0.9, 1.1), 1e-10, cells=0)
