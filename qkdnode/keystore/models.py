"""Value types of the key store and the messages the two nodes exchange about keys.

The messages (:class:`SyncSummary`, :class:`DeliveryNotice`) carry key IDs, block IDs and
pair names, never key bytes; the peer channel that carries them is authenticated by the
caller.
"""

from __future__ import annotations

import base64
import enum
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Side = Literal["transmitter", "receiver"]


class KeyState(enum.StrEnum):
    """Lifecycle of one key on one node.

    PENDING -> AVAILABLE (block committed by both) -> RESERVED (the peer handed it to an SAE
    pair; only that pair's slave may fetch it here) -> DELIVERED (handed to a consumer here)
    -> erased. EXPIRED is recorded for keys erased because their time to live ended.
    """

    PENDING = "pending"
    AVAILABLE = "available"
    RESERVED = "reserved"
    DELIVERED = "delivered"
    EXPIRED = "expired"


class EraseReason(enum.StrEnum):
    DELIVERED = "delivered"  # delivered on both nodes
    EXPIRED = "expired"  # time to live ended
    DISCARDED = "discarded"  # not held by both nodes (crash recovery, aborted block)


class Provenance(BaseModel):
    """Where a block's keys came from: the figures of the post-processing run."""

    model_config = ConfigDict(extra="allow", frozen=True)

    qber: float = Field(ge=0, le=0.5)
    eps_sec: float = Field(gt=0, lt=1)
    eps_cor: float = Field(gt=0, lt=1)


class Pair(BaseModel):
    """An SAE pair (ETSI 014: the master calls enc_keys, the slave calls dec_keys)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    master: str = Field(min_length=1)
    slave: str = Field(min_length=1)


@dataclass(frozen=True)
class DeliveredKey:
    """A key handed to a consumer. ``key`` is never shown by ``repr``/``str``."""

    key_id: uuid.UUID
    size_bits: int
    key: bytes = field(repr=False)

    def __str__(self) -> str:
        return f"DeliveredKey({self.key_id}, {self.size_bits} bits)"


def key_container(keys: Iterable[DeliveredKey]) -> dict[str, Any]:
    """An ETSI 014 key container: ``{"keys": [{"key_ID", "key" (base64)}]}``.

    The one place where key bytes are encoded for a consumer (ETSI server, control API)."""
    return {
        "keys": [
            {"key_ID": str(k.key_id), "key": base64.b64encode(k.key).decode("ascii")} for k in keys
        ]
    }


@dataclass(frozen=True)
class KeyInfo:
    """Metadata of a stored key (no key bytes)."""

    key_id: uuid.UUID
    block_id: int
    index: int
    size_bits: int
    state: KeyState
    created_at: float
    expires_at: float
    pair: Pair | None
    peer_delivered: bool


class BlockSummary(BaseModel):
    """One block as a node holds it: committed or not, and which key indices are live."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    block_id: int = Field(ge=0)
    committed: bool
    live_indices: list[int]


class DeliveredEntry(BaseModel):
    """One key handed to a consumer on the announcing node."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key_id: uuid.UUID = Field(description="the ID as delivered (encodes the delivered size)")
    pair: Pair
    via: Literal["enc", "dec"] = Field(
        description="'enc': handed to the pair's master; 'dec': handed to the pair's slave"
    )


class DeliveryNotice(BaseModel):
    """Sent to the peer after keys were delivered here, so that it reserves them for the
    pair (via 'enc') or erases keys delivered on both nodes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["keystore.delivery"] = "keystore.delivery"
    link_id: str
    entries: list[DeliveredEntry]


class SyncSummary(BaseModel):
    """What a node holds, announced to the peer on (re)connection."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["keystore.summary"] = "keystore.summary"
    link_id: str
    side: Side
    blocks: list[BlockSummary]
    delivered: list[DeliveredEntry]


class ReconcileActions(BaseModel):
    """What one node must do to its store after comparing summaries (see ``reconcile``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    commit_blocks: list[int] = Field(default_factory=list)
    discard_blocks: list[int] = Field(default_factory=list)
    discard_keys: list[tuple[int, int]] = Field(
        default_factory=list, description="(block_id, index) of keys the peer no longer holds"
    )
    peer_delivered: list[DeliveredEntry] = Field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (
            self.commit_blocks or self.discard_blocks or self.discard_keys or self.peer_delivered
        )
