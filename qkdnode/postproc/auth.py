"""Wegman-Carter authentication of every protocol message, and the key pool feeding it.

Tag = Poly1305_{r,s}(message): ``r`` (the polynomial-hash key, 16 bytes) is drawn from the
pool once per block per direction and reused for the block's messages; ``s`` (16 bytes) is
a fresh one-time pad per message. Poly1305 is an epsilon-almost-Delta-universal hash
(forgery probability <= 8 * ceil(L/16) / 2**106 per message of L bytes) and adding a
one-time pad makes this the Wegman-Carter construction; OpenSSL's implementation gives
> 1 GB/s, which a hand-written polynomial hash in numpy would not.

The authenticated content is the kind, the canonical JSON header (including block id,
sequence number, pad positions) and every buffer with its length. A tampered, replayed
(old block id, old pad position), reordered or dropped (sequence gap) message raises
:class:`AuthError`.

Key pool: two directional streams of one-time key (``t2r`` used by the transmitter to
send, ``r2t`` by the receiver), each a list of segments (segment -1 = the pre-shared secret,
segment b = bytes reserved from the final key of block b). Each sender consumes its own
stream strictly forward from a persisted cursor, so a pad is never used twice whatever
happens to a block; the receiver accepts only pad positions beyond the last one it accepted.
A sender draws only from segments the peer has announced (``segs`` in every header), so a
block that succeeded on one side only (final message lost) never desynchronises the pools:
its segment simply stays unused. Pad positions travel in the header; the pool file is
replaced atomically (write, fsync, rename) and the send cursor is persisted ahead in
reservations of :data:`RESERVE_BYTES`, so a crash skips pads rather than reusing them.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import os
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
RESERVE_BYTES = 1024
PAD_BYTES = 16


class AuthError(Exception):
    """A message failed authentication or ordering checks (never includes key bytes)."""


class AuthPoolExhaustedError(AuthError):
    """Not enough one-time key left in the pool to authenticate."""


def compute_tag(
    key32: bytes, kind: str, header: dict[str, Any], buffers: Sequence[Buffer]
) -> bytes:
    """Poly1305 tag over kind, canonical header and length-prefixed buffers."""
    mac = Poly1305(key32)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    mac.update(len(kind).to_bytes(4, "little") + kind.encode("ascii"))
    mac.update(len(head).to_bytes(8, "little") + head)
    for buf in buffers:
        view = as_bytes(buf)
        mac.update(len(view).to_bytes(8, "little"))
        mac.update(view)
    return mac.finalize()


@dataclass
class _StreamState:
    segments: dict[int, bytes] = field(default_factory=dict)
    send_cursor: tuple[int, int] = (PSK_SEGMENT, 0)  # own sending position
    send_reserved: tuple[int, int] = (PSK_SEGMENT, 0)  # persisted position (>= cursor)
    recv_cursor: tuple[int, int] = (PSK_SEGMENT, 0)  # first acceptable peer position


class AuthKeyPool:
    """Persistent one-time key for authentication (see module doc). File mode 0600."""

    def __init__(self, path: Path, streams: dict[str, _StreamState], peer_has: set[int]) -> None:
        self.path = path
        self._streams = streams
        self.peer_has = peer_has
        self.spent_bits = 0

    # --- persistence ------------------------------------------------------------
    @classmethod
    def bootstrap(cls, path: str | Path, psk: bytes) -> AuthKeyPool:
        """Create a pool from a pre-shared secret (same on both nodes; >= 256 bytes).
        Raises FileExistsError if the pool exists, ValueError if the secret is short."""
        p = Path(path)
        private_dir(p.parent)
        if p.exists():
            raise FileExistsError(f"auth pool {p} exists; refusing to re-bootstrap")
        if len(psk) < 256:
            raise ValueError(f"pre-shared secret too short: {len(psk)} bytes, need >= 256")
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

    # --- pads ---------------------------------------------------------------------
    def segments(self) -> list[int]:
        return sorted(self._streams["t2r"].segments)

    def available_bytes(self, stream: Stream) -> int:
        s = self._streams[stream]
        seg, off = s.send_cursor
        return sum(
            len(v) - (off if k == seg else 0)
            for k, v in s.segments.items()
            if (k, 0) >= (seg, 0) and k in self.peer_has
        )

    def take(self, stream: Stream, nbytes: int) -> tuple[int, int, bytes]:
        """Next ``nbytes`` of own pad in ``stream``: ``(segment, offset, bytes)``."""
        s = self._streams[stream]
        seg, off = s.send_cursor
        for k in sorted(s.segments):
            if k < seg or k not in self.peer_has:
                continue
            start = off if k == seg else 0
            if start + nbytes <= len(s.segments[k]):
                s.send_cursor = (k, start + nbytes)
                if s.send_cursor > s.send_reserved:
                    s.send_reserved = (k, min(len(s.segments[k]), start + nbytes + RESERVE_BYTES))
                    self.save()
                self.spent_bits += 8 * nbytes
                return k, start, s.segments[k][start : start + nbytes]
        raise AuthPoolExhaustedError(f"auth pool stream {stream} exhausted")

    def peer_pad(self, stream: Stream, seg: int, off: int, nbytes: int, first: bool) -> bytes:
        """Peer's pad at ``(seg, off)``; must lie at or beyond the accepted cursor."""
        s = self._streams[stream]
        if first and (seg, off) < s.recv_cursor:
            raise AuthError("pad position already used (replayed message)")
        data = s.segments.get(seg)
        if data is None or off < 0 or off + nbytes > len(data):
            raise AuthError("pad position outside the pool")
        return data[off : off + nbytes]

    def accept(self, stream: Stream, seg: int, end_off: int) -> None:
        s = self._streams[stream]
        s.recv_cursor = max(s.recv_cursor, (seg, end_off))
        self.spent_bits += 0  # peer pads are accounted by the sender

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


class AuthenticatedTransport:
    """Wraps a :class:`PeerTransport`; same ``send``/``recv`` plus ``begin_block``."""

    def __init__(self, transport: PeerTransport, pool: AuthKeyPool, role: Role) -> None:
        self._t = transport
        self.pool = pool
        self._send_stream: Stream = "t2r" if role == "transmitter" else "r2t"
        self._recv_stream: Stream = "r2t" if role == "transmitter" else "t2r"
        self.block_id: int | None = None
        self.sent_pad_bits = 0
        self.recv_pad_bits = 0

    def begin_block(self, block_id: int) -> None:
        self.block_id = block_id
        self._send_seq = 0
        self._recv_seq = 0
        self._send_r: tuple[int, int, bytes] | None = None
        self._recv_r: tuple[int, int] | None = None
        self.sent_pad_bits = 0
        self.recv_pad_bits = 0

    async def send(self, kind: str, header: dict[str, Any], buffers: Sequence[Buffer]) -> None:
        if self.block_id is None:
            raise AuthError("send before begin_block")
        if self._send_r is None:
            seg, off, pad = self.pool.take(self._send_stream, 2 * PAD_BYTES)
            self._send_r = (seg, off, pad[:PAD_BYTES])
            s_pos, s_pad = (seg, off + PAD_BYTES), pad[PAD_BYTES:]
            self.sent_pad_bits += 8 * 2 * PAD_BYTES
        else:
            sseg, soff, s_pad = self.pool.take(self._send_stream, PAD_BYTES)
            s_pos = (sseg, soff)
            self.sent_pad_bits += 8 * PAD_BYTES
        auth = {
            "b": self.block_id,
            "q": self._send_seq,
            "r": [self._send_r[0], self._send_r[1]],
            "s": list(s_pos),
            "segs": self.pool.segments(),
        }
        full = {**header, "_auth": auth}
        tag = compute_tag(self._send_r[2] + s_pad, kind, full, buffers)
        full["_tag"] = tag.hex()
        self._send_seq += 1
        await self._t.send(kind, full, buffers)

    async def recv(self, timeout_s: float) -> PeerMessage:
        if self.block_id is None:
            raise AuthError("recv before begin_block")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            msg = await self._t.recv(max(0.0, deadline - loop.time()))
            b = msg.header.get("_auth", {}).get("b") if isinstance(msg.header, dict) else None
            if isinstance(b, int) and b < self.block_id:
                log.info("auth_stale_message_dropped", kind=msg.kind, block_id=b)
                continue  # left over from an earlier (aborted) block: ignore unverified
            break
        header = dict(msg.header)
        try:
            tag_hex = header.pop("_tag")
            auth = header["_auth"]
            block, seq = int(auth["b"]), int(auth["q"])
            r_seg, r_off = (int(x) for x in auth["r"])
            s_seg, s_off = (int(x) for x in auth["s"])
            segs = {int(x) for x in auth["segs"]}
            tag = bytes.fromhex(tag_hex)
        except (KeyError, TypeError, ValueError):
            raise AuthError(f"message {msg.kind!r} lacks a valid authentication field") from None
        first = self._recv_r is None
        if first:
            if (s_seg, s_off) != (r_seg, r_off + PAD_BYTES):
                raise AuthError("first message of a block must carry r and s contiguously")
        elif (r_seg, r_off) != self._recv_r:
            raise AuthError("hash key position changed within a block")
        r_pad = self.pool.peer_pad(self._recv_stream, r_seg, r_off, PAD_BYTES, first)
        s_pad = self.pool.peer_pad(self._recv_stream, s_seg, s_off, PAD_BYTES, True)
        expected = compute_tag(r_pad + s_pad, msg.kind, header, msg.buffers)
        if not hmac.compare_digest(expected, tag):
            raise AuthError(f"authentication tag mismatch on message {msg.kind!r}")
        if block != self.block_id:
            raise AuthError(f"message for block {block}, expected block {self.block_id}")
        if seq != self._recv_seq:
            raise AuthError(
                f"message sequence {seq}, expected {self._recv_seq} (replay/drop/reorder)"
            )
        self._recv_seq += 1
        self._recv_r = (r_seg, r_off)
        self.pool.accept(self._recv_stream, s_seg, s_off + PAD_BYTES)
        self.recv_pad_bits += 8 * (2 * PAD_BYTES if first else PAD_BYTES)
        self.pool.peer_has = segs | {PSK_SEGMENT}
        del header["_auth"]
        return PeerMessage(msg.kind, header, msg.buffers)
