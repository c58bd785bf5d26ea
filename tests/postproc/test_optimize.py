"""The settings optimiser and the block-size advice on the default simulated link."""

from __future__ import annotations

import time

import pytest

from drivers.simlink.params import LinkParams
from qkdnode.config.sections import ProtocolSection
from qkdnode.demo.compare import TheoryInputs, link_at
from qkdnode.postproc import optimize as opt
from qkdnode.postproc.finitekey import Interval

DEFAULTS = opt.Settings(mu_signal=0.5, mu_decoy=0.1, p_signal=0.6, p_decoy=0.2, p_basis_z=0.8)


def default_link(distance_km: float, *, receiver_basis_fixed: bool = False) -> opt.LinkModel:
    """The default simulated link (25 MHz, 0.2 dB/km + 1 dB, efficiency 0.6, 4 x 100 Hz dark
    counts in 1 ns gates, e_d = 1 %, f = 1.1) at ``distance_km``."""
    inputs = TheoryInputs.from_link(link_at(LinkParams(), distance_km), ProtocolSection())
    return inputs.link_model(receiver_basis_fixed=receiver_basis_fixed)


TEN_MINUTES = opt.Pulses(25e6 * 600)


@pytest.mark.parametrize("distance_km", [50.0, 100.0])
def test_optimiser_beats_the_fixed_defaults(distance_km: float) -> None:
    link = default_link(distance_km)
    plain = opt.expected_key(link, DEFAULTS, TEN_MINUTES)
    best = opt.optimize_settings(link, TEN_MINUTES)
    assert best.bits_per_pulse > 1.3 * plain.bits_per_pulse > 0
    assert best.seconds < 1.0


def test_optimiser_with_a_passive_receiver_still_helps() -> None:
    link = default_link(100.0, receiver_basis_fixed=True)
    plain = opt.expected_key(link, DEFAULTS, TEN_MINUTES)
    best = opt.optimize_settings(link, TEN_MINUTES)
    assert best.bits_per_pulse > plain.bits_per_pulse > 0


def test_optimised_settings_respect_the_source_constraints() -> None:
    source = opt.SourceModel(
        mu_vacuum=Interval(0.0, 2e-3),
        mu_rel_uncertainty=0.05,
        mu_signal_max=0.8,
        p_min=0.02,
        p_basis_z_range=(0.6, 0.95),
    )
    for d in (0.0, 80.0, 160.0):
        st = opt.optimize_settings(default_link(d), TEN_MINUTES, source=source).settings
        u = source.mu_rel_uncertainty
        assert st.mu_signal * (1 - u) > st.mu_decoy * (1 + u) + 2e-3  # mu1 > mu2 + mu3, boxed
        assert st.mu_decoy * (1 - u) > 2e-3  # mu2 > mu3, boxed
        assert st.mu_signal <= 0.8
        assert min(st.p_signal, st.p_decoy, st.p_vacuum) >= 0.02 - 1e-12
        assert st.p_signal + st.p_decoy + st.p_vacuum == pytest.approx(1.0)
        assert 0.6 <= st.p_basis_z <= 0.95


def test_intensity_uncertainty_costs_key() -> None:
    link = default_link(50.0)
    exact = opt.optimize_settings(link, TEN_MINUTES)
    loose = opt.optimize_settings(
        link, TEN_MINUTES, source=opt.SourceModel(mu_rel_uncertainty=0.05)
    )
    assert 0.5 * exact.bits_per_pulse < loose.bits_per_pulse < exact.bits_per_pulse


def test_blocks_in_detections_and_in_pulses_agree() -> None:
    link = default_link(50.0)
    by_pulses = opt.expected_key(link, DEFAULTS, TEN_MINUTES)
    by_detections = opt.expected_key(link, DEFAULTS, opt.Detections(by_pulses.detections))
    assert by_detections.pulses == pytest.approx(TEN_MINUTES.count)
    assert by_detections.secret_bits == pytest.approx(by_pulses.secret_bits, rel=1e-9)


def test_finite_rate_approaches_the_asymptotic_rate() -> None:
    link = default_link(50.0)
    asym = opt.optimize_asymptotic(link)
    sizes = (1e9, 1e11, 1e13, 1e17)
    rates = [opt.optimize_settings(link, opt.Pulses(n)).bits_per_pulse for n in sizes]
    assert rates == sorted(rates)
    assert 0.99 * asym.bits_per_pulse < rates[-1] <= asym.bits_per_pulse  # 1e17: 99.7 %


@pytest.mark.timeout(60)
def test_required_block_reaches_the_fraction() -> None:
    link = default_link(50.0)
    t0 = time.perf_counter()
    advice = opt.required_block(link, fraction=0.9)
    elapsed = time.perf_counter() - t0
    assert advice.optimum.bits_per_pulse >= 0.9 * advice.asymptotic_bits_per_pulse
    smaller = opt.optimize_settings(link, opt.Detections(advice.detections / 1.3))
    assert smaller.bits_per_pulse < 0.9 * advice.asymptotic_bits_per_pulse
    assert 1e6 < advice.detections < 1e11
    assert advice.acquisition_s == pytest.approx(advice.pulses / 25e6)
    assert elapsed < 10.0


@pytest.mark.timeout(120)
def test_one_hour_blocks_reach_close_to_the_asymptotic_distance() -> None:
    """Expected counts of a 1-hour block (9e10 pulses at 25 MHz) on the default link,
    settings optimised at each distance, against infinitely large blocks of the same
    three-intensity protocol (optimised too): the aim is a reach within 10 %.

    Measured (bisection to 1 km, as here): 228.1 km against 250.8 km, 9.0 % short (to
    0.1 km: 228.7 against 251.2 km, 8.9 %). With one Chernoff limit per class and Lim et
    al.'s phase-error term the same block reached 224.2 km (10.6 % short). The gain is
    the one-event-per-combination decoy bound (+4.2 km; the single-photon combination alone
    +2.9 km) and the phase-error sampling bound (+0.3 km); docs/finite-key.md, section
    "Reach", has the numbers of every candidate. What remains is the count statistics of
    the decoy and vacuum classes: with exact counts the reach would be 248.6 km."""
    asymptotic = opt.reach_km(default_link, None, tolerance_km=1.0)
    one_hour = opt.reach_km(default_link, opt.Pulses(25e6 * 3600), tolerance_km=1.0)
    assert 240.0 < asymptotic < 265.0
    assert one_hour >= 0.90 * asymptotic
    assert one_hour < asymptotic
