"""The intensity set the finite-key bound takes under a drift of one class alone.

Each class's statistical interval is widened by its own drift allowance
(``signal_drift_allowance``, ``decoy_drift_allowance``, the vacuum's rise
``vacuum_drift_allowance``), independently of the others; one factor common to the classes scales them all (meter, tap-to-output,
laser, VOA). On the simulated box: a bias offset that moves the decoy and not the signal,
within the allowance, leaves the world's true intensities inside that set (without the
per-class allowance it did not); the per-class checks judge each class against the
allowance the bound uses; a configuration whose allowances make the classes overlap is
refused at calibration, naming the keys. Also the key the allowances cost, on the
default link and block (``python -m tests.procedures.test_class_bounds`` prints the
table).
"""

from __future__ import annotations

import asyncio

import pytest
from scipy.optimize import brentq

from drivers.simlink.params import DriftParams, SourceParams
from qkdnode.postproc import finitekey, theory
from qkdnode.postproc.cascade import binary_entropy
from qkdnode.postproc.params import PostprocParams
from qkdnode.procedures.bias_tracking import ClassDriftState, class_fractions
from qkdnode.procedures.class_drift import ClassDriftModel
from qkdnode.procedures.common import CalibrationError
from qkdnode.procedures.mean_photon_number import (
    IntensityUncertainty,
    MeanPhotonConfig,
    MeanPhotonResult,
    calibrate_mean_photon_number,
)
from tests.procedures.test_drift_tracking import (
    Box,
    boxes,  # noqa: F401  (the fixture)
    make_box,
    probabilities,
)


def with_allowances(
    m: MeanPhotonResult, signal: float, decoy: float, vacuum: float
) -> MeanPhotonResult:
    """The same measurement with other per-class allowances."""
    u = m.uncertainty.model_copy(
        update={
            "signal_drift_allowance": signal,
            "decoy_drift_allowance": decoy,
            "vacuum_drift_allowance": vacuum,
        }
    )
    return m.model_copy(update={"uncertainty": u})


def test_class_bounds_are_a_box_of_each_class_widened_by_its_own_allowance(
    boxes: list[Box],  # noqa: F811
) -> None:
    box = make_box(DriftParams())
    boxes.append(box)
    m = with_allowances(box.mu, 0.005, 0.05, 1.5)
    stat = m.statistical_bounds()
    (sl, su), (dl, du), (vl, vu) = m.class_bounds()
    assert (sl, su) == pytest.approx((stat[0][0] * 0.995, stat[0][1] * 1.005))
    assert (dl, du) == pytest.approx((stat[1][0] * 0.95, stat[1][1] * 1.05))
    # the vacuum: its upper bound 2.5 times the statistical one, its lower bound 0
    assert vu == pytest.approx(stat[2][1] * 2.5) and vl == 0.0
    # the statistical part is narrow (meter noise): the allowance dominates
    assert stat[1][1] / stat[1][0] - 1 < 0.01
    # the common factor is the meter, tap-to-output and the common drift only
    u = m.uncertainty
    assert m.common_scale() == pytest.approx(
        (
            (1 - u.meter_uncertainty)
            * 10 ** (-u.tap_to_output_uncertainty_db / 10)
            * (1 - u.drift_allowance),
            (1 + u.meter_uncertainty)
            * 10 ** (u.tap_to_output_uncertainty_db / 10)
            * (1 + u.drift_allowance),
        )
    )
    # the independent box of bounds() is the class box times the common extremes
    c_lo, c_hi = m.common_scale()
    assert m.bounds()[1] == pytest.approx((dl * c_lo, du * c_hi))
    # the bound takes exactly these (a block's parameters accept them)
    fields = m.bound_fields()
    p = PostprocParams(**fields)
    lower, upper = p.mu_bounds()
    assert lower == pytest.approx((sl, dl, vl)) and upper == pytest.approx((su, du, vu))
    assert (p.mu_scale_lower, p.mu_scale_upper) == pytest.approx((c_lo, c_hi))
    # a vacuum allowance below 1 keeps a lower bound for a resolved vacuum
    half = with_allowances(box.mu, 0.005, 0.05, 0.5)
    assert half.class_bounds()[2][0] == pytest.approx(stat[2][0] * 0.5)


def _drift_decoy_by(box: Box, change: float) -> None:
    """Moves the simulated modulator's bias optimum so that the true decoy changes by
    ``change`` (the smallest such move)."""
    optics = box.link.tx.optics
    start = optics.im_bias_drift_v
    decoy0 = box.link.tx.mu_per_class()[1]

    def off(x: float) -> float:
        optics.im_bias_drift_v = start + x
        return box.link.tx.mu_per_class()[1] / decoy0 - 1 - change

    roots = []
    for a, b in ((0.0, 0.3), (0.0, -0.3)):
        if off(a) * off(b) < 0:
            roots.append(float(brentq(off, a, b, xtol=1e-7)))
    assert roots, f"no bias move changes the decoy by {change}"
    optics.im_bias_drift_v = start + min(roots, key=abs)


@pytest.mark.parametrize(("change", "inside"), [(0.02, True), (-0.025, True), (0.08, False)])
def test_decoy_drift_alone_within_its_allowance_is_inside_the_bound(
    boxes: list[Box],  # noqa: F811
    change: float,
    inside: bool,
) -> None:
    """The simulated box's bias moved so that its true decoy changes by ``change`` while
    the signal stays (within 0.2 %): within the 3 % allowance the world's true
    intensities are in the bound's set (class bounds times one common factor); without a
    per-class allowance they are not (the previous model: one common factor only, which
    a decoy moving alone leaves); at 8 % not even with it."""
    box = make_box(DriftParams())
    boxes.append(box)
    before = box.link.tx.mu_per_class()
    _drift_decoy_by(box, change)
    after = box.link.tx.mu_per_class()
    assert after[1] / before[1] - 1 == pytest.approx(change, abs=0.003)
    assert abs(after[0] / before[0] - 1) < 0.002
    m = with_allowances(box.mu, 0.005, 0.03, 1.0)
    assert m.admits(before)
    assert m.admits(after) is inside
    assert not with_allowances(box.mu, 0.0, 0.0, 0.0).admits(after)


def test_the_checks_judge_each_class_against_the_allowance_the_bound_uses(
    boxes: list[Box],  # noqa: F811
) -> None:
    """class_fractions (the tracking step's and the tap check's verdict) reads the
    allowances from the intensities in use: a change inside the class bounds is below 1,
    one outside above; the vacuum falls freely when its lower bound is 0."""
    box = make_box(DriftParams())
    boxes.append(box)
    d = box.modulator
    state = ClassDriftState(60.0, 5.0)
    state.model = ClassDriftModel.from_calibration(
        d, (d.signal_v, box.mu.decoy_v, d.vacuum_v), probabilities(box)
    )
    m = with_allowances(box.mu, 0.005, 0.03, 1.0)
    assert max(class_fractions(state, m, (0.0049, 0.029, 0.0))) < 1
    assert class_fractions(state, m, (0.0, -0.031, 0.0))[1] > 1
    assert class_fractions(state, m, (0.0051, 0.0, 0.0))[0] > 1
    assert class_fractions(state, m, (0.0, 0.0, 0.9))[2] < 1
    assert class_fractions(state, m, (0.0, 0.0, 1.1))[2] > 1
    assert class_fractions(state, m, (0.0, 0.0, -0.95))[2] == 0.0
    # another allowance in the intensities, another verdict on the same change
    wide = with_allowances(box.mu, 0.005, 0.05, 3.0)
    assert max(class_fractions(state, wide, (0.0, 0.04, 2.5))) < 1
    # a resolved vacuum with an allowance below 1: a fall counts too
    tight = with_allowances(box.mu, 0.005, 0.03, 0.5)
    if tight.vacuum.resolved:
        assert class_fractions(state, tight, (0.0, 0.0, -0.6))[2] > 1


def test_allowances_that_make_the_classes_overlap_are_refused_at_calibration(
    boxes: list[Box],  # noqa: F811
) -> None:
    """A decoy at 60 % of the signal with a 25 % signal and decoy allowance: the signal's
    lower bound falls below the decoy's upper bound, which the decoy-state bound cannot
    take. Calibration refuses it and names the keys; at 10 % it calibrates."""
    box = make_box(DriftParams(), source=SourceParams(mu_signal=0.5, mu_decoy=0.3))
    boxes.append(box)
    inst, src = box.inst, box.link.params.source

    async def calibrate(allowance: float) -> MeanPhotonResult:
        return await calibrate_mean_photon_number(
            inst["laser"],
            inst["im"],
            inst["voa"],
            inst["meter"],
            box.modulator,
            mu_signal=src.mu_signal,
            mu_decoy=src.mu_decoy,
            slot_rate_hz=src.slot_rate_hz,
            cfg=MeanPhotonConfig(
                tap_to_output_db=box.link.params.transmitter.tap_to_output_db,
                uncertainty=IntensityUncertainty(
                    signal_drift_allowance=allowance, decoy_drift_allowance=allowance
                ),
            ),
        )

    with pytest.raises(CalibrationError) as err:
        asyncio.run(calibrate(0.25))
    for key in ("signal", "decoy", "vacuum"):
        assert f"calibration.{key}_drift_allowance" in str(err.value)
    ok = asyncio.run(calibrate(0.1))
    assert ok.bound_conditions_error() is None
    with pytest.raises(ValueError, match="decoy_drift_allowance"):
        with_allowances(ok, 0.25, 0.25, 1.0).bound_fields()


# --- the key the allowances cost ------------------------------------------------------------
#: the default link (configs/demo.toml): 25 km at 0.2 dB/km, 1 dB insertion, detector
#: efficiency 0.6, optical error 1 %, a background of 1e-6 per slot; receiver Z 0.8
LINK_ETA = 10 ** (-(25 * 0.2 + 1.0) / 10) * 0.6
LINK_Y0 = 1e-6
LINK_E_D = 0.01
EC_F = 1.1


def secret_bits(m: MeanPhotonResult, truth: tuple[float, float, float], box: Box) -> float:
    """Secret bits (before rounding) of a block of the daemon's default size with the
    expected counts of the default link at the true intensities ``truth``, the bound
    taking ``m`` (bound_fields, as the exchange does)."""
    from qkdnode.config.sections import ProtocolSection

    src = box.link.params.source
    probs = (src.p_signal, src.p_decoy, src.p_vacuum)
    classes = list(zip(probs, truth, strict=True))
    per_pulse = sum(p * theory.gain(mu, LINK_ETA, LINK_Y0) for p, mu in classes)
    pulses = int(ProtocolSection.model_fields["block_detections"].default) / per_pulse
    exp = theory.expected_block(
        LINK_ETA, LINK_Y0, LINK_E_D, classes, p_z_tx=src.p_basis_z, p_z_rx=0.8, pulses=pulses
    )
    params = PostprocParams(
        **m.bound_fields(), p_signal=src.p_signal, p_decoy=src.p_decoy, p_basis_z=src.p_basis_z
    )
    est = finitekey.estimate_from_params(exp.counts, params)
    leak = EC_F * sum(exp.counts.n_z) * binary_entropy(exp.qber_z)
    return finitekey.key_length_raw(est, leak, params.eps_sec, params.eps_cor)


#: (signal, decoy, vacuum) allowances of the key-cost table: none (the bound before the
#: per-class allowances), the vacuum alone, the signal and decoy alike (2, 3, 5 %), and the
#: decoy with a small signal allowance (the defaults among them)
COST_ROWS = (
    (0.0, 0.0, 0.0),
    (0.0, 0.0, 1.0),
    (0.0, 0.0, 3.0),
    (0.02, 0.02, 1.0),
    (0.03, 0.03, 1.0),
    (0.05, 0.05, 1.0),
    (0.005, 0.03, 1.0),
    (0.005, 0.05, 1.0),
)


def key_cost_table(box: Box) -> dict[tuple[float, float, float], tuple[float, float]]:
    """(signal, decoy, vacuum allowance) -> (secret bits per block, relative to no
    per-class allowance) for the box's calibration."""
    truth = box.link.tx.mu_per_class()
    base = secret_bits(with_allowances(box.mu, 0.0, 0.0, 0.0), truth, box)
    rows = {}
    for a in COST_ROWS:
        bits = secret_bits(with_allowances(box.mu, *a), truth, box)
        rows[a] = (bits, bits / base)
    return rows


def test_the_vacuum_widening_costs_almost_no_key_the_decoy_allowance_some(
    boxes: list[Box],  # noqa: F811
) -> None:
    """On the default link and block: doubling the vacuum's upper bound costs under
    0.5 % of the key; the signal's and decoy's allowances cost key, more for a larger
    one, and a small signal allowance (it moves to second order) saves part of it."""
    box = make_box(DriftParams())
    boxes.append(box)
    rows = {a: rel for a, (_, rel) in key_cost_table(box).items()}
    assert 0.995 < rows[(0.0, 0.0, 1.0)] <= 1.0
    assert rows[(0.0, 0.0, 3.0)] <= rows[(0.0, 0.0, 1.0)]
    assert rows[(0.05, 0.05, 1.0)] < rows[(0.03, 0.03, 1.0)] < rows[(0.02, 0.02, 1.0)] < 1.0
    assert rows[(0.005, 0.05, 1.0)] > rows[(0.05, 0.05, 1.0)]
    assert rows[(0.005, 0.03, 1.0)] > rows[(0.03, 0.03, 1.0)]
    default = IntensityUncertainty().class_allowances()
    assert rows[default] > 0.8


if __name__ == "__main__":
    b = make_box(DriftParams())
    try:
        print(f"true mu {b.link.tx.mu_per_class()}")
        for (sa, da, va), (bits, rel) in key_cost_table(b).items():
            print(
                f"allowances signal {sa:.3f} decoy {da:.3f} vacuum {va:.1f}: "
                f"{bits / 1e6:.4f} Mbit per block ({rel:.4f} of none)"
            )
    finally:
        b.link.close()


def test_the_bound_at_a_drifted_decoy_is_no_better_than_the_exact_one(
    boxes: list[Box],  # noqa: F811
) -> None:
    """The decoy drifted alone by +4 % (within its 5 %): on the expected counts of the
    drifted truth the bound the node computes (class bounds, common scale) gives no more
    single photons and no lower phase error than the bound with the exact true
    intensities (the truth lies in the set it takes; without the per-class allowances it
    does not, and nothing guarantees that)."""
    from qkdnode.postproc.finitekey_decoy import decoy_bounds
    from qkdnode.postproc.finitekey_model import DecoySource

    box = make_box(DriftParams())
    boxes.append(box)
    _drift_decoy_by(box, 0.04)
    truth = box.link.tx.mu_per_class()
    src = box.link.params.source
    probs = (src.p_signal, src.p_decoy, src.p_vacuum)
    classes = list(zip(probs, truth, strict=True))
    exp = theory.expected_block(
        LINK_ETA, LINK_Y0, LINK_E_D, classes, p_z_tx=src.p_basis_z, p_z_rx=0.8, pulses=1e11
    )
    exact = decoy_bounds(exp.counts, DecoySource.exact(truth, probs), 1e-10)

    def node_bound(m: MeanPhotonResult) -> finitekey.DecoyEstimates:
        params = PostprocParams(
            **m.bound_fields(), p_signal=src.p_signal, p_decoy=src.p_decoy, p_basis_z=src.p_basis_z
        )
        return finitekey.estimate_from_params(exp.counts, params)

    assert box.mu.admits(truth)
    ours = node_bound(box.mu)
    assert ours.s_z1_lower <= exact.s_z1_lower
    assert ours.phi_z_upper >= exact.phi_z_upper
    assert not with_allowances(box.mu, 0.0, 0.0, 0.0).admits(truth)
