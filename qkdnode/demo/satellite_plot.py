"""The plot of a satellite pass in docs/satellite.md: link loss, elevation, detection rate
and key rate through the pass of ``configs/satellite.toml``.

``python -m qkdnode.demo.satellite_plot [CONFIG] [OUT.png]`` (defaults:
``configs/satellite.toml``, ``docs/satellite-pass.png``). The rates are the model's
expectations for the simulated boxes (drawn hardware truths): detections per second at the
ground station, and the asymptotic secret key rate of the protocol that runs (three
intensities, both parties' basis choices, error correction at ``f = 1.1``); the title
carries the finite-key bound on the whole pass (:func:`qkdnode.demo.satellite_run.
pass_theory`). Failure modes: :class:`qkdnode.config.ConfigError` for a bad config file;
``OSError`` if the PNG cannot be written.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from drivers.satellite_pass import pass_profile
from drivers.simlink.satellite_channel import SatelliteChannel, SatelliteChannelParams
from drivers.simlink.truths import resolve_truths
from qkdnode.demo.satellite_run import SatelliteDemoConfig, load_satellite_config, pass_theory

__all__ = ["plot_pass"]


def plot_pass(cfg: SatelliteDemoConfig, out: Path) -> Path:
    """Draw the pass of ``cfg`` (uncompressed) into ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qkdnode.demo.compare import TheoryInputs
    from qkdnode.postproc import theory

    orbit = cfg.satellite.orbit
    prof = pass_profile(orbit, 1.0)
    above = prof.above()
    t = prof.t_s[above] - prof.t_s[above][0]
    link = resolve_truths(cfg.link)
    th = TheoryInputs.from_link(link, cfg.protocol)
    src = link.source
    eta = prof.transmittance[above] * th.detector_efficiency
    classes = ((src.p_signal, src.mu_signal), (src.p_decoy, src.mu_decoy))
    p_vac = max(0.0, 1.0 - src.p_signal - src.p_decoy)
    det_hz = src.slot_rate_hz * np.array(
        [
            sum(p * (1 - (1 - th.y0) * math.exp(-e * mu)) for p, mu in classes)
            + p_vac * (1 - (1 - th.y0) * math.exp(-e * src.mu_vacuum))
            for e in eta
        ]
    )
    key_bps = src.slot_rate_hz * np.array(
        [
            theory.rate_decoy_biased(
                float(e),
                th.y0,
                th.e_d,
                [
                    (src.p_signal, src.mu_signal),
                    (src.p_decoy, src.mu_decoy),
                    (p_vac, src.mu_vacuum),
                ],
                p_z_tx=src.p_basis_z,
                p_z_rx=link.receiver.p_basis_z,
                f=1.1,
            )
            for e in eta
        ]
    )
    rise = 0.0
    channel = SatelliteChannel(SatelliteChannelParams(orbit=orbit, rises_unix_s=(rise,)))
    whole = pass_theory(cfg, channel, rise, rise + channel.duration_s)

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    ax1.plot(t, prof.loss_db[above], color="tab:red", label="link loss (dB)")
    ax1.set_ylabel("link loss (dB)")
    ax1.invert_yaxis()
    ax1b = ax1.twinx()
    ax1b.plot(t, prof.elevation_deg[above], color="tab:gray", ls="--", label="elevation (deg)")
    ax1b.set_ylabel("elevation (deg)")
    lines = ax1.get_lines() + ax1b.get_lines()
    ax1.legend(lines, [str(ln.get_label()) for ln in lines], loc="lower center")
    ax1.grid(alpha=0.3)
    ax2.semilogy(t, det_hz, color="tab:blue", label="detections at the ground station (1/s)")
    ax2.semilogy(
        t, np.maximum(key_bps, 1e-3), color="tab:green", label="secret key, asymptotic (bit/s)"
    )
    ax2.set_xlabel(f"time since rise above {orbit.min_elevation_deg:g} deg (s)")
    ax2.set_ylabel("rate (1/s)")
    ax2.legend(loc="lower center")
    ax2.grid(alpha=0.3, which="both")
    fig.suptitle(
        f"{orbit.altitude_m / 1e3:.0f} km orbit, max elevation {orbit.max_elevation_deg:g} deg, "
        f"{src.slot_rate_hz / 1e6:g} MHz: {prof.time_above_s():.0f} s above "
        f"{orbit.min_elevation_deg:g} deg, finite-key bound {whole.secret_bits / 1e3:.0f} kbit "
        "per pass",
        fontsize=10,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cfg_path = Path(args[0]) if args else Path("configs/satellite.toml")
    out = Path(args[1]) if len(args) > 1 else Path("docs/satellite-pass.png")
    print(plot_pass(load_satellite_config(cfg_path), out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
