"""Seeded statistical validation of the link model against the decoy-state formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from drivers.simlink.source import secret_key, slot_choices
from tests.simlink.helpers import link, run_link


def _n_sigma(observed: float, expected: float, n: int) -> float:
    sigma = math.sqrt(max(expected * (1 - expected), 1e-12) / n)
    return abs(observed - expected) / sigma


def _class_counts(params, n_slots):
    s = params.source
    basis, _, intensity = slot_choices(
        secret_key(params.transmitter_seed),
        np.arange(n_slots, dtype=np.int64),
        p_signal=s.p_signal,
        p_decoy=s.p_decoy,
        p_basis_z=s.p_basis_z,
    )
    return basis, intensity


def test_gain_and_error_per_intensity_class_match_decoy_formulas() -> None:
    params = link(
        chunk_slots=1 << 20,
        fiber={"misalignment": 0.02, "drift_rad_per_sqrt_s": 0.0},
        receiver={"dark_count_rates_hz": 1e5, "dead_time_ns": 0.0},
        source={"mu_vacuum": 0.0},
    )
    n_chunks = 8
    n_slots = n_chunks * params.chunk_slots
    tx, _, rec = run_link(params, n_chunks)
    prep = tx.prepared(rec.slot)
    basis_all, class_all = _class_counts(params, n_slots)

    rx = params.receiver
    eta = params.fiber.transmittance * rx.detector_efficiency[0] * rx.p_basis_z
    y0_det = rx.dark_count_rate_hz * rx.gate_width_ps * 1e-12
    y0 = 1 - (1 - y0_det) ** 2
    e_d = params.fiber.misalignment
    mus = (params.source.mu_signal, params.source.mu_decoy, params.source.mu_vacuum)

    z_click = rec.channel < 2
    for cls, mu in enumerate(mus):
        n_cls = int(np.count_nonzero(class_all == cls))
        slots_clicked = np.unique(rec.slot[z_click & (prep.intensity == cls)])
        q_obs = slots_clicked.size / n_cls
        q_exp = 1 - (1 - y0) * math.exp(-eta * mu)
        assert _n_sigma(q_obs, q_exp, n_cls) < 5, (cls, q_obs, q_exp)

        sifted = z_click & (prep.intensity == cls) & (prep.basis == 0)
        errors = (rec.channel[sifted] % 2) != prep.bit[sifted]
        e_exp = (y0 / 2 + e_d * (1 - math.exp(-eta * mu))) / q_exp
        assert _n_sigma(float(errors.mean()), e_exp, int(sifted.sum())) < 5, (cls, errors.mean())
    # the basis choice is biased as configured
    assert abs(basis_all.mean() - (1 - params.source.p_basis_z)) < 0.002


def test_dead_time_reduces_rate_as_non_paralysable_model_predicts() -> None:
    base = {"dark_count_rates_hz": 0.0, "afterpulse_probability": 0.0}
    ref_params = link(receiver={**base, "dead_time_ns": 0.0}, fiber={"drift_rad_per_sqrt_s": 0.0})
    dead_params = link(
        receiver={**base, "dead_time_ns": 1010.0}, fiber={"drift_rad_per_sqrt_s": 0.0}
    )
    n_chunks = 4
    n_slots = n_chunks * ref_params.chunk_slots
    _, _, ref = run_link(ref_params, n_chunks)
    _, _, dead = run_link(dead_params, n_chunks)
    blocked_gates = 25  # 1010 ns / 40 ns slots
    for ch in (0, 1):
        p = np.count_nonzero(ref.channel == ch) / n_slots
        expected = p / (1 + blocked_gates * p)
        observed = np.count_nonzero(dead.channel == ch) / n_slots
        assert observed < 0.9 * p  # the effect is large...
        assert abs(observed - expected) < 5 * math.sqrt(expected / n_slots), (
            ch,
            observed,
            expected,
        )
        # ...and no two kept clicks of a detector are closer than the dead time
        t = np.sort(dead.true_time_ps[dead.channel == ch])
        assert np.diff(t).min() >= 1010e3


def test_afterpulsing_raises_rate_by_geometric_factor() -> None:
    base = {"dark_count_rates_hz": 0.0, "dead_time_ns": 20.0}
    fiber = {"drift_rad_per_sqrt_s": 0.0}
    _, _, ref = run_link(link(receiver={**base, "afterpulse_probability": 0.0}, fiber=fiber), 3)
    _, _, ap = run_link(link(receiver={**base, "afterpulse_probability": 0.1}, fiber=fiber), 3)
    ratio = len(ap) / len(ref)
    assert ratio == pytest.approx(1 / (1 - 0.1), rel=0.01)


def test_intercept_resend_on_every_pulse_gives_quarter_error() -> None:
    params = link(
        eve={"mode": "intercept-resend", "fraction": 1.0},
        fiber={"misalignment": 0.0, "drift_rad_per_sqrt_s": 0.0},
    )
    tx, _, rec = run_link(params, 2)
    prep = tx.prepared(rec.slot)
    for basis in (0, 1):
        sifted = ((rec.channel // 2) == basis) & (prep.basis == basis)
        qber = float(((rec.channel[sifted] % 2) != prep.bit[sifted]).mean())
        assert _n_sigma(qber, 0.25, int(sifted.sum())) < 5, (basis, qber)


def test_no_eve_low_error_and_default_rate() -> None:
    params = link()
    tx, _, rec = run_link(params, 2)
    seconds = 2 * params.chunk_slots / params.source.slot_rate_hz
    rate = len(rec) / seconds
    assert 1e6 < rate < 3e6
    prep = tx.prepared(rec.slot)
    sifted = (rec.channel < 2) & (prep.basis == 0)
    qber = float(((rec.channel[sifted] % 2) != prep.bit[sifted]).mean())
    assert 0.005 < qber < 0.02


def test_beam_splitting_is_invisible_but_eve_learns_multiphoton_slots() -> None:
    fiber = {"drift_rad_per_sqrt_s": 0.0}
    _, _, clean = run_link(link(fiber=fiber), 2)
    tx, _, tapped = run_link(link(eve={"mode": "beam-splitting", "fraction": 1.0}, fiber=fiber), 2)
    # what Bob sees is untouched; Eve holds photons of some of the pulses Bob received
    assert np.array_equal(clean.time_ps, tapped.time_ps)
    known = np.concatenate(tx.eve_known_slots)
    assert 0 < known.size < tx.photons_sent
