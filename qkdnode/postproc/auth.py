"""Wegman-Carter authentication of the post-processing transcript, and the key pool feeding it.

Scheme (per block and direction; the sender of a direction draws one *region* of
:data:`REGION_BYTES` from its pool stream when it sends its first message of the block)::

    region = k_in | k_out | k_mac | s_1 | ... | s_TAGS        (16 bytes each)

* Transcript: every message (kind, canonical JSON header with its ``_auth`` field, every
  buffer with its length) is compressed by both sides into a 16-byte digest
  ``d = Poly1305_{k_in, s=0}(m)``, ``k_in`` being the region of the message's sender.
* Transcript tags, at the checkpoints of the protocol (:data:`TAGS_PER_BLOCK` per
  direction, see :mod:`.pipeline`): the sender appends a tag over the block's whole
  transcript, both directions, as it has sent and received it::

      tag_j = Poly1305_{k_out, s_j}(block id | direction | j | n_t2r | n_r2t
                                    | digests of the T->R messages | digests of the R->T ones)

  The receiver recomputes it from *its* transcript: any message changed, inserted, dropped
  or reordered in either direction makes the two transcripts differ and the check fail.
  A checkpoint is a point where the tag's receiver has nothing in flight (it waits for this
  very message), so both sides' transcripts end at the same messages.
* Message check (availability, not security): every message also carries ``_mac`` =
  Poly1305 under a one-time key ``HMAC-SHA256(k_mac, block id | sequence)``, so that a
  changed message is refused at once and no code ever runs on it (Cascade in particular
  assumes consistent answers). Its security is only computational and the argument below
  does not use it: ``k_mac`` is independent of the other region bytes and its outputs do
  not depend on them, so even an adversary who breaks it learns nothing about the
  transcript keys and can at most make a block abort later than it would now.

Cost: ``8 * REGION_BYTES`` = 3 * 128 + 128 * TAGS_PER_BLOCK = 640 bits per block and
direction, whatever the block size or the number of Cascade round trips (before: 128 bits
per message, ~40 kbit per direction for a block of 1.6e7 detections).

Security (information-theoretic; the argument is spelled out in docs/architecture.md):
Poly1305's polynomial hash ``h_r`` is epsilon-almost-Delta-universal modulo 2^128 with
``epsilon(L) = 8 * ceil(L / 16) / 2**106`` for messages of up to L bytes (Bernstein 2005,
Thm 3.3), hence epsilon-almost-universal with ``s = 0``. The digest sequence is an
epsilon(L_max)-AU function of the transcript (two different transcripts with the same
message counts differ in some message, whose digests then collide with probability
<= epsilon), and composing it with the outer epsilon-ADU hash gives an
``epsilon(L_max) + epsilon(L_enc)``-ADU function (Stinson 1994). Adding a uniform one-time
pad ``s_j`` makes every tag uniform and independent of the hash keys: this is Wegman-Carter
(1981), and an adversary with D verification attempts forges with probability at most
``D * (epsilon(L_max) + epsilon(L_enc))`` (Bernstein 2005; Portmann 2014 for the composable
version, rejected attempts included). The hash keys are used for one block only and every
pad authenticates one transcript. Messages acted upon before the next checkpoint are
unauthenticated (information-theoretically); this is safe because nothing derived from
them is kept unless a later checkpoint covers them: the block's key is only output after
both directions' complete transcripts were verified (Kiktenko et al., IEEE TIT 66, 6354
(2020), who authenticate a QKD round's whole transcript with one tag at its end).

Positions and replay: every message carries ``_auth`` = block id ``b``, per-block sequence
``q`` and region position ``p`` (segment, offset); tagged messages add the tag index ``t``,
the sender's pool segments ``segs`` and ``_tag`` (hex). Regions lie on a grid of
``REGION_BYTES`` within each segment, so a position chosen by an adversary can only name a
whole region, used (if ever) in the same roles. The receiver accepts a region only at or
beyond the last one it verified, checks the block id, sequence and message check of every
message at once, and moves its cursor past a region when a tag from it verifies. A message
without a valid tag where one is due, or whose tag or check fails, raises
:class:`AuthError`: the block aborts.

Key pool: two directional streams of one-time key (``t2r`` used by the transmitter to
send, ``r2t`` by the receiver), each a list of segments (segment -1 = the pre-shared secret,
segment b = bytes reserved from the final key of block b). Each sender consumes its own
stream strictly forward from a persisted cursor, so a region is never used twice whatever
happens to a block; the cursor is saved (write, fsync, rename) before the region is used.
A sender draws only from segments the peer has announced (``segs`` of its last verified
tagged message), so a block that succeeded on one side only (final message lost) never
desynchronises the pools: its segment simply stays unused.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog
from cryptography.hazmat.primitives.poly1305 import Poly1305

from qkdnode.paths import check_private_file, private_dir
from qkdnode.postproc.transport import Buffer, PeerMessage, PeerTransport, as_bytes

Stream = Literal["t2r", "r2t"]
Role = Literal["transmitter", "receiver"]
PSK_SEGMENT = -1
log = structlog.get_logger(__name__)

KEY_BYTES = 16  # one Poly1305 "r" half: a polynomial-hash key (clamped to 106 bits)
PAD_BYTES = 16  # one Poly1305 "s" half: the one-time pad of one tag
TAGS_PER_BLOCK = 2  # transcript tags per block and direction (see pipeline)
# k_in, k_out, k_mac, then one pad per tag: 80 bytes = 640 bits
REGION_BYTES = 3 * KEY_BYTES + TAGS_PER_BLOCK * PAD_BYTES
# Block attempts that the pre-shared secret must authenticate before a block refills the
# pool: start-up blocks may abort (error rate, statistics, link trouble) and every attempt
# consumes one region per direction.
BOOTSTRAP_ATTEMPTS = 16
_TRANSCRIPT_HEAD = struct.Struct("<qBBII")  # block id, direction, tag index, two counts
_MAC_NONCE = struct.Struct("<qQ")  # block id, sequence number
_DIRECTION = {"t2r": 0, "r2t": 1}


class AuthError(Exception):
    """A message failed authentication or ordering checks (never includes key bytes)."""


class AuthPoolExhaustedError(AuthError):
    """Not enough one-time key left in the pool to authenticate."""


def poly1305_epsilon(nbytes: int) -> float:
    """Bernstein's bound on Poly1305's differential probability for messages of up to
    ``nbytes`` bytes: ``8 * ceil(nbytes / 16) / 2**106``."""
    return 8 * max(1, math.ceil(nbytes / 16)) / 2**106


def min_psk_bytes(attempts: int = BOOTSTRAP_ATTEMPTS) -> int:
    """Smallest pre-shared secret (bytes, same on both nodes) for ``attempts`` block attempts.

    Half of the secret keys each direction, and every block attempt consumes one region of
    :data:`REGION_BYTES` per direction whatever the block size (the number of tags per
    block is fixed), so the block size does not enter: ``2 * attempts * REGION_BYTES``
    (2560 bytes for the default 16 attempts, which leaves room for 15 aborted blocks before
    the first one that refills the pool).
    """
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    return 2 * attempts * REGION_BYTES


def _encode(kind: str, header: dict[str, Any], buffers: Sequence[Buffer]) -> list[Any]:
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    parts: list[Any] = [
        len(kind).to_bytes(4, "little") + kind.encode("ascii"),
        len(head).to_bytes(8, "little") + head,
    ]
    for buf in buffers:
        view = as_bytes(buf)
        parts.append(len(view).to_bytes(8, "little"))
        parts.append(view)
    return parts


def compute_tag(
    key32: bytes, kind: str, header: dict[str, Any], buffers: Sequence[Buffer]
) -> bytes:
    """Poly1305 with the 32-byte ``key32`` over kind, canonical header and length-prefixed
    buffers (an injective encoding of the message)."""
    mac = Poly1305(key32)
    for part in _encode(kind, header, buffers):
        mac.update(part)
    return mac.finalize()


def message_digest(
    k_in: bytes,
    kind: str,
    header: dict[str, Any],
    buffers: Sequence[Buffer],
    mac_key: bytes | None = None,
) -> tuple[bytes, int, bytes]:
    """``(digest, encoded length, mac)`` of one message. ``digest = Poly1305_{k_in, s=0}``
    is its almost-universal compression into the transcript (never sent: it only enters
    padded tags); ``mac = Poly1305_{mac_key}`` (32-byte key, see :func:`message_mac_key`;
    ``b""`` without one) is the per-message check."""
    digest = Poly1305(k_in + bytes(PAD_BYTES))
    mac = Poly1305(mac_key) if mac_key is not None else None
    length = 0
    for part in _encode(kind, header, buffers):
        digest.update(part)
        if mac is not None:
            mac.update(part)
        length += len(part)
    return digest.finalize(), length, b"" if mac is None else mac.finalize()


def message_mac_key(k_mac: bytes, block_id: int, seq: int) -> bytes:
    """One-time Poly1305 key of message ``seq`` of a block: HMAC-SHA256(k_mac, block, seq)
    (a PRF, as in Poly1305-AES / ChaCha20-Poly1305: computational security)."""
    return hmac.new(k_mac, _MAC_NONCE.pack(block_id, seq), "sha256").digest()


def transcript_tag(
    k_out: bytes,
    pad: bytes,
    *,
    block_id: int,
    direction: Stream,
    index: int,
    t2r: Sequence[bytes],
    r2t: Sequence[bytes],
) -> tuple[bytes, int]:
    """``(tag, encoded length)`` of a transcript: Poly1305_{k_out, pad} over block id, the
    tagging direction, the tag index, both message counts and both digest sequences."""
    head = _TRANSCRIPT_HEAD.pack(block_id, _DIRECTION[direction], index, len(t2r), len(r2t))
    mac = Poly1305(k_out + pad)
    mac.update(head)
    mac.update(b"".join(t2r))
    mac.update(b"".join(r2t))
    return mac.finalize(), len(head) + KEY_BYTES * (len(t2r) + len(r2t))


@dataclass
class _StreamState:
    segments: dict[int, bytes] = field(default_factory=dict)
    send_cursor: tuple[int, int] = (PSK_SEGMENT, 0)  # own sending position
    send_reserved: tuple[int, int] = (PSK_SEGMENT, 0)  # persisted position (>= cursor)
    recv_cursor: tuple[int, int] = (PSK_SEGMENT, 0)  # first acceptable peer position


def _aligned(off: int) -> int:
    return -(-off // REGION_BYTES) * REGION_BYTES


class AuthKeyPool:
    """Persistent one-time key for authentication (see module doc). File mode 0600."""

    def __init__(self, path: Path, streams: dict[str, _StreamState], peer_has: set[int]) -> None:
        self.path = path
        self._streams = streams
        self.peer_has = peer_has
        self.spent_bits = 0  # own key consumed (both streams) since this object was made

    # --- persistence ------------------------------------------------------------
    @classmethod
    def bootstrap(cls, path: str | Path, psk: bytes, *, source: str | None = None) -> AuthKeyPool:
        """Create a pool from a pre-shared secret (same on both nodes; at least
        :func:`min_psk_bytes`). Raises FileExistsError if the pool exists, ValueError naming
        the secret's file (``source``; default: the ``auth.psk`` credential or
        ``protocol.auth_psk_file``) and the minimum if the secret is too short."""
        p = Path(path)
        need = min_psk_bytes()
        if len(psk) < need:
            where = source or "the auth.psk credential / [protocol] auth_psk_file"
            raise ValueError(
                f"pre-shared secret too short: {where} holds {len(psk)} bytes, need at "
                f"least {need} bytes (same random bytes on both nodes, e.g. "
                f"head -c {max(need, 4096)} /dev/urandom)"
            )
        private_dir(p.parent)
        if p.exists():
            raise FileExistsError(f"auth pool {p} exists; refusing to re-bootstrap")
        half = len(psk) // 2
        streams = {
            "t2r": _StreamState({PSK_SEGMENT: psk[:half]}),
            "r2t": _StreamState({PSK_SEGMENT: psk[half : 2 * half]}),
        }
        pool = cls(p, streams, {PSK_SEGMENT})
        pool.save()
        return pool

    @classmethod
    def load(cls, path: str | Path) -> AuthKeyPool:
        """Load a pool; the send cursor resumes at the persisted reservation. Refuses
        (InsecureFileError naming the path) a pool file other users can access."""
        p = Path(path)
        check_private_file(p, "authentication key pool")
        try:
            data = json.loads(p.read_text())
            streams = {}
            for name in ("t2r", "r2t"):
                s = data["streams"][name]
                reserved = tuple(s["send_reserved"])
                streams[name] = _StreamState(
                    {int(k): base64.b64decode(v) for k, v in s["segments"].items()},
                    reserved,  # type: ignore[arg-type]
                    reserved,  # type: ignore[arg-type]
                    tuple(s["recv_cursor"]),  # type: ignore[arg-type]
                )
            peer_has = {int(x) for x in data["peer_has"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AuthError(f"cannot load auth pool {p}: {type(exc).__name__}") from None
        return cls(p, streams, peer_has)

    def save(self) -> None:
        data = {
            "version": 1,
            "peer_has": sorted(self.peer_has),
            "streams": {
                name: {
                    "segments": {
                        str(k): base64.b64encode(v).decode() for k, v in s.segments.items()
                    },
                    "send_reserved": list(s.send_reserved),
                    "recv_cursor": list(s.recv_cursor),
                }
                for name, s in self._streams.items()
            },
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # whatever the umask, and even if a stale .tmp was looser
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    # --- regions ------------------------------------------------------------------
    def segments(self) -> list[int]:
        return sorted(self._streams["t2r"].segments)

    def available_bytes(self, stream: Stream) -> int:
        """Own key still usable in ``stream`` (whole regions, announced segments only)."""
        s = self._streams[stream]
        seg, off = s.send_cursor
        total = 0
        for k, v in s.segments.items():
            if k < seg or k not in self.peer_has:
                continue
            start = _aligned(off) if k == seg else 0
            total += max(0, len(v) - start) // REGION_BYTES * REGION_BYTES
        return total

    def take(self, stream: Stream, nbytes: int = REGION_BYTES) -> tuple[int, int, bytes]:
        """Next ``nbytes`` (at most one region) of own key in ``stream``, on the region
        grid: ``(segment, offset, bytes)``. The new cursor is on disk before this returns,
        so a crash can skip key but never reuse it."""
        if not 0 < nbytes <= REGION_BYTES:
            raise ValueError(f"take 1..{REGION_BYTES} bytes, not {nbytes}")
        s = self._streams[stream]
        seg, off = s.send_cursor
        for k in sorted(s.segments):
            if k < seg or k not in self.peer_has:
                continue
            start = _aligned(off) if k == seg else 0
            if start + nbytes <= len(s.segments[k]):
                s.send_cursor = s.send_reserved = (k, start + nbytes)
                self.save()
                self.spent_bits += 8 * nbytes
                return k, start, s.segments[k][start : start + nbytes]
        raise AuthPoolExhaustedError(
            f"auth pool stream {stream} exhausted: no {nbytes}-byte region left "
            f"({self.available_bytes(stream)} bytes usable); refill it with a new "
            "pre-shared secret (both nodes) or check why blocks abort"
        )

    def peer_region(self, stream: Stream, seg: int, off: int) -> bytes:
        """The peer's region at ``(seg, off)``: on the grid, inside the pool, and at or
        beyond the last region accepted from the peer."""
        s = self._streams[stream]
        if off % REGION_BYTES:
            raise AuthError("region position off the region grid")
        if (seg, off) < s.recv_cursor:
            raise AuthError("region already used (replayed message)")
        data = s.segments.get(seg)
        if data is None or off < 0 or off + REGION_BYTES > len(data):
            raise AuthError("region position outside the pool")
        return data[off : off + REGION_BYTES]

    def accept(self, stream: Stream, seg: int, end_off: int) -> None:
        """A tag from the peer's region ending at ``(seg, end_off)`` verified."""
        s = self._streams[stream]
        s.recv_cursor = max(s.recv_cursor, (seg, end_off))

    def add_segment(self, segment_id: int, t2r: bytes, r2t: bytes) -> None:
        """Replenish both streams from a block's final key (``segment_id`` = block id)."""
        if segment_id <= PSK_SEGMENT or segment_id in self._streams["t2r"].segments:
            raise ValueError(f"segment id {segment_id} invalid or already present")
        self._streams["t2r"].segments[segment_id] = t2r
        self._streams["r2t"].segments[segment_id] = r2t
        self.save()

    def snapshot(self) -> dict[str, Any]:
        """Cursors and sizes (no key bytes) for stats and tests."""
        return {
            name: {
                "send_cursor": s.send_cursor,
                "recv_cursor": s.recv_cursor,
                "segment_bytes": {k: len(v) for k, v in s.segments.items()},
            }
            for name, s in self._streams.items()
        }

    def stream_digest(self, stream: Stream) -> str:
        """SHA-256 of a stream's content (tests compare the two nodes' pools with it)."""
        import hashlib

        h = hashlib.sha256()
        for k in sorted(self._streams[stream].segments):
            h.update(k.to_bytes(8, "little", signed=True) + self._streams[stream].segments[k])
        return h.hexdigest()


@dataclass
class _Region:
    seg: int
    off: int
    key: bytes = field(repr=False)

    @property
    def k_in(self) -> bytes:
        return self.key[:KEY_BYTES]

    @property
    def k_out(self) -> bytes:
        return self.key[KEY_BYTES : 2 * KEY_BYTES]

    @property
    def k_mac(self) -> bytes:
        return self.key[2 * KEY_BYTES : 3 * KEY_BYTES]

    def pad(self, index: int) -> bytes:
        start = 3 * KEY_BYTES + (index - 1) * PAD_BYTES
        return self.key[start : start + PAD_BYTES]


class AuthenticatedTransport:
    """Wraps a :class:`PeerTransport`; same ``send``/``recv`` plus ``begin_block``.

    ``send(..., tag=True)`` ends a phase: the message carries a tag over the block's whole
    transcript. ``recv(..., tagged=True)`` requires one (an ``abort`` is returned as it
    is). A tag on any received message is verified; a failure raises :class:`AuthError`.
    """

    def __init__(self, transport: PeerTransport, pool: AuthKeyPool, role: Role) -> None:
        self._t = transport
        self.pool = pool
        self._send_stream: Stream = "t2r" if role == "transmitter" else "r2t"
        self._recv_stream: Stream = "r2t" if role == "transmitter" else "t2r"
        self.block_id: int | None = None
        self._first: PeerMessage | None = None
        self.begin_block_stats()

    def begin_block_stats(self) -> None:
        self.sent_pad_bits = 0  # own key consumed this block
        self.recv_pad_bits = 0  # peer's key verified this block
        self.tags_sent = 0
        self.tags_verified = 0
        self.messages_sent = 0
        self.messages_received = 0
        self.forgery_bound = 0.0  # sum over this side's verifications of the bound

    def begin_block(self, block_id: int, first: PeerMessage | None = None) -> None:
        """Start block ``block_id``. ``first``: its first message, already read from the
        transport (the transmitter learns of a block from it); the next :meth:`recv`
        returns it, checked like any other."""
        self.block_id = block_id
        self._first = first
        self._send_seq = 0
        self._recv_seq = 0
        self._send_region: _Region | None = None
        self._recv_region: _Region | None = None
        self._digests: dict[Stream, list[bytes]] = {"t2r": [], "r2t": []}
        self._max_message_bytes = 0
        self.begin_block_stats()

    async def send(
        self, kind: str, header: dict[str, Any], buffers: Sequence[Buffer], *, tag: bool = False
    ) -> None:
        if self.block_id is None:
            raise AuthError("send before begin_block")
        if kind == "abort":  # ends the block, authenticated or not: never costs key
            auth_abort = {"b": self.block_id, "q": self._send_seq}
            await self._t.send(kind, {**header, "_auth": auth_abort}, buffers)
            return
        if self._send_region is None:
            seg, off, key = self.pool.take(self._send_stream, REGION_BYTES)
            self._send_region = _Region(seg, off, key)
            self.sent_pad_bits += 8 * REGION_BYTES
        region = self._send_region
        auth: dict[str, Any] = {
            "b": self.block_id,
            "q": self._send_seq,
            "p": [region.seg, region.off],
        }
        if tag:
            if self.tags_sent >= TAGS_PER_BLOCK:
                raise AuthError(f"more than {TAGS_PER_BLOCK} tags in one block")
            auth["t"] = self.tags_sent + 1
            auth["segs"] = self.pool.segments()
        full = {**header, "_auth": auth}
        mac_key = message_mac_key(region.k_mac, self.block_id, self._send_seq)
        digest, length, mac = message_digest(region.k_in, kind, full, buffers, mac_key)
        self._digests[self._send_stream].append(digest)
        self._max_message_bytes = max(self._max_message_bytes, length)
        if tag:
            index = self.tags_sent + 1
            value, _ = transcript_tag(
                region.k_out,
                region.pad(index),
                block_id=self.block_id,
                direction=self._send_stream,
                index=index,
                t2r=self._digests["t2r"],
                r2t=self._digests["r2t"],
            )
            full["_tag"] = value.hex()
            self.tags_sent = index
        full["_mac"] = mac.hex()
        self._send_seq += 1
        self.messages_sent += 1
        await self._t.send(kind, full, buffers)

    async def recv(self, timeout_s: float, *, tagged: bool = False) -> PeerMessage:
        if self.block_id is None:
            raise AuthError("recv before begin_block")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            first, self._first = self._first, None
            msg = first or await self._t.recv(max(0.0, deadline - loop.time()))
            b = msg.header.get("_auth", {}).get("b") if isinstance(msg.header, dict) else None
            if isinstance(b, int) and b < self.block_id:
                log.info("auth_stale_message_dropped", kind=msg.kind, block_id=b)
                continue  # left over from an earlier (aborted) block: ignore unverified
            break
        header = dict(msg.header)
        try:
            tag_hex = header.pop("_tag", None)
            mac_hex = header.pop("_mac", None)
            auth = header["_auth"]
            block, seq = int(auth["b"]), int(auth["q"])
        except (KeyError, TypeError, ValueError):
            raise AuthError(f"message {msg.kind!r} lacks a valid authentication field") from None
        if block != self.block_id:
            raise AuthError(f"message for block {block}, expected block {self.block_id}")
        if msg.kind == "abort":  # unauthenticated: the block ends without key either way
            del header["_auth"]
            return PeerMessage(msg.kind, header, msg.buffers)
        if seq != self._recv_seq:
            raise AuthError(
                f"message sequence {seq}, expected {self._recv_seq} (replay/drop/reorder)"
            )
        try:
            seg, off = (int(x) for x in auth["p"])
            segs = {int(x) for x in auth.get("segs", ())}
            index = int(auth["t"]) if "t" in auth else None
            tag = None if tag_hex is None else bytes.fromhex(tag_hex)
            mac = bytes.fromhex(mac_hex)
        except (KeyError, TypeError, ValueError):
            raise AuthError(f"message {msg.kind!r} lacks a valid authentication field") from None
        if self._recv_region is None:
            region = _Region(seg, off, self.pool.peer_region(self._recv_stream, seg, off))
        elif (seg, off) != (self._recv_region.seg, self._recv_region.off):
            raise AuthError("region position changed within a block")
        else:
            region = self._recv_region
        mac_key = message_mac_key(region.k_mac, self.block_id, seq)
        digest, length, expected_mac = message_digest(
            region.k_in, msg.kind, header, msg.buffers, mac_key
        )
        if not hmac.compare_digest(expected_mac, mac):
            raise AuthError(f"message check failed on {msg.kind!r} (tampered or injected)")
        if (tag is None) != (index is None):
            raise AuthError(f"message {msg.kind!r} has a tag index without a tag or vice versa")
        if tag is None and tagged:
            raise AuthError(f"message {msg.kind!r} lacks its transcript tag (phase end)")
        self._recv_region = region
        self._digests[self._recv_stream].append(digest)
        self._max_message_bytes = max(self._max_message_bytes, length)
        self._recv_seq += 1
        self.messages_received += 1
        if tag is not None:
            assert index is not None
            self._verify(tag, index, segs)
        del header["_auth"]
        return PeerMessage(msg.kind, header, msg.buffers)

    def _verify(self, tag: bytes, index: int, segs: set[int]) -> None:
        region = self._recv_region
        assert region is not None and self.block_id is not None
        if index != self.tags_verified + 1 or index > TAGS_PER_BLOCK:
            raise AuthError(f"tag index {index}, expected {self.tags_verified + 1}")
        expected, enc_len = transcript_tag(
            region.k_out,
            region.pad(index),
            block_id=self.block_id,
            direction=self._recv_stream,
            index=index,
            t2r=self._digests["t2r"],
            r2t=self._digests["r2t"],
        )
        self.forgery_bound += poly1305_epsilon(self._max_message_bytes) + poly1305_epsilon(enc_len)
        if not hmac.compare_digest(expected, tag):
            raise AuthError(
                f"transcript tag {index} mismatch: the block's messages differ between the "
                "nodes (tampered, injected or lost)"
            )
        if self.tags_verified == 0:
            self.pool.accept(self._recv_stream, region.seg, region.off + REGION_BYTES)
            self.recv_pad_bits = 8 * REGION_BYTES
        self.tags_verified = index
        self.pool.peer_has = segs | {PSK_SEGMENT}
