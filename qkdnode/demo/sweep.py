"""Key rate versus distance: one demo run per distance, a table, a CSV and a PNG plot.

The plot shows the measured secret bits per pulse, the asymptotic decoy-state rate and
the PLOB bound of the same link (log scale). A run that produced no key is drawn as a
downward triangle on the lower edge of the plot.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qkdnode.demo.compare import link_theory
from qkdnode.demo.config import DemoConfig, apply_overrides
from qkdnode.demo.runner import Reporter, run_demo
from qkdnode.demo.summary import DemoSummary, pct, si

CSV_COLUMNS: tuple[str, ...] = (
    "distance_km",
    "duration_s",
    "pulses",
    "detections",
    "sifted_bits",
    "qber",
    "secret_bits",
    "secret_key_rate_bps",
    "secret_bits_per_pulse",
    "theory_secret_bits_per_pulse",
    "ratio_to_theory",
    "theory_three_intensity_bits_per_pulse",
    "ratio_to_protocol",
    "plob_bits_per_pulse",
    "blocks_ok",
    "blocks_aborted",
    "keys_identical",
    "ok",
)


def parse_distances(text: str) -> list[float]:
    """``"0,25,50"`` -> ``[0.0, 25.0, 50.0]``. Raises ValueError naming the bad item."""
    out: list[float] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"--sweep: {item!r} is not a distance in km") from None
        if not 0.0 <= value <= 500.0 or not math.isfinite(value):
            raise ValueError(f"--sweep: {item!r} km is outside [0, 500]")
        out.append(value)
    if not out:
        raise ValueError("--sweep: give at least one distance, e.g. 0,25,50")
    return out


def run_sweep(
    cfg: DemoConfig, distances_km: Sequence[float], reporter: Reporter | None = None
) -> list[DemoSummary]:
    """One demo per distance, each in ``OUT/sweep/<distance>km``."""
    base = cfg.demo.out_dir
    results: list[DemoSummary] = []
    for d in distances_km:
        point = apply_overrides(cfg, distance_km=d, out_dir=base / "sweep" / f"{d:g}km")
        if reporter is not None:
            reporter.step(f"--- {d:g} km ---")
        results.append(run_demo(point, reporter))
    return results


def sweep_table(results: Sequence[DemoSummary]) -> str:
    header = (
        f"{'km':>6} {'QBER':>8} {'det/s':>11} {'key bits':>10} {'SKR':>11} "
        f"{'bits/pulse':>10} {'theory':>10} {'ratio':>6} {'PLOB':>10} {'keys':>5}"
    )
    rows = [header, "-" * len(header)]

    def e(x: float | None) -> str:
        return "-" if x is None else f"{x:.3e}"

    for s in results:
        ratio = "-" if s.ratio_to_theory is None else f"{s.ratio_to_theory:.2f}"
        rows.append(
            f"{s.distance_km:>6g} {pct(s.qber):>8} {si(s.detection_rate_hz):>11} "
            f"{s.secret_bits:>10} {si(s.secret_key_rate_bps, 'b/s'):>11} "
            f"{s.secret_bits_per_pulse:>10.3e} {e(s.theory_secret_bits_per_pulse):>10} "
            f"{ratio:>6} {e(s.plob_bits_per_pulse):>10} "
            f"{('same' if s.keys_identical else 'DIFF'):>5}"
        )
    return "\n".join(rows)


def write_csv(results: Sequence[DemoSummary], path: Path) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for s in results:
            row = s.model_dump()
            writer.writerow(["" if row[c] is None else row[c] for c in CSV_COLUMNS])
    return path


def theory_curve(
    cfg: DemoConfig, max_km: float, points: int = 121
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distance km, asymptotic bits/pulse, PLOB bits/pulse); NaN where unavailable."""
    distances = np.linspace(0.0, max(max_km, 1.0), points)
    rate = np.full(points, np.nan)
    plob = np.full(points, np.nan)
    for i, d in enumerate(distances):
        link = cfg.link.model_copy(
            update={"fiber": cfg.link.fiber.model_copy(update={"length_km": float(d)})}
        )
        t = link_theory(link, cfg.protocol)
        if t["secret_bits_per_pulse"] is not None:
            rate[i] = t["secret_bits_per_pulse"]
        if t["plob_bits_per_pulse"] is not None:
            plob[i] = t["plob_bits_per_pulse"]
    return distances, rate, plob


def plot_sweep(results: Sequence[DemoSummary], cfg: DemoConfig, path: Path) -> Path:
    """PNG: measured points, the asymptotic curve and PLOB against distance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    max_km = max([s.distance_km for s in results] + [1.0]) * 1.1
    d, rate, plob = theory_curve(cfg, max_km)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    try:
        if np.isfinite(plob).any():
            ax.semilogy(d, plob, "k--", lw=1, label="PLOB bound (repeaterless)")
        positive = np.where(rate > 0, rate, np.nan)
        if np.isfinite(positive).any():
            ax.semilogy(d, positive, "C0-", lw=1.5, label="decoy BB84, asymptotic (GLLP)")
        measured = [(s.distance_km, s.secret_bits_per_pulse) for s in results]
        hits = [(x, y) for x, y in measured if y > 0]
        misses = [x for x, y in measured if y <= 0]
        ax.set_yscale("log")
        if hits:
            xs, ys = zip(*hits, strict=True)
            ax.plot(xs, ys, "C3o", ms=7, label="measured (qkdnode demo)")
        finite = [v for v in [*positive[np.isfinite(positive)], *(y for _, y in hits)] if v > 0]
        floor = min(finite) / 10 if finite else 1e-8
        if misses:
            ax.plot(misses, [floor] * len(misses), "C3v", ms=7, label="measured: no key")
        ax.set_ylim(bottom=floor / 2)
        ax.set_xlim(0, max_km)
        ax.set_xlabel("fiber length (km)")
        ax.set_ylabel("secret bits per pulse")
        ax.set_title("qkdnode demo: secret key rate versus distance")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
