"""The statistics of one post-processed block: a typed record, so that a renamed or
misspelt field is a type error, not a silent zero in a metric or a crash in a monitor.

Both sides fill what they measure (the transmitter more: it estimates and computes the
key length); a field a side never measures stays None. :meth:`BlockStats.as_dict` gives
the JSON form of the logs (``block_summary``), the status (``last_block``) and telemetry.
No key material is ever a field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class BlockStats:
    """One block, as a node saw it. Counts in bits or detections, times in seconds."""

    block_id: int
    #: wall-clock seconds per stage (sifting, estimation, error_correction, ...)
    seconds: dict[str, float] = field(default_factory=dict)
    #: slots the block's detections span (set by the node, both sides count the same)
    pulses: int = 0
    #: transmitter: slots of ``pulses`` withheld for tracking windows (no key from them)
    withheld_slots: int | None = None
    detections: int = 0
    sifted_z: int = 0
    sifted_x: int | None = None
    #: transmitter: detections per intensity class (signal, decoy, vacuum), never sent
    detections_per_class: list[int] | None = None
    rx_basis_z_fraction: float | None = None
    qber_x: float | None = None
    qber_x_per_class: list[float] | None = None
    qber_z: float | None = None
    #: receiver: error rate of the Z bits per intensity class (signal, decoy, vacuum)
    qber_z_per_class: list[float] | None = None
    #: transmitter: the decoy-state estimate (finitekey_model.DecoyEstimates.as_dict())
    decoy: dict[str, float] | None = None
    ec_levels: list[int] | None = None
    ec_frames: int | None = None
    ec_rounds: int | None = None
    ec_disclosed_bits: int = 0
    ec_efficiency: float | None = None
    verification_bits: int | None = None
    #: transmitter: every disclosed bit by cause (leak.LeakLedger.as_dict())
    leak: dict[str, float] | None = None
    final_key_bits: int = 0
    secret_bits: int | None = None
    auth_reserve_bits: int | None = None
    auth_bits_sent: int = 0
    auth_bits_received: int = 0
    auth_tags_sent: int = 0
    auth_tags_verified: int = 0
    auth_forgery_bound: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields that were measured (None left out), JSON-ready."""
        return {k: v for k, v in asdict(self).items() if v is not None}
