"""What each state does on each side of the link: calibration, synchronization, key exchange.

The transmitter drives the pair. Its state activities ask the receiver to follow with
:class:`qkdnode.link.LinkCoordinator` requests; the receiver's :meth:`ExchangeSession.serve`
moves its own state machine and runs its part. During key exchange the receiver paces the
blocks: it accumulates mapped detections and starts a block when it has enough (its first
post-processing message announces it); the transmitter's exchange loop answers block
after block, and each block's keys are committed within its last round trip.

The activities live in :mod:`qkdnode.pair`, one module per concern, over one shared state
(:class:`qkdnode.pair.core.SessionCore`); this class combines them.
"""

from __future__ import annotations

from qkdnode.context import NodeContext
from qkdnode.pair.blocks import BlocksMixin, PairLanding
from qkdnode.pair.calibration import CalibrationMixin
from qkdnode.pair.core import DRIFT_CHECK_S, MIN_BLOCK_DETECTIONS, StepSpec
from qkdnode.pair.exchange import ExchangeMixin
from qkdnode.pair.monitoring import MonitoringMixin
from qkdnode.pair.polarization import PolarizationMixin
from qkdnode.pair.scheduled import ScheduledMixin
from qkdnode.pair.steps import StepsMixin
from qkdnode.pair.synchronization import SynchronizationMixin


class ExchangeSession(
    StepsMixin,
    CalibrationMixin,
    SynchronizationMixin,
    ExchangeMixin,
    BlocksMixin,
    MonitoringMixin,
    PolarizationMixin,
    ScheduledMixin,
):
    """State activities and the key store of one node."""

    def __init__(self, node: NodeContext) -> None:
        super().__init__(node)
        self._landing = PairLanding(self)


__all__ = ["DRIFT_CHECK_S", "MIN_BLOCK_DETECTIONS", "ExchangeSession", "StepSpec"]
