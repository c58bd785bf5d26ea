"""The result of one demo run: merged node statistics, the verdict, text and JSON forms.

The numbers come from the two nodes' ``status`` replies. The transmitter coordinates
the pair, so protocol counters (sifted bits, QBER, blocks, secret bits) are taken from
it; pulses are counted by the transmitter and detections by the receiver (the larger of
the two reports, since either may count them). Rates are computed here from the wall
time of the exchange as the demo measured it.
"""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class LinkStats(BaseModel):
    """Counters of the link, merged from both nodes' ``status.stats``."""

    model_config = ConfigDict(frozen=True)

    pulses: int = 0
    #: slots of ``pulses`` withheld for tracking windows (the transmitter counts them)
    withheld_slots: int = 0
    detections: int = 0
    #: tags the receiver's time tagger dropped (buffer overflow)
    tags_missed: int = 0
    sifted_bits: int = 0
    qber: float | None = None
    secret_bits: int = 0
    blocks_ok: int = 0
    blocks_aborted: int = 0
    node_secret_key_rate_bps: float = 0.0


def _int(stats: dict[str, Any], key: str) -> int:
    value = stats.get(key)
    return int(value) if isinstance(value, int | float) and math.isfinite(value) else 0


def merge_stats(tx: dict[str, Any], rx: dict[str, Any]) -> LinkStats:
    """Merge the ``stats`` objects of the transmitter and the receiver.

    Every count comes from the transmitter when it has one: it finishes a block last and
    commits it, so its counts cover exactly the blocks whose key was kept. The receiver
    may have finished one more block when the run is stopped (then discarded by the
    two-phase commit); counting its pulses would dilute the rate per pulse."""
    qber = tx.get("qber", rx.get("qber"))
    if qber is None:
        qber = rx.get("qber")
    rate = tx.get("secret_key_rate_bps") or rx.get("secret_key_rate_bps") or 0.0
    return LinkStats(
        pulses=_int(tx, "pulses") or _int(rx, "pulses"),
        withheld_slots=_int(tx, "withheld_slots"),
        detections=_int(tx, "detections") or _int(rx, "detections"),
        tags_missed=_int(rx, "tags_missed"),
        sifted_bits=_int(tx, "sifted_bits") or _int(rx, "sifted_bits"),
        qber=float(qber) if isinstance(qber, int | float) else None,
        secret_bits=_int(tx, "secret_bits") or _int(rx, "secret_bits"),
        blocks_ok=_int(tx, "blocks_ok") or _int(rx, "blocks_ok"),
        blocks_aborted=_int(tx, "blocks_aborted") or _int(rx, "blocks_aborted"),
        node_secret_key_rate_bps=float(rate),
    )


class DemoSummary(BaseModel):
    """Everything a run reports. ``to_json_line`` is the last stdout line with ``--json``."""

    distance_km: float
    duration_s: float = Field(description="wall time of the key exchange, measured")
    requested_duration_s: float
    pulses: int
    withheld_slots: int = Field(
        0,
        description="slots of ``pulses`` withheld from the key for tracking windows (IM "
        "bias, encoder drift, polarisation): a calibration cost, counted by the transmitter",
    )
    detections: int
    tags_missed: int = Field(
        0, description="tags the receiver's time tagger dropped (buffer overflow): lost light"
    )
    sifted_bits: int
    qber: float | None
    secret_bits: int
    secret_key_rate_bps: float
    secret_bits_per_pulse: float
    detection_rate_hz: float
    steady_detection_rate_hz: float | None = Field(
        None,
        description="detections per second committed between the first and last block "
        "commit: the rate the pipeline sustained once running",
    )
    extended_s: float = Field(
        0.0,
        description="seconds the exchange ran past the requested duration to finish the "
        "block that was filling (blocks are sized by the finite-key bound, not the run)",
    )
    block_busy_fractions: list[float] = Field(
        default_factory=list,
        description="per block the receiver finished (in order): the seconds it took from "
        "its first message to its key over the seconds of light it holds; below 1 the "
        "pipeline keeps up with the link however long the run",
    )
    keys_identical: bool
    key_count: dict[str, int]
    blocks_ok: int
    blocks_aborted: int
    theory_secret_bits_per_pulse: float | None = Field(
        description="asymptotic decoy-state rate with infinitely many decoys (GLLP), the "
        "link's truths and the run's settings"
    )
    theory_three_intensity_bits_per_pulse: float | None = Field(
        None,
        description="asymptotic rate of the protocol the nodes run: the same three "
        "intensities, bounded by the same decoy analysis with exact counts",
    )
    plob_bits_per_pulse: float | None
    ratio_to_theory: float | None = Field(description="secret bits per pulse over the GLLP rate")
    ratio_to_protocol: float | None = Field(
        None, description="secret bits per pulse over the three-intensity asymptotic rate"
    )
    below_plob: bool | None
    transmittance: float | None
    eve: str | None
    seed: int | None
    security: str
    daemon_exit_codes: dict[str, int | None]
    clean_shutdown: bool
    ok: bool
    failure: str | None
    out_dir: str
    theory_note: str | None = None

    def to_json_line(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=False, allow_nan=False)


def verdict(
    *, keys_identical: bool, blocks_ok: int, eve_active: bool, clean_shutdown: bool
) -> tuple[bool, str | None]:
    """Whether the run succeeded and, if not, why.

    Success: both stores identical and at least one block distilled; with an attacker, an
    empty key (every block aborted) is success too. A daemon that did not stop cleanly is
    a failure either way.
    """
    if not keys_identical:
        return False, "the key stores differ"
    if not clean_shutdown:
        return False, "a daemon did not shut down cleanly"
    if blocks_ok >= 1:
        return True, None
    if eve_active:
        return True, None
    return False, "no key block succeeded"


def build_summary(
    *,
    stats: LinkStats,
    distance_km: float,
    exchange_wall_s: float,
    requested_duration_s: float,
    digests: dict[str, dict[str, Any]],
    theory: dict[str, Any],
    eve: str | None,
    seed: int | None,
    security: str,
    exit_codes: dict[str, int | None],
    out_dir: str,
    failure: str | None = None,
    steady_detection_rate_hz: float | None = None,
    extended_s: float = 0.0,
    block_busy_fractions: list[float] | None = None,
) -> DemoSummary:
    """Combine the measured pieces into a :class:`DemoSummary`.

    ``digests`` maps node ID to its ``keys.digest`` reply ({"count", "sha256"});
    ``theory`` holds ``secret_bits_per_pulse``, ``plob_bits_per_pulse``, ``transmittance``
    (each may be None) and optionally ``note``.
    """
    wall = max(exchange_wall_s, 1e-9)
    pulses = stats.pulses
    per_pulse = stats.secret_bits / pulses if pulses > 0 else 0.0
    counts = {node: int(d.get("count", 0)) for node, d in digests.items()}
    shas = {str(d.get("sha256", "")) for d in digests.values()}
    keys_identical = len(digests) == 2 and len(shas) == 1 and len(set(counts.values())) == 1
    theory_rate = theory.get("secret_bits_per_pulse")
    three = theory.get("three_intensity_bits_per_pulse")
    plob = theory.get("plob_bits_per_pulse")
    ratio = per_pulse / theory_rate if theory_rate else None
    below_plob = per_pulse <= plob if plob is not None else None
    clean = all(code == 0 for code in exit_codes.values()) and len(exit_codes) == 2
    ok, why = verdict(
        keys_identical=keys_identical,
        blocks_ok=stats.blocks_ok,
        eve_active=eve is not None,
        clean_shutdown=clean,
    )
    if failure is not None:
        ok, why = False, failure
    if ok and below_plob is False:
        ok, why = False, "measured key rate above the PLOB bound (impossible: check the counts)"
    return DemoSummary(
        distance_km=distance_km,
        duration_s=round(exchange_wall_s, 3),
        requested_duration_s=requested_duration_s,
        pulses=pulses,
        withheld_slots=stats.withheld_slots,
        detections=stats.detections,
        tags_missed=stats.tags_missed,
        sifted_bits=stats.sifted_bits,
        qber=stats.qber,
        secret_bits=stats.secret_bits,
        secret_key_rate_bps=stats.secret_bits / wall,
        secret_bits_per_pulse=per_pulse,
        detection_rate_hz=stats.detections / wall,
        steady_detection_rate_hz=steady_detection_rate_hz,
        extended_s=round(max(0.0, extended_s), 3),
        block_busy_fractions=[round(b, 4) for b in block_busy_fractions or []],
        keys_identical=keys_identical,
        key_count=counts,
        blocks_ok=stats.blocks_ok,
        blocks_aborted=stats.blocks_aborted,
        theory_secret_bits_per_pulse=theory_rate,
        theory_three_intensity_bits_per_pulse=three,
        plob_bits_per_pulse=plob,
        ratio_to_theory=ratio,
        ratio_to_protocol=per_pulse / three if three else None,
        below_plob=below_plob,
        transmittance=theory.get("transmittance"),
        eve=eve,
        seed=seed,
        security=security,
        daemon_exit_codes=exit_codes,
        clean_shutdown=clean,
        ok=ok,
        failure=why,
        out_dir=out_dir,
        theory_note=theory.get("note"),
    )


# --- human-readable forms -------------------------------------------------------------------


def si(value: float | None, unit: str = "", digits: int = 3) -> str:
    """``1.23 M unit`` style formatting; ``-`` for None."""
    if value is None or not math.isfinite(value):
        return "-"
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g} {prefix}{unit}".rstrip()
    return f"{value:.{digits}g} {unit}".rstrip()


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def progress_line(
    elapsed_s: float, duration_s: float, tx_state: str, rx_state: str, stats: LinkStats
) -> str:
    """One line of live progress (redrawn in place on a terminal)."""
    det_rate = stats.detections / elapsed_s if elapsed_s > 0 else 0.0
    skr = stats.secret_bits / elapsed_s if elapsed_s > 0 else 0.0
    return (
        f"[{elapsed_s:5.1f}/{duration_s:.0f} s] alice {tx_state:<13} bob {rx_state:<13} "
        f"QBER {pct(stats.qber):>7}  det {si(det_rate, '/s'):>9}  "
        f"blocks {stats.blocks_ok}+{stats.blocks_aborted}x  "
        f"key {si(float(stats.secret_bits), 'b'):>8}  SKR {si(skr, 'b/s'):>9}"
    )


def format_summary(s: DemoSummary) -> str:
    """The multi-line summary printed at the end of a run."""
    lines = [
        f"qkdnode demo: {s.distance_km:g} km, {s.duration_s:.1f} s of key exchange"
        + (f", Eve {s.eve}" if s.eve else "")
        + (
            f" ({s.extended_s:.0f} s past the requested {s.requested_duration_s:g} s, "
            "to finish the open block)"
            if s.extended_s >= 1.0
            else ""
        ),
        f"  pulses            {s.pulses:>16,}",
        f"  detections        {s.detections:>16,}   ({si(s.detection_rate_hz, 'counts/s')})",
        f"  sustained         {si(s.steady_detection_rate_hz, 'counts/s'):>16}   "
        "(committed between the first and last block)",
        f"  sifted bits       {s.sifted_bits:>16,}",
        f"  QBER              {pct(s.qber):>16}",
        f"  blocks            {s.blocks_ok:>10} ok {s.blocks_aborted:>3} aborted",
        f"  secret bits       {s.secret_bits:>16,}",
        f"  secret key rate   {si(s.secret_key_rate_bps, 'b/s'):>16}",
        f"  bits per pulse    {s.secret_bits_per_pulse:>16.3e}",
    ]
    if s.theory_secret_bits_per_pulse is not None:
        lines.append(
            f"  theory (GLLP)     {s.theory_secret_bits_per_pulse:>16.3e}   ratio "
            + ("-" if s.ratio_to_theory is None else f"{s.ratio_to_theory:.2f}")
        )
    else:
        lines.append("  theory (GLLP)     " + (s.theory_note or "unavailable"))
    if s.theory_three_intensity_bits_per_pulse is not None:
        lines.append(
            f"  same protocol     {s.theory_three_intensity_bits_per_pulse:>16.3e}   ratio "
            + ("-" if s.ratio_to_protocol is None else f"{s.ratio_to_protocol:.2f}")
            + "   (three intensities, infinite blocks)"
        )
    if s.plob_bits_per_pulse is not None:
        lines.append(
            f"  PLOB bound        {s.plob_bits_per_pulse:>16.3e}   "
            + ("below" if s.below_plob else "ABOVE (impossible)")
        )
    if s.key_count:
        counts = ", ".join(f"{k} {v} keys" for k, v in s.key_count.items())
        same = "identical" if s.keys_identical else "DIFFERENT"
        lines.append(f"  key stores        {same:>16}   ({counts})")
    else:
        lines.append(f"  key stores        {'not compared':>16}")
    codes = ", ".join(f"{k} {v}" for k, v in s.daemon_exit_codes.items())
    lines.append(f"  daemon exit codes {codes}")
    lines.append(f"  result            {'OK' if s.ok else 'FAILED: ' + (s.failure or '?')}")
    lines.append(f"  output            {s.out_dir}")
    return "\n".join(lines)
