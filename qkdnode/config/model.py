"""The root model of a node configuration file."""

from __future__ import annotations

from pydantic import Field, ValidationInfo, field_validator, model_validator

from qkdnode.config.console import ConsoleSection
from qkdnode.config.sections import (
    AlarmsSection,
    BusSection,
    CalibrationSection,
    DeliverySection,
    InstrumentSection,
    KeystoreSection,
    MetricsSection,
    NodeSection,
    PassesSection,
    PolarizationSection,
    ProtocolSection,
    Section,
    SimulationSection,
    SourceSection,
    TrackingSection,
)
from qkdnode.procedures.sync_model import SyncConfig

#: Bytes of a key-ID sync summary per stored key (its index in a JSON list, at most 8
#: characters and a comma) and the room kept for the rest (blocks, activations, the keys
#: delivered since the last sync).
SYNC_SUMMARY_BYTES_PER_KEY = 9
SYNC_SUMMARY_RESERVE = 4 * 1024 * 1024


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
    passes: PassesSection | None = None
    console: ConsoleSection = ConsoleSection()
    polarization: PolarizationSection = PolarizationSection()
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
        need = SYNC_SUMMARY_BYTES_PER_KEY * self.keystore.max_key_count + SYNC_SUMMARY_RESERVE
        if need > self.bus.max_peer_header_bytes:
            raise ValueError(
                f"keystore.max_key_count = {self.keystore.max_key_count}: the key-ID sync "
                f"summary of a full store takes up to {need} bytes, more than "
                f"bus.max_peer_header_bytes = {self.bus.max_peer_header_bytes} (the peer would "
                f"refuse it and the nodes could never get in step): raise "
                f"bus.max_peer_header_bytes to at least {need} on both nodes, or lower "
                f"keystore.max_key_count"
            )
        return self
