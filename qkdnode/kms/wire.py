"""The key managers' messages between neighbouring sites (docs/network.md, "Messages").

They travel on the peer channel of the link that joins the two sites, as ``kms.req`` /
``kms.rep`` (request and reply, matched by ``rid``) and ``kms.adv`` (link-state advert,
one way). Requests and successful replies carry a Wegman-Carter tag (:class:`HopTag`)
made with one-time key of that link; key bytes travel only as one-time-pad ciphertext in
the message's binary buffer, never in the JSON header.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

#: a site's or link's name
Name = Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
#: an SAE ID (as in ETSI 014: any printable string)
SaeId = Annotated[StrictStr, Field(min_length=1, max_length=256)]
#: most keys relayed in one message
MAX_RELAY_KEYS = 1024
#: most stored keys named by one message (the keys or pad of a relay, or a tag's key)
MAX_PARTS = 4096

REQ = "kms.req"
REP = "kms.rep"
ADV = "kms.adv"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HopTag(_Strict):
    """A Wegman-Carter tag: Poly1305 under the one-time key made of the stored keys
    ``key_ids`` (drawn by the sender from its side of the link), hex."""

    key_ids: list[uuid.UUID] = Field(min_length=1, max_length=MAX_PARTS)
    tag: StrictStr = Field(pattern=r"^[0-9a-f]{32}$")


class RelayedKey(_Strict):
    """One end-to-end key in a relay: its ID (chosen by the origin, random) and size."""

    key_ID: uuid.UUID
    size_bits: StrictInt = Field(ge=8, le=65536, multiple_of=8)


class RelayRequest(_Strict):
    """Forward keys one hop towards ``destination`` along ``path`` (site names, origin
    first). ``hop`` is the index in ``path`` of the receiving site. In mode ``otp`` the
    message's one buffer holds the keys' ciphertexts, concatenated in order."""

    op: Literal["relay"] = "relay"
    relay_id: uuid.UUID
    origin: Name
    destination: Name
    path: list[Name] = Field(min_length=2, max_length=17)
    hop: StrictInt = Field(ge=1)
    master: SaeId
    slaves: list[SaeId] = Field(min_length=1, max_length=16)
    mode: Literal["key", "otp"]
    keys: list[RelayedKey] = Field(min_length=1, max_length=MAX_RELAY_KEYS)
    #: the stored keys of this hop's link that are the keys themselves (first hop, mode
    #: ``key``) or their one-time pad (mode ``otp``), concatenated in order
    parts: list[uuid.UUID] = Field(min_length=1, max_length=MAX_PARTS)
    budget_s: StrictFloat | StrictInt = Field(gt=0, le=600)


class CancelRequest(_Strict):
    """Erase the keys of relay ``relay_id`` at ``destination`` (the origin gave up on it):
    forwarded hop by hop along ``path``."""

    op: Literal["cancel"] = "cancel"
    relay_id: uuid.UUID
    origin: Name
    destination: Name
    path: list[Name] = Field(min_length=2, max_length=17)
    hop: StrictInt = Field(ge=1)
    key_IDs: list[uuid.UUID] = Field(min_length=1, max_length=MAX_RELAY_KEYS)


Failure = Literal[
    "no_key",  # the next link holds too little key
    "link_down",  # the next link cannot carry the message
    "timeout",  # the next hop did not answer in time
    "refused",  # a hop refused the request (bad tag, unknown keys, bad request)
    "store_failed",  # the destination could not store the keys
]


class RelayResult(_Strict):
    """The reply to a relay: ``stored`` only when the destination made the keys durable
    for the master and slaves. On failure, ``failure`` says why and ``failed_link`` which
    link (by name) the relay could not cross."""

    op: Literal["relay"] = "relay"
    relay_id: uuid.UUID
    stored: bool
    failure: Failure | None = None
    failed_link: Name | None = None
    message: StrictStr = Field("", max_length=512)


class CancelResult(_Strict):
    op: Literal["cancel"] = "cancel"
    relay_id: uuid.UUID
    erased: StrictInt = Field(ge=0)


class KmsRequest(_Strict):
    """Header of a ``kms.req`` message."""

    rid: StrictInt = Field(ge=0)
    body: RelayRequest | CancelRequest = Field(discriminator="op")
    auth: HopTag | None = None


class KmsReply(_Strict):
    """Header of a ``kms.rep`` message: ``body`` (success or a failure the replier
    states), or ``error`` when the request could not even be read."""

    rid: StrictInt = Field(ge=0)
    body: RelayResult | CancelResult | None = Field(None, discriminator="op")
    error: StrictStr = Field("", max_length=512)
    auth: HopTag | None = None


class AdvertisedLink(_Strict):
    """One link as its site sees it: ``up`` (peer connected, key service in step),
    ``level_bits`` (key this site can draw to send over it), key rate (bit/s)."""

    link_id: Name
    peer: Name
    up: bool
    level_bits: StrictInt = Field(ge=0)
    rate_bps: StrictFloat | StrictInt = Field(ge=0)


class Advert(_Strict):
    """A site's link-state advert, flooded to every site (``seq`` grows with time)."""

    origin: Name
    seq: StrictInt = Field(ge=0)
    links: list[AdvertisedLink] = Field(max_length=256)
