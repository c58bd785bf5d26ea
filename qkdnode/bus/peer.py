"""The classical channel between transmitter and receiver.

Topology: the transmitter binds a ROUTER on ``bus.peer_endpoint``, the receiver connects
a DEALER (one peer at a time; the ROUTER replies to whichever peer session said hello
last). Messages are multipart: one small JSON header frame, then the bulk buffers as raw
binary frames (numpy arrays are sent as their bytes, with dtype and shape in the header).

Liveness (Paranoid Pirate): both sides send ``$hb`` every ``bus.heartbeat_interval_s``;
after ``bus.heartbeat_liveness`` silent intervals the link is down. The receiver then
replaces its socket and retries with exponential backoff (capped at
``bus.reconnect_max_s``).

Resume or abort: each side has a random session id and numbers its data messages. The
channel resumes transparently across a reconnection when nothing was lost; if the peer
restarted (new session) or messages were lost (sequence gap), the next :meth:`recv`
raises :class:`PeerDisconnected` once (``reason`` ``"restarted"`` / ``"lost"``), so the
post-processing aborts the block in progress, then later messages flow normally.

Security: CURVE with the peer's public key (``bus.peer_public_key``) unless
``bus.allow_plaintext``. CURVE gives confidentiality and computational authentication
only; the post-processing layer adds information-theoretic authentication on top.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast, runtime_checkable

import numpy as np
import structlog
import zmq
import zmq.asyncio
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qkdnode.backoff import Backoff
from qkdnode.bus.envelope import PROTOCOL_VERSION
from qkdnode.bus.errors import BusError, PeerDisconnected, PeerTimeout
from qkdnode.bus.keys import public_from_secret
from qkdnode.bus.sockets import bound_endpoint, make_curve_client, make_curve_server, warn_plaintext
from qkdnode.bus.zap import Identity, ZapHandler
from qkdnode.config.sections import BusSection

log = structlog.get_logger(__name__)

PEER_DOMAIN = "peer"
KIND_PATTERN = r"^[a-z][a-z0-9_.\-]{0,63}$"
HELLO = "$hello"
HEARTBEAT = "$hb"
MAX_BUFFERS = 64
NodeRole = Literal["transmitter", "receiver"]
Buffer = bytes | memoryview | np.ndarray


class BufferMeta(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    nbytes: int = Field(ge=0)
    dtype: str | None = Field(None, max_length=32)
    shape: list[int] | None = Field(None, max_length=32)


class PeerHeader(BaseModel):
    """The JSON header frame of every peer message (see docs/protocol.md, "Peer")."""

    model_config = ConfigDict(extra="forbid", strict=True)
    v: int
    kind: str = Field(min_length=1, max_length=64)
    seq: int = Field(ge=0)
    session: str = Field(min_length=1, max_length=64)
    ts: float
    header: dict[str, Any] = Field(default_factory=dict)
    buffers: list[BufferMeta] = Field(default_factory=list, max_length=MAX_BUFFERS)


@dataclass
class PeerMessage:
    kind: str
    header: dict[str, Any]
    buffers: list[bytes]
    seq: int = 0
    meta: list[BufferMeta] = field(default_factory=list)

    def __repr__(self) -> str:  # buffers may hold secret-derived data: sizes only
        sizes = [len(b) for b in self.buffers]
        keys = sorted(self.header)
        return f"PeerMessage(kind={self.kind!r}, seq={self.seq}, header_keys={keys}, sizes={sizes})"

    def array(self, index: int) -> np.ndarray[Any, Any]:
        """Buffer ``index`` as the numpy array it was sent as (read-only view)."""
        m = self.meta[index]
        arr = np.frombuffer(self.buffers[index], dtype=np.dtype(m.dtype or "u1"))
        return arr.reshape(m.shape) if m.shape is not None else arr


@runtime_checkable
class PeerLink(Protocol):
    """What the post-processing layer needs from the classical channel."""

    async def send(self, kind: str, header: dict[str, Any], buffers: Sequence[Buffer]) -> None: ...

    async def recv(self, timeout_s: float) -> PeerMessage: ...


async def next_message(inbox: asyncio.Queue[Any], timeout_s: float) -> PeerMessage:
    """The next message of a peer inbox (messages and link events, in arrival order):
    PeerTimeout after ``timeout_s``, a link event (PeerDisconnected) raised."""
    try:
        if inbox.empty():
            async with asyncio.timeout(timeout_s):
                item = await inbox.get()
        else:
            item = inbox.get_nowait()
    except TimeoutError:
        raise PeerTimeout(f"no peer message within {timeout_s:g} s") from None
    if isinstance(item, PeerDisconnected):
        raise item
    assert isinstance(item, PeerMessage)
    return item


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _as_frame(buf: Buffer) -> tuple[Any, BufferMeta]:
    if isinstance(buf, np.ndarray):
        arr = np.ascontiguousarray(buf)
        return arr.data.cast("B"), BufferMeta(
            nbytes=arr.nbytes, dtype=arr.dtype.str, shape=list(arr.shape)
        )
    view = memoryview(buf)
    return view, BufferMeta(nbytes=view.nbytes)


class PeerChannel:
    """One end of the peer link. Use ``async with PeerChannel(...) as ch`` or start/stop."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        bus_config: BusSection,
        node_role: NodeRole,
        secret_key: bytes | None,
        *,
        peer_public_key: bytes | None = None,
        inbox_size: int = 64,
    ) -> None:
        if node_role not in ("transmitter", "receiver"):
            raise ValueError(f"node_role must be transmitter or receiver, got {node_role!r}")
        self._ctx = ctx
        self._bus = bus_config
        self.role: NodeRole = node_role
        self._secret = secret_key
        cfg_key = bus_config.peer_public_key
        self._peer_key = peer_public_key or (cfg_key.encode("ascii") if cfg_key else None)
        self._plaintext = bus_config.allow_plaintext
        self._sock: zmq.asyncio.Socket | None = None
        self._zap: ZapHandler | None = None
        self._inbox: asyncio.Queue[PeerMessage | PeerDisconnected] = asyncio.Queue(inbox_size)
        self._tasks: list[asyncio.Task[None]] = []
        self._reader: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._peer_identity: bytes | None = None
        self.session = os.urandom(8).hex()
        self.peer_session: str | None = None
        self._send_seq = 0
        self._recv_seq = 0
        self.liveness = bus_config.heartbeat_liveness
        self.link_epoch = 0
        self.reconnects = 0
        self.stats: dict[str, int] = {"sent": 0, "received": 0, "bad": 0, "lost": 0}
        self.endpoint = bus_config.peer_endpoint
        self._send_lock = asyncio.Lock()

    # ---------------------------------------------------------------- life cycle
    async def __aenter__(self) -> PeerChannel:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._sock is not None:
            return
        if self._plaintext:
            warn_plaintext("peer", self._bus.peer_endpoint)
        elif self._secret is None or self._peer_key is None:
            raise BusError(
                "bus.peer_public_key and this node's secret key are required for the "
                "peer channel unless bus.allow_plaintext is true"
            )
        if self.role == "transmitter" and not self._plaintext:
            assert self._peer_key is not None
            allow = {self._peer_key: Identity("peer", "peer")}
            allow.update(
                {
                    c.public_key.encode(): Identity(c.name, "peer")
                    for c in self._bus.clients
                    if c.role == "peer"
                }
            )
            self._zap = ZapHandler.acquire(self._ctx)
            self._zap.set_domain(PEER_DOMAIN, allow)
        self._open_socket()
        self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="peer-heartbeat"))

    def _open_socket(self) -> None:
        bus = self._bus
        if self.role == "transmitter":
            sock = self._ctx.socket(zmq.ROUTER)
            sock.router_mandatory = 1
            sock.router_handover = 1
        else:
            sock = self._ctx.socket(zmq.DEALER)
            sock.immediate = 1
            sock.reconnect_ivl = 100
            sock.reconnect_ivl_max = int(bus.reconnect_max_s * 1000)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, bus.max_frame_bytes)
        sock.sndhwm = 256
        sock.rcvhwm = 256
        if not self._plaintext:
            assert self._secret is not None and self._peer_key is not None
            if self.role == "transmitter":
                make_curve_server(sock, self._secret, PEER_DOMAIN)
            else:
                make_curve_client(
                    sock, self._peer_key, public_from_secret(self._secret), self._secret
                )
        try:
            if self.role == "transmitter":
                sock.bind(bus.peer_endpoint)
                self.endpoint = bound_endpoint(sock)
            else:
                sock.connect(bus.peer_endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise BusError(f"bus.peer_endpoint: cannot use {bus.peer_endpoint}: {exc}") from None
        self._sock = sock
        self._reader = asyncio.create_task(self._read_loop(sock), name="peer-reader")
        if self.role == "receiver":
            self._send_control_nowait(HELLO)

    async def _close_socket(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self._close_socket()
        if self._zap is not None:
            self._zap.release()
            self._zap = None
        self._connected.clear()

    # ---------------------------------------------------------------- state
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout_s: float) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                await self._connected.wait()
        except TimeoutError:
            raise PeerTimeout(f"peer not connected within {timeout_s:g} s") from None

    def _mark_down(self, why: str) -> None:
        if self._connected.is_set():
            self._connected.clear()
            self.link_epoch += 1
            log.warning("bus.peer.down", reason=why, role=self.role, peer_session=self.peer_session)
            self._push(PeerDisconnected("down", f"peer link down ({why})"))

    def _push(self, item: PeerMessage | PeerDisconnected) -> None:
        if isinstance(item, PeerDisconnected):
            # an event must never be lost to a full inbox: drop the oldest data instead
            while self._inbox.full():
                self._inbox.get_nowait()
                self.stats["lost"] += 1
        self._inbox.put_nowait(item)

    # ---------------------------------------------------------------- sending
    async def send(self, kind: str, header: dict[str, Any], buffers: Sequence[Buffer]) -> None:
        """Send one message. Raises :class:`PeerDisconnected` if there is no live peer."""
        if kind.startswith("$"):
            raise ValueError(f"message kind {kind!r} is reserved")
        if len(buffers) > MAX_BUFFERS:
            raise ValueError(f"at most {MAX_BUFFERS} buffers per message, got {len(buffers)}")
        frames: list[Any] = []
        metas: list[BufferMeta] = []
        for buf in buffers:
            frame, meta = _as_frame(buf)
            if meta.nbytes > self._bus.max_frame_bytes:
                raise ValueError(
                    f"buffer of {meta.nbytes} bytes exceeds bus.max_frame_bytes "
                    f"({self._bus.max_frame_bytes})"
                )
            frames.append(frame)
            metas.append(meta)
        if not self.connected:
            raise PeerDisconnected("down", "no live peer connection")
        async with self._send_lock:
            self._send_seq += 1
            head = self._header(kind, self._send_seq, header, metas)
            await self._send_frames([head, *frames])
        self.stats["sent"] += 1

    def _header(
        self, kind: str, seq: int, header: dict[str, Any], metas: list[BufferMeta]
    ) -> bytes:
        return json.dumps(
            {
                "v": PROTOCOL_VERSION,
                "kind": kind,
                "seq": seq,
                "session": self.session,
                "ts": time.time(),
                "header": header,
                "buffers": [m.model_dump(exclude_none=True) for m in metas],
            },
            separators=(",", ":"),
        ).encode()

    async def _send_frames(self, frames: list[Any]) -> None:
        sock = self._sock
        if sock is None:
            raise PeerDisconnected("down", "peer channel is not running")
        if self.role == "transmitter":
            if self._peer_identity is None:
                raise PeerDisconnected("down", "no peer has connected")
            frames = [self._peer_identity, *frames]
        timeout = self._bus.heartbeat_interval_s * self._bus.heartbeat_liveness
        try:
            # asyncio.timeout, not wait_for: no extra task per message (Cascade sends hundreds
            # per block, and an already-sent message's future is simply done)
            async with asyncio.timeout(timeout):
                await sock.send_multipart(frames, copy=True)
        except zmq.ZMQError as exc:
            self._mark_down(f"send failed: {exc.strerror}")
            raise PeerDisconnected("down", f"send failed: {exc.strerror}") from None
        except TimeoutError:
            raise PeerDisconnected("down", f"send blocked for {timeout:g} s") from None

    def _send_control_nowait(self, kind: str) -> None:
        sock = self._sock
        if sock is None or (self.role == "transmitter" and self._peer_identity is None):
            return
        frames = [self._header(kind, self._send_seq, {}, [])]
        if self.role == "transmitter":
            assert self._peer_identity is not None
            frames.insert(0, self._peer_identity)
        # through the asyncio wrapper (a shadow socket would swallow its FD edge events);
        # a heartbeat that cannot go out now is dropped: the peer's liveness counter copes
        fut = cast("asyncio.Future[Any]", sock.send_multipart(frames, flags=zmq.NOBLOCK))
        fut.add_done_callback(_retrieve)

    # ---------------------------------------------------------------- receiving
    async def recv(self, timeout_s: float) -> PeerMessage:
        """Next data message; raises PeerTimeout, or PeerDisconnected for a link event."""
        return await next_message(self._inbox, timeout_s)

    async def _read_loop(self, sock: zmq.asyncio.Socket) -> None:
        limit = self._bus.max_peer_header_bytes
        while True:
            frames = await sock.recv_multipart()
            identity = frames.pop(0) if self.role == "transmitter" else None
            if not frames or len(frames[0]) > limit:
                self._bad("header frame missing or over bus.max_peer_header_bytes")
                continue
            try:
                head = PeerHeader.model_validate_json(frames[0])
            except ValidationError as exc:
                self._bad(f"invalid header field {exc.errors()[0]['loc']}")
                continue
            if head.v != PROTOCOL_VERSION:
                self._bad(f"unsupported version {head.v}")
                continue
            bufs = frames[1:]
            if len(bufs) != len(head.buffers) or any(
                len(b) != m.nbytes for b, m in zip(bufs, head.buffers, strict=False)
            ):
                self._bad("buffer frames do not match header.buffers")
                continue
            self.liveness = self._bus.heartbeat_liveness
            if identity is not None:
                self._peer_identity = identity
            self._on_session(head)
            if head.kind == HELLO:
                if self.role == "transmitter":
                    self._send_control_nowait(HELLO)
                self._check_tail(head.seq)
                continue
            if head.kind == HEARTBEAT:
                self._check_tail(head.seq)
                continue
            if head.seq != self._recv_seq + 1:
                self._lost(head.seq)
            self._recv_seq = head.seq
            self.stats["received"] += 1
            msg = PeerMessage(head.kind, head.header, bufs, head.seq, head.buffers)
            await self._inbox.put(msg)

    def _on_session(self, head: PeerHeader) -> None:
        if head.session != self.peer_session:
            restarted = self.peer_session is not None
            self.peer_session = head.session
            # a new session starts where the peer is now: nothing of it can be lost yet
            control = head.kind in (HELLO, HEARTBEAT)
            self._recv_seq = head.seq if control else head.seq - 1
            if restarted:
                self.link_epoch += 1
                log.warning("bus.peer.restarted", peer_session=head.session)
                self._push(PeerDisconnected("restarted", "the peer restarted; abort the block"))
        if not self._connected.is_set():
            self._connected.set()
            log.info("bus.peer.connected", peer_session=head.session, role=self.role)

    def _check_tail(self, seq: int) -> None:
        if seq > self._recv_seq:
            self._lost(seq)
            self._recv_seq = seq

    def _lost(self, seq: int) -> None:
        self.stats["lost"] += 1
        self.link_epoch += 1
        log.warning("bus.peer.messages_lost", expected=self._recv_seq + 1, got=seq)
        self._push(
            PeerDisconnected(
                "lost",
                f"peer messages lost (received up to seq {self._recv_seq}, "
                f"the peer has sent seq {seq}); abort the block",
            )
        )

    def _bad(self, why: str) -> None:
        self.stats["bad"] += 1
        log.warning("bus.peer.bad_message", reason=why)

    # ---------------------------------------------------------------- liveness
    async def _heartbeat_loop(self) -> None:
        interval = self._bus.heartbeat_interval_s
        backoff = Backoff(interval, max(interval, self._bus.reconnect_max_s))
        while True:
            await asyncio.sleep(interval)
            self._send_control_nowait(HEARTBEAT)
            if self._inbox.full():
                self.liveness = self._bus.heartbeat_liveness  # data is flowing, we are slow
                continue
            self.liveness -= 1
            if self.liveness > 0:
                continue
            self._mark_down("no heartbeat")
            if self.role == "receiver":
                # Paranoid Pirate: new socket, after an exponentially growing pause
                await self._close_socket()
                await asyncio.sleep(backoff.next())
                self.reconnects += 1
                self._open_socket()
            self.liveness = self._bus.heartbeat_liveness
            if self.connected:
                backoff.reset()
