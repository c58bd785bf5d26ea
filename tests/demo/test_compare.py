"""The translation of the simulated link into the asymptotic model's inputs."""

from __future__ import annotations

import importlib.util
import math

import pytest

from drivers.simlink.params import LinkParams
from drivers.simlink.truths import resolve_truths
from qkdnode.config.sections import ProtocolSection
from qkdnode.demo.compare import TheoryInputs, link_theory
from qkdnode.demo.config import DemoConfig, apply_overrides


def test_inputs_follow_the_link() -> None:
    link = LinkParams.model_validate(
        {
            "fiber": {
                "length_km": 50,
                "loss_db_per_km": 0.2,
                "insertion_loss_db": 1.0,
                "misalignment": 0.015,
            },
            "receiver": {
                "detector_efficiency": [0.5, 0.6, 0.7, 0.6],
                "dark_count_rate_hz": 1000,
                "gate_width_ps": 500,
                "p_basis_z": 0.8,
            },
        }
    )
    t = TheoryInputs.from_link(link, ProtocolSection(ec_efficiency_target=1.15))
    # Theory takes the boxes' drawn truths, not the nominal values they are drawn around.
    truth = resolve_truths(link).receiver
    eff = sum(truth.detector_efficiency) / 4
    assert eff != pytest.approx(0.6, rel=1e-3)
    assert t.channel_transmittance == pytest.approx(10 ** (-(50 * 0.2 + 1.0) / 10))
    assert t.detector_efficiency == pytest.approx(eff)
    assert t.transmittance == pytest.approx(t.channel_transmittance * eff)
    assert t.y0 == pytest.approx(4 * truth.dark_count_rate_hz * 500e-12, rel=1e-5)
    assert t.e_d == 0.015 and t.p_basis_z_rx == 0.8 and t.ec_efficiency == 1.15
    assert t.slot_rate_hz == link.source.slot_rate_hz


def test_transmittance_falls_with_distance() -> None:
    etas = [
        TheoryInputs.from_link(
            apply_overrides(DemoConfig(), distance_km=d).link, ProtocolSection()
        ).transmittance
        for d in (0, 25, 50, 100)
    ]
    assert etas == sorted(etas, reverse=True)
    assert math.log10(etas[0] / etas[-1]) == pytest.approx(2.0)  # 100 km x 0.2 dB/km


def test_link_theory_reports_rates_or_why_not() -> None:
    cfg = DemoConfig()
    t = link_theory(cfg.link, cfg.protocol)
    assert t["transmittance"] == pytest.approx(cfg.link.fiber.transmittance)
    if importlib.util.find_spec("qkdnode.postproc.theory") is None:
        assert t["secret_bits_per_pulse"] is None and "not available" in t["note"]
    else:
        assert t["note"] is None, t["note"]
        assert 0 < t["secret_bits_per_pulse"] < t["plob_bits_per_pulse"]
        assert t["plob_bits_per_pulse"] == pytest.approx(
            -math.log2(1 - cfg.link.fiber.transmittance)
        )
