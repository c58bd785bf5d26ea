"""The root model of a node configuration file."""

from __future__ import annotations

from pydantic import Field, ValidationInfo, field_validator, model_validator

from qkdnode.config.sections import (
    AlarmsSection,
    BusSection,
    CalibrationSection,
    DeliverySection,
    InstrumentSection,
    KeystoreSection,
    MetricsSection,
    NodeSection,
    ProtocolSection,
    Section,
    SimulationSection,
    SourceSection,
    TrackingSection,
)
from qkdnode.procedures.sync import SyncConfig


class NodeConfig(Section):
    """A whole node: ``qkdnode config schema`` prints this model's JSON Schema."""

    node: NodeSection
    source: SourceSection = SourceSection()
    instruments: dict[str, InstrumentSection] = Field(default_factory=dict)
    bus: BusSection = BusSection()
    protocol: ProtocolSection = ProtocolSection()
    calibration: CalibrationSection = CalibrationSection()
    sync: SyncConfig = SyncConfig()
    keystore: KeystoreSection = KeystoreSection()
    delivery: DeliverySection = DeliverySection()
    metrics: MetricsSection = MetricsSection()
    alarms: AlarmsSection = AlarmsSection()
    tracking: TrackingSection = TrackingSection()
    simulation: SimulationSection | None = None

    @field_validator("simulation")
    @classmethod
    def _own_side(
        cls, v: SimulationSection | None, info: ValidationInfo
    ) -> SimulationSection | None:
        """The node's side of the simulation, and only that (``node`` validates first)."""
        node = info.data.get("node")
        if v is None or node is None:
            return v
        return v.for_role(node.role)

    @model_validator(mode="after")
    def _check(self) -> NodeConfig:
        if self.node.id == self.node.peer_id:
            raise ValueError("node.id and node.peer_id must differ")
        if self.delivery.enabled and self.bus.allow_plaintext:
            raise ValueError(
                "delivery.enabled = true needs an authenticated peer channel (key activations "
                "travel on it): set bus.allow_plaintext = false and configure CURVE keys"
            )
        return self
