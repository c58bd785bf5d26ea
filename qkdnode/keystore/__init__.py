"""Durable key store of a node and the key-ID synchronisation with its peer.

See ``docs/key-delivery.md`` for the design (two-phase block commit, deterministic key IDs,
index-parity split between enc_keys on the two nodes, erasure).
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
from qkdnode.keystore.ids import link_id_for, make_key_id, split_key_id
from qkdnode.keystore.models import (
    BlockSummary,
    DeliveredEntry,
    DeliveredKey,
    DeliveryNotice,
    KeyInfo,
    KeyState,
    Pair,
    Provenance,
    ReconcileActions,
    SyncSummary,
    key_container,
)
from qkdnode.keystore.store import KeyStore
from qkdnode.keystore.sync import reconcile

__all__ = [
    "BlockError",
    "BlockSummary",
    "DeliveredEntry",
    "DeliveredKey",
    "DeliveryNotice",
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
    "StoreFullError",
    "SyncSummary",
    "UnknownKeyError",
    "key_container",
    "link_id_for",
    "make_key_id",
    "reconcile",
    "split_key_id",
]
