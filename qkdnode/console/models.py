"""Typed records of the web console: what the history keeps and what the pages receive.

Times are Unix seconds (``ts_s``); rates in bits or counts per second; ratios in [0, 1].
No record carries key material: only counts, rates, error ratios and names.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["monitor", "operator"]


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sample(Record):
    """One link's state at one sampling instant (one row of the ``samples`` table)."""

    link: str
    ts_s: float
    state: str
    key_rate_bps: float = Field(ge=0, description="secret bits per second of key exchange")
    qber: float | None = None
    keys_available: int = Field(0, ge=0)
    fill_ratio: float = Field(0.0, ge=0)
    auth_balance_bits: int = 0
    secret_bits: int = Field(0, ge=0)
    detector_rates_hz: tuple[float, ...] = ()


class BlockRecord(Record):
    """One finished key block with its provenance (from the ``block`` telemetry)."""

    link: str
    ts_s: float
    block_id: int
    ok: bool
    qber_z: float | None = None
    qber_x: float | None = None
    detections: int = 0
    sifted_z: int = 0
    ec_disclosed_bits: int = 0
    final_key_bits: int = 0
    block_seconds: float = Field(0.0, ge=0, description="wall time of post-processing")
    #: every scalar of the block's statistics (eps, leak terms, stage times ...)
    stats: dict[str, float | int | str | bool | None] = Field(default_factory=dict)


class AlarmRecord(Record):
    """One raise or clear of an alarm."""

    link: str
    ts_s: float
    event: Literal["raise", "clear"]
    name: str
    severity: str
    cause: str = ""


class EventRecord(Record):
    """A telemetry message worth keeping as it came: a calibration result, a sync lock,
    a state change. ``payload`` is the telemetry payload (JSON object)."""

    link: str
    ts_s: float
    topic: str
    payload: dict[str, Any]


class Series(Record):
    """A link's history at a resolution: column arrays of equal length (``ts_s`` first).

    ``bucket_s`` is the averaging interval (0: raw samples). ``detector_rates_hz[i]`` is
    detector ``i``'s column.
    """

    link: str
    since_s: float
    until_s: float
    bucket_s: float
    ts_s: list[float]
    key_rate_bps: list[float | None]
    qber: list[float | None]
    fill_ratio: list[float | None]
    keys_available: list[float | None]
    auth_balance_bits: list[float | None]
    detector_rates_hz: list[list[float | None]]
    #: the key blocks in the same span, averaged over buckets of ``bucket_s`` when they
    #: outnumber the points (block time, QBER per basis, final key bits)
    block_ts_s: list[float] = Field(default_factory=list)
    qber_z: list[float | None] = Field(default_factory=list)
    qber_x: list[float | None] = Field(default_factory=list)
    final_key_bits: list[float | None] = Field(default_factory=list)


class LinkRow(Record):
    """One link as the overview shows it (pushed live)."""

    link: str
    role: str
    peer_id: str
    state: str
    state_since_s: float | None = None
    healthy: bool = False
    peer_connected: bool = False
    key_rate_bps: float = 0.0
    qber: float | None = None
    keys_available: int = 0
    fill_ratio: float = 0.0
    auth_balance_bits: int = 0
    secret_bits: int = 0
    last_block_id: int | None = None
    seconds_since_last_block: float | None = None
    alarms: list[ActiveAlarm] = Field(default_factory=list)
    #: Unix time at which the console last heard from the link
    updated_s: float = 0.0
    #: the console could not read the link's status (the link is not running)
    reachable: bool = True


class ActiveAlarm(Record):
    name: str
    severity: str
    since_s: float
    cause: str = ""


class Overview(Record):
    """The overview; ``role`` is the asking client's (None in the pushes to every page)."""

    site: str
    ts_s: float
    role: Role | None
    stale_after_s: float
    links: list[LinkRow]
    network: bool = False


LinkRow.model_rebuild()
