"""What the key manager uses of one link of its site (a structural interface).

The node runtime provides it (``qkdnode/node_port.py``) without importing the key
manager; tests may provide their own over real peer channels and key stores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from qkdnode.keystore.store import KeyStore

#: called with (kind, header, buffers) for each ``kms.*`` message from the peer site
MessageSink = Callable[[str, dict[str, Any], list[bytes]], None]
#: called with a reason when the peer channel went down or the peer restarted
LostSink = Callable[[str], None]


class LinkPort(Protocol):
    """One link as the key manager sees it."""

    @property
    def link_id(self) -> str: ...

    @property
    def peer_site(self) -> str: ...

    def store(self) -> KeyStore | None:
        """The link's key store; None until the link opened it."""
        ...

    def usable(self) -> bool:
        """Peer connected and the link's key service in step (its keys agree)."""
        ...

    def rate_bps(self) -> float:
        """Secret key rate of the last blocks (bit/s)."""
        ...

    def state(self) -> str:
        """The link's state (its state machine's state name)."""
        ...

    async def send(self, kind: str, header: dict[str, Any], buffers: Sequence[bytes]) -> None:
        """Send one message to the peer site; raises if the channel is down."""
        ...

    def attach(self, on_message: MessageSink, on_lost: LostSink) -> None:
        """Route this link's ``kms.*`` messages and channel losses to the key manager."""
        ...
