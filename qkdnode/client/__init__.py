"""Python clients of a node's bus: blocking :class:`Client`, asyncio :class:`AsyncClient`,
and telemetry: the polled :class:`Subscription` and the iterators :func:`subscribe`,
:func:`asubscribe`. See docs/protocol.md."""

from qkdnode.bus.errors import BusError, BusTimeout, RemoteError
from qkdnode.client.aio import AsyncClient
from qkdnode.client.sync import Client
from qkdnode.client.telemetry import (
    CloneState,
    Subscription,
    TelemetryEvent,
    asubscribe,
    subscribe,
)

__all__ = [
    "AsyncClient",
    "BusError",
    "BusTimeout",
    "Client",
    "CloneState",
    "RemoteError",
    "Subscription",
    "TelemetryEvent",
    "asubscribe",
    "subscribe",
]
