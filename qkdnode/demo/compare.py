"""The demo's link in theory: asymptotic decoy-state key rates, the PLOB bound, and the
finite-key rate of optimised settings for blocks of given acquisition time.

The formulas live in :mod:`qkdnode.postproc.theory`; this module only translates the
simulation parameters (:class:`drivers.simlink.params.LinkParams`) and the protocol
settings into that module's inputs, for exactly the link the daemons simulate:

- channel transmittance ``eta_ch`` = fiber and insertion loss (``FiberParams.transmittance``);
- ``eta = eta_ch * eta_det`` with ``eta_det`` the mean detector efficiency;
- background yield ``Y0`` = probability that any of the four detectors gives a dark count
  in the detection window of one slot: ``1 - exp(-4 * dark_rate * gate_width)``;
- optical error ``e_d`` = ``FiberParams.misalignment``;
- intensities, their probabilities and both parties' Z-basis probabilities as simulated;
- error-correction inefficiency ``f`` = ``protocol.ec_efficiency_target``.

Dead time, afterpulsing and the polarisation drift (which the nodes track) are not in
the asymptotic model; at the default rates they cost well under one percent.

``python -m qkdnode.demo.compare --plot docs/img/finite-key-rate.png`` draws the figure of
docs/finite-key.md: secret bits per pulse against distance on the default link for blocks
of 1 min, 10 min and 1 h of acquisition (settings optimised by
:mod:`qkdnode.postproc.optimize`) and for infinitely large blocks.
"""

from __future__ import annotations

import argparse
import importlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drivers.simlink.params import LinkParams
from drivers.simlink.truths import resolve_truths
from qkdnode.config.sections import ProtocolSection

if TYPE_CHECKING:
    from qkdnode.postproc.optimize import LinkModel

N_DETECTORS = 4


@dataclass(frozen=True)
class TheoryInputs:
    """The simulated link as the asymptotic model sees it. All rates are per slot."""

    channel_transmittance: float
    detector_efficiency: float
    transmittance: float
    y0: float
    e_d: float
    mu_signal: float
    mu_decoy: float
    mu_vacuum: float
    p_signal: float
    p_decoy: float
    p_basis_z_tx: float
    p_basis_z_rx: float
    ec_efficiency: float
    slot_rate_hz: float

    @classmethod
    def from_link(cls, link: LinkParams, protocol: ProtocolSection) -> TheoryInputs:
        """The link's drawn hardware truths (the simulated boxes' real efficiencies, dark
        counts, ...), not its nominal values: theory describes the link that ran."""
        link = resolve_truths(link)
        rx = link.receiver
        eta_det = sum(rx.detector_efficiency) / len(rx.detector_efficiency)
        eta_ch = link.fiber.transmittance
        dark_per_slot = rx.dark_count_rate_hz * rx.gate_width_ps * 1e-12
        return cls(
            channel_transmittance=eta_ch,
            detector_efficiency=eta_det,
            transmittance=eta_ch * eta_det,
            y0=-math.expm1(-N_DETECTORS * dark_per_slot),
            e_d=link.fiber.misalignment,
            mu_signal=link.source.mu_signal,
            mu_decoy=link.source.mu_decoy,
            mu_vacuum=link.source.mu_vacuum,
            p_signal=link.source.p_signal,
            p_decoy=link.source.p_decoy,
            p_basis_z_tx=link.source.p_basis_z,
            p_basis_z_rx=rx.p_basis_z,
            ec_efficiency=protocol.ec_efficiency_target,
            slot_rate_hz=link.source.slot_rate_hz,
        )

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def link_model(self, *, receiver_basis_fixed: bool = False) -> LinkModel:
        """The link as :mod:`qkdnode.postproc.optimize` sees it. By default both parties'
        Z probability is left to the optimiser; ``receiver_basis_fixed`` keeps the
        receiver's (a passive beam splitter) at its simulated value."""
        from qkdnode.postproc.optimize import LinkModel

        return LinkModel(
            transmittance=self.transmittance,
            background_per_pulse=self.y0,
            optical_error=self.e_d,
            slot_rate_hz=self.slot_rate_hz,
            ec_inefficiency=self.ec_efficiency,
            p_basis_z_rx=self.p_basis_z_rx if receiver_basis_fixed else None,
        )


def link_at(link: LinkParams, distance_km: float) -> LinkParams:
    """``link`` with its fiber set to ``distance_km``."""
    return link.model_copy(
        update={"fiber": link.fiber.model_copy(update={"length_km": float(distance_km)})}
    )


def link_theory(link: LinkParams, protocol: ProtocolSection) -> dict[str, Any]:
    """``secret_bits_per_pulse`` (asymptotic decoy GLLP), ``three_intensity_bits_per_pulse``
    (the same protocol bounded with its three intensities, as the finite-key analysis does
    for infinite blocks), ``plob_bits_per_pulse``, ``transmittance`` (channel) and ``note``
    for the given link.

    Every value is a finite float or None, so the dict serialises to strict JSON. The rates
    are defined at every distance; the PLOB bound is unbounded when the channel has no loss
    at all (transmittance 1): it is then None and ``note`` says so, the rates stay. Values
    are None (and ``note`` says why) when :mod:`qkdnode.postproc.theory` is not available
    or fails.
    """
    inputs = TheoryInputs.from_link(link, protocol)
    result: dict[str, Any] = {
        "secret_bits_per_pulse": None,
        "three_intensity_bits_per_pulse": None,
        "plob_bits_per_pulse": None,
        "transmittance": inputs.channel_transmittance,
        "note": None,
    }
    try:
        theory = importlib.import_module("qkdnode.postproc.theory")
    except ImportError:
        result["note"] = "qkdnode.postproc.theory not available"
        return result
    notes: list[str] = []
    for key, evaluate in (
        ("secret_bits_per_pulse", _rate_exact_decoy),
        ("three_intensity_bits_per_pulse", _rate_three_intensity),
        ("plob_bits_per_pulse", _plob),
    ):
        try:
            value = float(evaluate(theory, inputs))
        except (AttributeError, TypeError, ValueError) as exc:
            notes.append(f"{key}: theory evaluation failed: {type(exc).__name__}: {exc}")
            continue
        if math.isfinite(value):
            result[key] = value
        else:
            notes.append(
                f"{key}: unbounded at channel transmittance {inputs.channel_transmittance:g}"
                " (no loss), reported as null"
            )
    result["note"] = "; ".join(notes) or None
    return result


def _classes(inputs: TheoryInputs) -> list[tuple[float, float]]:
    p_vac = max(0.0, 1.0 - inputs.p_signal - inputs.p_decoy)
    return [
        (inputs.p_signal, inputs.mu_signal),
        (inputs.p_decoy, inputs.mu_decoy),
        (p_vac, inputs.mu_vacuum),
    ]


# The calls below are the only places that know the theory module's API.
def _rate(theory: Any, inputs: TheoryInputs, formula: str) -> float:
    """``theory.<formula>`` (a decoy-state rate) on the link and settings of ``inputs``."""
    return float(
        getattr(theory, formula)(
            inputs.transmittance,
            inputs.y0,
            inputs.e_d,
            _classes(inputs),
            p_z_tx=inputs.p_basis_z_tx,
            p_z_rx=inputs.p_basis_z_rx,
            f=inputs.ec_efficiency,
        )
    )


def _rate_exact_decoy(theory: Any, inputs: TheoryInputs) -> float:
    return _rate(theory, inputs, "rate_decoy_biased")


def _rate_three_intensity(theory: Any, inputs: TheoryInputs) -> float:
    return _rate(theory, inputs, "rate_decoy_three_intensity")


def _plob(theory: Any, inputs: TheoryInputs) -> float:
    return float(theory.plob_bound(inputs.channel_transmittance))


# --- finite-key curves ----------------------------------------------------------------------
BLOCK_SECONDS = (60.0, 600.0, 3600.0)
DISTANCES_KM = tuple(5.0 * i for i in range(53))  # 0 to 260 km


@dataclass(frozen=True)
class FiniteKeyCurves:
    """Secret bits per pulse against distance: one row per block duration, and the
    asymptotic rate of the same protocol (settings optimised at every point)."""

    distances_km: tuple[float, ...]
    block_seconds: tuple[float, ...]
    bits_per_pulse: tuple[tuple[float, ...], ...]  # [block][distance]
    asymptotic_bits_per_pulse: tuple[float, ...]
    default_settings_bits_per_pulse: tuple[float, ...]  # longest block, unoptimised


def finite_key_curves(
    link: LinkParams | None = None,
    protocol: ProtocolSection | None = None,
    *,
    distances_km: Sequence[float] = DISTANCES_KM,
    block_seconds: Sequence[float] = BLOCK_SECONDS,
) -> FiniteKeyCurves:
    """Optimised expected finite-key rates on ``link`` (default: the default simulated
    link) for blocks of ``block_seconds`` of acquisition at its slot rate."""
    from qkdnode.postproc import optimize as opt

    link = link or LinkParams()
    protocol = protocol or ProtocolSection()
    security = opt.Security(eps_sec=protocol.eps_sec, eps_cor=protocol.eps_cor)
    src = link.source
    defaults = opt.Settings(src.mu_signal, src.mu_decoy, src.p_signal, src.p_decoy, src.p_basis_z)
    starts: list[opt.Settings | None] = [None] * len(block_seconds)
    asym_start: opt.Settings | None = None
    rows: list[list[float]] = [[] for _ in block_seconds]
    asym: list[float] = []
    plain: list[float] = []
    for d in distances_km:
        model = TheoryInputs.from_link(link_at(link, d), protocol).link_model()
        for i, seconds in enumerate(block_seconds):
            block = opt.block_for_seconds(model, seconds)
            best = opt.optimize_settings(model, block, security=security, start=starts[i])
            rows[i].append(best.bits_per_pulse)
            if best.bits_per_pulse > 0:
                starts[i] = best.settings
        a = opt.optimize_asymptotic(model, start=asym_start)
        asym.append(a.bits_per_pulse)
        if a.bits_per_pulse > 0:
            asym_start = a.settings
        longest = opt.block_for_seconds(model, max(block_seconds))
        plain.append(opt.expected_key(model, defaults, longest, security=security).bits_per_pulse)
    return FiniteKeyCurves(
        tuple(float(d) for d in distances_km),
        tuple(float(s) for s in block_seconds),
        tuple(tuple(r) for r in rows),
        tuple(asym),
        tuple(plain),
    )


def _block_label(seconds: float) -> str:
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds / 60:g} min"


def plot_finite_key(curves: FiniteKeyCurves, path: Path) -> Path:
    """PNG of :func:`finite_key_curves` (log scale; zero rates are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def positive(values: Sequence[float]) -> list[float]:
        return [v if v > 0 else math.nan for v in values]

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    try:
        d = curves.distances_km
        ax.semilogy(
            d,
            positive(curves.asymptotic_bits_per_pulse),
            "k--",
            lw=1.2,
            label="infinite blocks (same protocol, optimised)",
        )
        for seconds, row in zip(curves.block_seconds, curves.bits_per_pulse, strict=True):
            ax.semilogy(
                d, positive(row), lw=1.6, label=f"{_block_label(seconds)} blocks, optimised"
            )
        ax.semilogy(
            d,
            positive(curves.default_settings_bits_per_pulse),
            ":",
            color="grey",
            label=f"{_block_label(max(curves.block_seconds))} blocks, default settings",
        )
        ax.set_xlabel("fiber length (km), 0.2 dB/km + 1 dB")
        ax.set_ylabel("secret bits per pulse")
        ax.set_title("Finite-key rate on the default simulated link (25 MHz)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qkdnode.demo.compare")
    parser.add_argument("--plot", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--step-km", type=float, default=5.0)
    parser.add_argument("--max-km", type=float, default=260.0)
    args = parser.parse_args(argv)
    steps = int(args.max_km / args.step_km)
    distances = tuple(i * args.step_km for i in range(steps + 1))
    curves = finite_key_curves(distances_km=distances)
    plot_finite_key(curves, args.plot)
    for seconds, row in zip(curves.block_seconds, curves.bits_per_pulse, strict=True):
        reach = max((d for d, v in zip(distances, row, strict=True) if v > 0), default=0.0)
        print(f"{_block_label(seconds):>7} blocks: key up to {reach:g} km")
    reach = max(
        (d for d, v in zip(distances, curves.asymptotic_bits_per_pulse, strict=True) if v > 0),
        default=0.0,
    )
    print(f"infinite blocks: key up to {reach:g} km; wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
