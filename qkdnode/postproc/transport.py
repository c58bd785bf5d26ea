"""The peer transport contract of the post-processing protocol, and a ZeroMQ PAIR one.

A message is ``(kind, header, buffers)``: a short ASCII kind (``"sift"``, ``"ec_q"``...),
a JSON-serialisable header dict and a list of raw byte buffers (numpy arrays travel as
their bytes; the header says how to read them). The production peer channel
(:mod:`qkdnode.bus.peer`) implements :class:`PeerTransport`; :class:`ZmqPairTransport` is the
minimal implementation used by the tests and benchmarks of this package.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import zmq
import zmq.asyncio

Buffer = bytes | memoryview | np.ndarray


class TransportError(Exception):
    """The peer channel failed: timeout, closed socket or a malformed frame."""


class TransportTimeoutError(TransportError):
    """No message arrived within the timeout."""


@dataclass
class PeerMessage:
    kind: str
    header: dict[str, Any]
    buffers: list[bytes] = field(default_factory=list)

    def __repr__(self) -> str:  # buffers may hold secret-derived data: show sizes only
        sizes = [len(b) for b in self.buffers]
        return f"PeerMessage(kind={self.kind!r}, header_keys={sorted(self.header)}, sizes={sizes})"


@runtime_checkable
class PeerTransport(Protocol):
    """Ordered, reliable-when-it-works message channel to the peer node.

    ``send`` may raise :class:`TransportError`; ``recv`` raises
    :class:`TransportTimeoutError` after ``timeout_s`` seconds without a message.
    No authentication is expected here (see :class:`qkdnode.postproc.auth.AuthenticatedTransport`).
    """

    async def send(self, kind: str, header: dict[str, Any], buffers: Sequence[Buffer]) -> None: ...

    async def recv(self, timeout_s: float) -> PeerMessage: ...


def as_bytes(buf: Buffer) -> bytes | memoryview:
    """A bytes-like view of ``buf`` (numpy arrays are made contiguous first)."""
    if isinstance(buf, np.ndarray):
        return memoryview(np.ascontiguousarray(buf).data).cast("B")
    return buf


def encode_frames(kind: str, header: dict[str, Any], buffers: Sequence[Buffer]) -> list[Any]:
    return [
        kind.encode("ascii"),
        json.dumps(header, separators=(",", ":")).encode(),
        *[as_bytes(b) for b in buffers],
    ]


def decode_frames(frames: Sequence[bytes]) -> PeerMessage:
    """Parse ``[kind, json header, *buffers]``; raises :class:`TransportError` on garbage."""
    if len(frames) < 2:
        raise TransportError(f"malformed message: {len(frames)} frame(s), need at least 2")
    try:
        kind = bytes(frames[0]).decode("ascii")
        header = json.loads(bytes(frames[1]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise TransportError(f"malformed message header: {exc}") from None
    if not isinstance(header, dict):
        raise TransportError("malformed message header: not a JSON object")
    return PeerMessage(kind, header, [bytes(f) for f in frames[2:]])


class ZmqPairTransport:
    """A zmq PAIR socket: the transmitter binds, the receiver connects.

    Use :meth:`bind_random` (tests: ``tcp://127.0.0.1`` on a free port) or :meth:`connect`.
    """

    def __init__(self, socket: zmq.asyncio.Socket, endpoint: str) -> None:
        self._socket = socket
        # The same socket without the asyncio layer: a message that is already waiting is
        # taken without a future and an event-loop turn (~80 us of CPU each on the
        # reference machine; Cascade receives one per round trip and frame).
        self._now: zmq.Socket[bytes] = zmq.Socket.shadow(socket.underlying)
        self.endpoint = endpoint

    @classmethod
    def bind_random(
        cls, ctx: zmq.asyncio.Context, host: str = "tcp://127.0.0.1"
    ) -> ZmqPairTransport:
        sock = ctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 0)
        port = sock.bind_to_random_port(host)
        return cls(sock, f"{host}:{port}")

    @classmethod
    def connect(cls, ctx: zmq.asyncio.Context, endpoint: str) -> ZmqPairTransport:
        sock = ctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        return cls(sock, endpoint)

    async def send(self, kind: str, header: dict[str, Any], buffers: Sequence[Buffer]) -> None:
        frames = encode_frames(kind, header, buffers)
        # copy=True: a zero-copy send hands its buffer to pyzmq's garbage-collector thread,
        # which then competes for the GIL with the Cascade loop; copying even a 250 KB
        # query costs less.
        try:
            try:
                self._now.send_multipart(frames, zmq.NOBLOCK, copy=True)
            except zmq.Again:  # the peer's queue is full: wait on the event loop
                await self._socket.send_multipart(frames, copy=True)
        except zmq.ZMQError as exc:
            raise TransportError(f"send {kind!r} failed: {exc}") from None

    async def recv(self, timeout_s: float) -> PeerMessage:
        try:
            try:
                return decode_frames(self._now.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                pass
            if not await self._socket.poll(timeout=int(timeout_s * 1000)):
                raise TransportTimeoutError(f"no message from peer within {timeout_s} s")
            frames = await self._socket.recv_multipart(copy=True)
        except zmq.ZMQError as exc:
            raise TransportError(f"recv failed: {exc}") from None
        return decode_frames(frames)

    def close(self) -> None:
        self._socket.close(linger=0)
