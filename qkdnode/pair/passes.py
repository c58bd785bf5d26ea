"""Passes of a link that carries light only in windows (a satellite downlink): the record
of one pass as the receiver closes it.

The receiver (the ground station) fills one block over the whole pass when
``passes.block_per_pass`` is set: the finite-key bound then works on the pass's whole
statistics, which gives more key than several smaller blocks (each pays the statistical
terms and the fixed costs of the bound again). The pass's block ends at the set, or
earlier when the light goes (a cloud: the tracker loses the slot clock, or the light
watch finds no light); what was collected until then is processed as the block, and no
detection after the light went enters it.

:class:`PassRecord` is what the receiver writes, one JSON line per pass, to
``<state_dir>/passes.jsonl`` and publishes on telemetry topic ``pass`` (no key material:
counts, error rates, lengths). Failure modes: a record that cannot be written is logged
and the pass goes on (the record is a report, not state).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import structlog

__all__ = ["PassClose", "PassRecord", "PassTally", "append_record"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class PassClose:
    """The receiver's detection reader ends the pass's collection (queued after the pass's
    last block). ``at_set``: True at the set, False when the light went mid-pass."""

    reason: str
    at_set: bool


@dataclass
class PassTally:
    """Blocks of one pass, as they finish (receiver)."""

    rise_unix_s: float
    set_unix_s: float
    blocks: int = 0
    blocks_ok: int = 0
    detections: int = 0
    sifted_z_bits: int = 0
    secret_bits: int = 0
    qber_z: float | None = None
    qber_x: float | None = None
    pulses: int = 0
    ec_disclosed_bits: int = 0
    no_key_reasons: list[str] = field(default_factory=list)

    def add_block(
        self,
        ok: bool,
        reason: str,
        *,
        detections: int,
        sifted_z: int,
        secret_bits: int,
        qber_z: float | None,
        qber_x: float | None,
        pulses: int,
        disclosed_bits: int,
    ) -> None:
        self.blocks += 1
        self.detections += detections
        self.pulses += pulses
        if ok:
            self.blocks_ok += 1
            self.sifted_z_bits += sifted_z
            self.secret_bits += secret_bits
            self.ec_disclosed_bits += disclosed_bits
            self.qber_z = qber_z
            self.qber_x = qber_x
        if not ok or secret_bits == 0:
            self.no_key_reasons.append(
                reason or f"the finite-key bound gives no key from {detections} detections"
            )


@dataclass(frozen=True)
class PassRecord:
    """One closed pass (receiver). Times are Unix seconds."""

    rise_unix_s: float
    set_unix_s: float
    closed_unix_s: float
    closed_by: str  # "set" or "light_lost"
    close_reason: str
    blocks: int
    blocks_ok: int
    detections: int
    pulses: int
    sifted_z_bits: int
    qber_z: float | None
    qber_x: float | None
    ec_disclosed_bits: int
    secret_bits: int
    no_key_reason: str | None

    @classmethod
    def close(cls, tally: PassTally, closing: PassClose, dropped: str | None) -> PassRecord:
        """The record of ``tally`` closed by ``closing``; ``dropped`` says why the last
        detections made no block (too few), if so."""
        reasons = list(tally.no_key_reasons)
        if dropped:
            reasons.append(dropped)
        return cls(
            rise_unix_s=tally.rise_unix_s,
            set_unix_s=tally.set_unix_s,
            closed_unix_s=time.time(),
            closed_by="set" if closing.at_set else "light_lost",
            close_reason=closing.reason,
            blocks=tally.blocks,
            blocks_ok=tally.blocks_ok,
            detections=tally.detections,
            pulses=tally.pulses,
            sifted_z_bits=tally.sifted_z_bits,
            qber_z=tally.qber_z,
            qber_x=tally.qber_x,
            ec_disclosed_bits=tally.ec_disclosed_bits,
            secret_bits=tally.secret_bits,
            no_key_reason=None if tally.secret_bits > 0 else ("; ".join(reasons) or None),
        )

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def append_record(state_dir: Path, record: PassRecord) -> None:
    """Append ``record`` to ``<state_dir>/passes.jsonl`` (logged, never raised, on error)."""
    path = state_dir / "passes.jsonl"
    try:
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record.as_dict(), sort_keys=True) + "\n")
    except OSError as exc:
        log.error("pass_record_not_written", path=str(path), error=str(exc)[:200])
