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
    """Lifecycle of one stored key (one *part*; a delivered key is one or more parts).

    PENDING -> AVAILABLE (block committed by both nodes). On the node whose enc_keys hands
    the key out (the *issuer*): AVAILABLE -> DELIVERED (the peer acknowledged the
    activation, then the bytes went to the master SAE) -> erased once the peer reports the
    slave's delivery. On the other node: AVAILABLE (or PENDING) -> RESERVED (activated by
    the issuer for one master and its slaves; only they can fetch it) -> erased as
    delivered when every slave fetched it. EXPIRED is recorded for keys erased because
    their time to live ended.
    """

    PENDING = "pending"
    AVAILABLE = "available"
    RESERVED = "reserved"
    DELIVERED = "delivered"
    EXPIRED = "expired"


class EraseReason(enum.StrEnum):
    DELIVERED = "delivered"  # delivered at both ends
    EXPIRED = "expired"  # time to live ended
    DISCARDED = "discarded"  # not held by both nodes (crash recovery, aborted block)
    UNCERTAIN = "uncertain"  # an activation whose outcome is unknown (never served)
    RELAYED = "relayed"  # consumed by the site's key manager: a relayed key or its pad
    AUTHENTICATION = "authentication"  # consumed as a one-time key of a relay message's tag


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
    slaves: tuple[str, ...]
    fetched_by: tuple[str, ...]
    delivered_as: uuid.UUID | None


class BlockSummary(BaseModel):
    """One block as a node holds it: committed or not, and which key indices are live."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    block_id: int = Field(ge=0)
    committed: bool
    live_indices: list[int]


#: most parts (stored keys) concatenated into one delivered key
MAX_PARTS_PER_KEY = 256
#: most keys in one activation (ETSI 014 requests are capped lower by max_key_per_request)
MAX_KEYS_PER_ACTIVATION = 1024
#: most slave SAEs one key is activated for (the pair's slave plus additional slaves)
MAX_SLAVES = 16


class ActivatedKey(BaseModel):
    """One key handed to a master SAE: its ID, delivered size and the stored keys (parts)
    whose bytes, concatenated in order and cut to ``size_bits``, make it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key_ID: uuid.UUID
    size_bits: int = Field(gt=0, multiple_of=8)
    parts: list[uuid.UUID] = Field(min_length=1, max_length=MAX_PARTS_PER_KEY)


class ActivationRequest(BaseModel):
    """Issuer -> peer KME, before enc_keys answers: reserve these keys for ``master`` and
    ``slaves`` (durable on the peer before it acknowledges)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["keystore.activate"] = "keystore.activate"
    link_id: str
    master: str = Field(min_length=1)
    slaves: list[str] = Field(min_length=1, max_length=MAX_SLAVES)
    keys: list[ActivatedKey] = Field(min_length=1, max_length=MAX_KEYS_PER_ACTIVATION)


ActivationRefusal = Literal["not_in_step", "not_available", "bad_request"]


class ActivationReply(BaseModel):
    """Peer -> issuer. ``activated`` true: every key is reserved and durable. False: nothing
    changed on the peer (all or nothing); ``refusal`` says why."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    activated: bool
    refusal: ActivationRefusal | None = None
    message: str = ""


class ReleaseRequest(BaseModel):
    """Issuer -> peer: an activation of these parts may or may not have reached you; erase
    them (the issuer erased its copies and never handed them out)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["keystore.release"] = "keystore.release"
    link_id: str
    parts: list[uuid.UUID] = Field(max_length=MAX_KEYS_PER_ACTIVATION * MAX_PARTS_PER_KEY)


class DeliveryNotice(BaseModel):
    """Peer -> issuer after every slave fetched the keys ``key_IDs`` (delivered IDs) through
    dec_keys: the issuer erases its copies."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["keystore.delivery"] = "keystore.delivery"
    link_id: str
    key_IDs: list[uuid.UUID]


class SyncSummary(BaseModel):
    """What a node holds, announced to the peer on (re)connection (no key bytes)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["keystore.summary"] = "keystore.summary"
    link_id: str
    side: Side
    blocks: list[BlockSummary]
    issued: list[uuid.UUID] = Field(
        default_factory=list, description="parts this node handed to a master SAE (enc_keys)"
    )
    reserved: list[uuid.UUID] = Field(
        default_factory=list, description="parts the peer activated here, not yet fetched"
    )
    fetched: list[uuid.UUID] = Field(
        default_factory=list, description="parts erased here because delivered at both ends"
    )


class ReconcileActions(BaseModel):
    """What one node must do to its store after comparing summaries (see ``reconcile``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    commit_blocks: list[int] = Field(default_factory=list)
    discard_blocks: list[int] = Field(default_factory=list)
    discard_keys: list[tuple[int, int]] = Field(
        default_factory=list, description="(block_id, index) of keys the peer no longer holds"
    )
    erase_delivered: list[uuid.UUID] = Field(
        default_factory=list, description="parts delivered at the peer's end: erase as delivered"
    )
    erase_uncertain: list[uuid.UUID] = Field(
        default_factory=list,
        description="parts whose activation state differs between the nodes: erase",
    )

    @property
    def empty(self) -> bool:
        return not (
            self.commit_blocks
            or self.discard_blocks
            or self.discard_keys
            or self.erase_delivered
            or self.erase_uncertain
        )
