"""Durable key store of a node and the key-ID synchronisation with its peer.

See ``docs/key-delivery.md`` for the design (two-phase block commit, secret-seeded key IDs,
index-parity split between enc_keys on the two nodes, activation first, erasure).
"""

from qkdnode.keystore.errors import (
    BlockError,
    KeyAlreadyDeliveredError,
    KeyNotForPairError,
    KeyRequestError,
    KeyStoreError,
    KeysUnavailableError,
    LinkMismatchError,
    StoreFullError,
    UnknownKeyError,
)
from qkdnode.keystore.ids import block_key_ids, link_id_for
from qkdnode.keystore.models import (
    ActivatedKey,
    ActivationReply,
    ActivationRequest,
    BlockSummary,
    DeliveredKey,
    DeliveryNotice,
    KeyInfo,
    KeyState,
    Pair,
    Provenance,
    ReconcileActions,
    ReleaseRequest,
    SyncSummary,
    key_container,
)
from qkdnode.keystore.store import Claimed, IssuedKey, KeyStore
from qkdnode.keystore.sync import reconcile

__all__ = [
    "ActivatedKey",
    "ActivationReply",
    "ActivationRequest",
    "BlockError",
    "BlockSummary",
    "Claimed",
    "DeliveredKey",
    "DeliveryNotice",
    "IssuedKey",
    "KeyAlreadyDeliveredError",
    "KeyInfo",
    "KeyNotForPairError",
    "KeyRequestError",
    "KeyState",
    "KeyStore",
    "KeyStoreError",
    "KeysUnavailableError",
    "LinkMismatchError",
    "Pair",
    "Provenance",
    "ReconcileActions",
    "ReleaseRequest",
    "StoreFullError",
    "SyncSummary",
    "UnknownKeyError",
    "block_key_ids",
    "key_container",
    "link_id_for",
    "reconcile",
]
