"""What the node remembers about its key flow, and the alarms it raises from it.

The node and its activities report events here (a block finished or committed, a
calibration succeeded, the state changed, the peer came or went, what the peer's state
is); :meth:`KeyFlow.evaluate` (called by the monitor twice a second) turns the record and
the node's resources into alarm raises and clears through :func:`qkdnode.watch.evaluate`.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from qkdnode.alarms import AlarmBoard
from qkdnode.config.sections import AlarmsSection
from qkdnode.watch import (
    DEFAULT_BLOCK_S,
    Snapshot,
    evaluate,
    expected_block_s,
    states_inconsistent,
)

#: alarms raised with the cause of a FAULT (``session._fault``): cleared when it ends
FAULT_CAUSES = ("no_light", "bright_light", "instrument")


@dataclass(frozen=True)
class Resources:
    """The node's resources at one moment (read by the monitor)."""

    state: str
    auth_balance_bits: int
    instruments_down: Sequence[str]
    detection_rate_hz: float


class KeyFlow:
    """Key-flow record of one node. ``clock`` is monotonic seconds."""

    def __init__(
        self,
        alarms: AlarmBoard,
        cfg: AlarmsSection,
        *,
        role: str,
        block_detections: int,
        qber_warning: float,
        max_block_s: float = DEFAULT_BLOCK_S,
        state_dir: Path,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.alarms = alarms
        self.cfg = cfg
        self.role = role
        self.block_detections = block_detections
        self.max_block_s = max_block_s
        self.qber_warning = qber_warning
        self.state_dir = state_dir
        self._clock = clock
        now = clock()
        self.started_at = now
        self.should_produce = False
        self.producing_since = now
        self.peer_connected = False
        self.peer_down_since: float | None = now
        self.peer_state: str | None = None
        self.peer_mismatch_since: float | None = None
        self.exchanging_since: float | None = None
        self.last_commit_at: float | None = None
        self.intervals: deque[float] = deque(maxlen=8)
        self.consecutive_aborts = 0
        self.last_abort_reason: str | None = None
        self.auth_bits_per_block: int | None = None
        self.last_qber: float | None = None
        self.calibrated_at: float | None = None
        self._state = "OFFLINE"
        self.left_exchanging_at = now
        #: a link with pass windows: why its last pass gave no key (None: it gave key, or
        #: no pass has ended yet)
        self.pass_no_key: str | None = None
        self._pass_bits = 0
        self._pass_reasons: list[str] = []

    # -- events ---------------------------------------------------------------------------
    def block_finished(
        self, ok: bool, reason: str | None, qber: float | None, auth_bits: int | None
    ) -> None:
        if ok:
            self.consecutive_aborts = 0
        else:
            self.consecutive_aborts += 1
            self.last_abort_reason = reason
        if qber is not None:
            self.last_qber = qber
        if auth_bits is not None and auth_bits > 0:
            self.auth_bits_per_block = auth_bits

    def block_committed(self) -> None:
        now = self._clock()
        if self.last_commit_at is not None:
            self.intervals.append(now - self.last_commit_at)
        self.last_commit_at = now
        self.alarms.clear("exchange_failed", "a block was committed")

    def pass_started(self) -> None:
        """A pass window opened: the grace to start exchanging counts from now."""
        self.producing_since = self._clock()
        self._pass_bits = 0
        self._pass_reasons = []

    def pass_closed(self, secret_bits: int, why: str) -> None:
        """A block or the whole of a pass ended with ``secret_bits`` of key (``why`` says
        why there is none); a pass that gave key in any of its blocks gave key."""
        self._pass_bits += max(0, secret_bits)
        if secret_bits <= 0 and why:
            self._pass_reasons.append(why)
        reasons = self._pass_reasons
        self.pass_no_key = None if self._pass_bits > 0 else ("; ".join(reasons) or "no key")

    def calibrated(self) -> None:
        self.calibrated_at = self._clock()
        self.alarms.clear("calibration_failed", "calibration succeeded")
        self.alarms.clear("intensity_drift", "calibration succeeded")
        self.alarms.clear("dark_count_rise", "calibration succeeded")

    def synchronized(self) -> None:
        self.alarms.clear("sync_failed", "synchronised")
        self.alarms.clear("lock_lost", "synchronised")

    def state_changed(self, state: str) -> None:
        now = self._clock()
        if state == "EXCHANGING":
            self.exchanging_since = now
        else:
            if self._state == "EXCHANGING":
                self.left_exchanging_at = now  # the grace to come back starts now
            self.exchanging_since = None
        self._state = state
        self.alarms.set("fault", state == "FAULT", "the node is in FAULT")
        if state != "FAULT":
            # the causes of a fault end with it (the fault alarm covered them meanwhile)
            for cause in FAULT_CAUSES:
                self.alarms.clear(cause, "fault recovered")
        self._update_mismatch()

    def producing(self, on: bool) -> None:
        """The pair is (no longer) meant to produce key."""
        if on and not self.should_produce:
            self.producing_since = self._clock()
        self.should_produce = on

    def peer_link(self, connected: bool) -> None:
        if connected == self.peer_connected:
            return
        self.peer_connected = connected
        now = self._clock()
        self.peer_down_since = None if connected else now
        if connected and self.should_produce:
            self.producing_since = now  # give the pair time to come back
        if not connected:
            self.peer_state = None
            self._update_mismatch()

    def peer_status(self, state: str | None, producing: bool | None) -> None:
        """What the peer says of itself (its state; the transmitter: whether it wants key)."""
        self.peer_state = state
        if producing is not None and self.role == "receiver":
            self.producing(producing)
        self._update_mismatch()

    def _update_mismatch(self) -> None:
        if states_inconsistent(self._state, self.peer_state):
            if self.peer_mismatch_since is None:
                self.peer_mismatch_since = self._clock()
        else:
            self.peer_mismatch_since = None

    # -- evaluation -----------------------------------------------------------------------
    def snapshot(self, res: Resources) -> Snapshot:
        try:
            st = os.statvfs(self.state_dir)
            free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        except OSError:
            free, total = None, None
        return Snapshot(
            now=self._clock(),
            role=self.role,
            state=res.state,
            should_produce=self.should_produce,
            producing_since=max(self.producing_since, self.left_exchanging_at),
            peer_connected=self.peer_connected,
            peer_down_since=self.peer_down_since,
            peer_state=self.peer_state,
            peer_state_mismatch_since=self.peer_mismatch_since,
            exchanging_since=self.exchanging_since,
            last_commit_at=self.last_commit_at,
            block_intervals_s=list(self.intervals),
            block_detections=self.block_detections,
            max_block_s=self.max_block_s,
            detection_rate_hz=res.detection_rate_hz,
            consecutive_aborts=self.consecutive_aborts,
            last_abort_reason=self.last_abort_reason,
            auth_balance_bits=res.auth_balance_bits,
            auth_bits_per_block=self.auth_bits_per_block,
            disk_free_bytes=free,
            disk_total_bytes=total,
            instruments_down=list(res.instruments_down),
            last_qber=self.last_qber,
            qber_warning=self.qber_warning,
            calibrated_at=self.calibrated_at,
            cfg=self.cfg,
            pass_no_key=self.pass_no_key,
        )

    def evaluate(self, res: Resources) -> Snapshot:
        """Apply the watch's verdicts to the alarm board; returns the snapshot used."""
        snap = self.snapshot(res)
        for name, (on, cause) in evaluate(snap).items():
            self.alarms.set(name, on, cause)
        return snap

    def seconds_since_last_block(self) -> float:
        ref = self.last_commit_at if self.last_commit_at is not None else self.started_at
        return self._clock() - ref

    def expected_block_s(self, res: Resources) -> float:
        return expected_block_s(self.snapshot(res))
