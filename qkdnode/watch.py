"""Is this link producing key? The conditions behind the node's alarms, as a pure function.

The monitor (twice a second) takes a :class:`Snapshot` of what the node knows and
:func:`evaluate` says, for every watched alarm, whether it should be active and why. The
caller applies that to the :class:`~qkdnode.alarms.AlarmBoard`. Keeping the rules here,
free of I/O, lets tests walk every condition without a daemon.

Thresholds come from the ``[alarms]`` config section (:class:`AlarmsSection`).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from qkdnode.config.sections import AlarmsSection

#: block duration assumed before any block was seen and no rate is known (seconds)
DEFAULT_BLOCK_S = 60.0


@dataclass(frozen=True)
class Snapshot:
    """What the node knows at one moment. Times are monotonic seconds."""

    now: float
    role: str
    state: str
    #: the pair is meant to produce key (transmitter: started by an operator or autostart;
    #: receiver: the transmitter says so)
    should_produce: bool
    #: when the node last started to be expected to produce (start, peer back, operator)
    producing_since: float
    peer_connected: bool
    peer_down_since: float | None
    peer_state: str | None
    peer_state_mismatch_since: float | None
    exchanging_since: float | None
    last_commit_at: float | None
    block_intervals_s: Sequence[float]
    block_detections: int
    detection_rate_hz: float
    consecutive_aborts: int
    last_abort_reason: str | None
    auth_balance_bits: int
    auth_bits_per_block: int | None
    disk_free_bytes: int | None
    disk_total_bytes: int | None
    instruments_down: Sequence[str]
    last_qber: float | None
    qber_warning: float
    calibrated_at: float | None
    cfg: AlarmsSection = field(default_factory=AlarmsSection)
    #: the longest a block of light takes by design (protocol.max_block_seconds with
    #: adaptive blocks; DEFAULT_BLOCK_S when there is no such bound)
    max_block_s: float = DEFAULT_BLOCK_S
    #: a link with pass windows: why the last pass gave no key (None: it gave key)
    pass_no_key: str | None = None


def expected_block_s(s: Snapshot) -> float:
    """How long a block should take: the median of recent intervals between commits, else
    block size over the detection rate (at most ``max_block_s``), else ``max_block_s``
    (a slow link's first block takes that long by design: it is no reason for alarm)."""
    if s.block_intervals_s:
        return float(statistics.median(s.block_intervals_s))
    if s.detection_rate_hz > 0:
        return min(s.block_detections / s.detection_rate_hz, s.max_block_s)
    return s.max_block_s


def evaluate(s: Snapshot) -> dict[str, tuple[bool, str]]:
    """``{alarm: (active, cause)}`` for every alarm this watch owns."""
    c = s.cfg
    out: dict[str, tuple[bool, str]] = {}

    # -- key flow ------------------------------------------------------------------------
    no_key, why = False, ""
    if s.state == "AWAITING_PASS":
        # Between passes no key is expected; a pass that gave none stays an alarm until
        # one gives key.
        if s.pass_no_key is not None:
            no_key, why = True, f"the last pass gave no key: {s.pass_no_key}"
    elif s.should_produce:
        if s.state == "EXCHANGING" and s.exchanging_since is not None:
            limit = max(c.no_key_min_s, c.no_key_block_factor * expected_block_s(s))
            since = max(x for x in (s.exchanging_since, s.last_commit_at) if x is not None)
            quiet = s.now - since
            if quiet > limit:
                no_key = True
                what = "exchanging" if s.last_commit_at is None else "last block"
                why = (
                    f"no block committed for {quiet:.0f} s ({what}); expected within {limit:.0f} s"
                )
        elif s.now - s.producing_since > c.not_exchanging_grace_s:
            no_key = True
            why = (
                f"the link should produce key but the node is {s.state} "
                f"(for more than {c.not_exchanging_grace_s:.0f} s)"
            )
    out["no_key"] = (no_key, why)

    aborting = s.consecutive_aborts >= c.aborted_blocks
    out["blocks_aborting"] = (
        aborting,
        f"{s.consecutive_aborts} consecutive blocks aborted (last: {s.last_abort_reason})",
    )

    # -- resources -------------------------------------------------------------------------
    need = s.auth_bits_per_block
    auth_reason = (s.last_abort_reason or "").lower()
    starved = "authentication key pool" in auth_reason or "authpool" in auth_reason
    low = need is not None and s.auth_balance_bits < need
    out["auth_pool_low"] = (
        low or starved,
        f"authentication key pool holds {s.auth_balance_bits} bits, "
        f"the next block needs {need if need is not None else 'more'}",
    )
    disk_low = False
    if s.disk_free_bytes is not None and s.disk_total_bytes:
        floor = max(c.disk_free_min_bytes, int(c.disk_free_min_ratio * s.disk_total_bytes))
        disk_low = s.disk_free_bytes < floor
    out["disk_nearly_full"] = (
        disk_low,
        f"{(s.disk_free_bytes or 0) / 1e6:.0f} MB free in the state directory",
    )

    # -- the pair ------------------------------------------------------------------------
    peer_down = (
        s.should_produce
        and not s.peer_connected
        and s.peer_down_since is not None
        and s.now - s.peer_down_since > c.peer_down_s
    )
    out["peer_down"] = (peer_down, "the peer node is not reachable")
    mismatch = (
        s.peer_connected
        and s.peer_state_mismatch_since is not None
        and s.now - s.peer_state_mismatch_since > c.pair_mismatch_s
    )
    out["pair_inconsistent"] = (
        mismatch,
        f"this node is {s.state}, its peer {s.peer_state}",
    )

    # -- hardware and physics ------------------------------------------------------------------
    down = sorted(s.instruments_down)
    out["instrument_down"] = (bool(down), f"not answering: {', '.join(down)}")
    qber_high = s.last_qber is not None and s.last_qber > s.qber_warning
    out["qber_high"] = (
        qber_high,
        f"error rate {s.last_qber if s.last_qber is not None else 0:.4f} "
        f"above warning {s.qber_warning}",
    )
    stale = s.calibrated_at is not None and s.now - s.calibrated_at > c.calibration_max_age_s
    out["calibration_stale"] = (
        stale,
        f"last calibration {s.now - (s.calibrated_at or s.now):.0f} s ago "
        f"(allowed {c.calibration_max_age_s:.0f} s)",
    )
    return out


def states_inconsistent(mine: str, peer: str | None) -> bool:
    """True when the two nodes' states cannot produce key together: one is exchanging
    and the other is not (a transition takes seconds, so the caller waits before raising)."""
    if peer is None:
        return False
    return (mine == "EXCHANGING") != (peer == "EXCHANGING")
