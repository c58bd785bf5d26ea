"""Errors of the key store. Messages name key IDs and block IDs, never key bytes."""

from __future__ import annotations


class KeyStoreError(Exception):
    """Base class of key store errors."""


class KeyRequestError(KeyStoreError):
    """A consumer's request cannot be served as asked (ETSI 014: HTTP 400)."""


class UnknownKeyError(KeyRequestError):
    """The key ID is not (or no longer) held by this node."""


class KeyAlreadyDeliveredError(KeyRequestError):
    """The key was already handed to a consumer on this node."""


class KeyNotForPairError(KeyRequestError):
    """The key was issued to another SAE pair, or cannot be fetched this way here."""


class KeysUnavailableError(KeyStoreError):
    """Not enough keys right now (ETSI 014: HTTP 503)."""


class StoreFullError(KeyStoreError):
    """Storing a block would exceed ``max_key_count``."""


class BlockError(KeyStoreError):
    """A block operation is inconsistent (unknown block, duplicate block, wrong size)."""


class LinkMismatchError(KeyStoreError):
    """A message from the peer names another link."""
