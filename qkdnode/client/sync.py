"""Blocking control client (Lazy Pirate: on timeout the socket is replaced)."""

from __future__ import annotations

import time
from typing import Any

import zmq

from qkdnode.bus.envelope import IdMaker, ReplyEnvelope, parse_reply, request_bytes
from qkdnode.bus.errors import BusError, BusTimeout, RemoteError
from qkdnode.client._common import (
    KeyLike,
    KeyPair,
    client_keypair,
    configure,
    connect,
    server_key,
)

DEFAULT_TIMEOUT_S = 5.0
# plain ints, set only when they change: ``sock.rcvtimeo = x`` goes through pyzmq's
# attribute look-up, which cost more per request than the rest of the client's work
_SNDTIMEO = int(zmq.SNDTIMEO)
_RCVTIMEO = int(zmq.RCVTIMEO)
_SNDMORE = int(zmq.SNDMORE)
_RCVMORE = int(zmq.RCVMORE)


class Client:
    """Blocking client of a node's control socket.

    ``server_public_key`` (Z85 or ``.pub`` path) enables CURVE; ``client_keys`` is
    ``(public, secret)`` or a secret key file; if omitted a throw-away pair is made, which
    a daemon refuses (only keys listed in its ``bus.clients`` get in).
    Not thread-safe: one client per thread.
    """

    def __init__(
        self,
        endpoint: str,
        server_public_key: KeyLike | None = None,
        client_keys: KeyPair | KeyLike | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        context: zmq.Context[Any] | None = None,
        max_reply_bytes: int = 64 * 1024 * 1024,
        reconnect_max_s: float = 5.0,
    ) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._server_key = server_key(server_public_key)
        self._keys = client_keypair(client_keys) if self._server_key is not None else None
        self._own_ctx = context is None
        self._ctx: zmq.Context[Any] = context if context is not None else zmq.Context()
        self._max_reply = max_reply_bytes
        self._reconnect_max_s = reconnect_max_s
        self._ids = IdMaker("c")
        self._sock: zmq.Socket[bytes] | None = None
        self._timeo_ms: dict[int, int] = {}  # the socket's send/receive timeouts as set
        self.reconnects = 0
        try:
            self._open()
        except ValueError:  # a malformed endpoint: nothing is left open
            if self._own_ctx:
                self._ctx.term()
            raise

    def _open(self) -> None:
        sock: zmq.Socket[bytes] = self._ctx.socket(zmq.DEALER)
        configure(sock, self._server_key, self._keys, self._max_reply, self._reconnect_max_s)
        connect(sock, self.endpoint)
        self._sock = sock
        self._timeo_ms = {}

    def _set_timeout(self, sock: zmq.Socket[bytes], option: int, ms: int) -> None:
        if self._timeo_ms.get(option) != ms:
            sock.setsockopt(option, ms)
            self._timeo_ms[option] = ms

    def _reopen(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self.reconnects += 1
        self._open()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ requests
    def call(self, command: str, **content: Any) -> dict[str, Any]:
        """Run ``command`` with keyword ``content``; return the reply content.

        Raises :class:`RemoteError` (code, message, details) on an error reply and
        :class:`BusTimeout` when no reply arrives within ``timeout_s``.
        """
        return self.request(command, content)

    def request(
        self, command: str, content: dict[str, Any] | None = None, timeout_s: float | None = None
    ) -> dict[str, Any]:
        env = self._exchange("request", command, content or {}, timeout_s)
        if env.type == "error":
            assert env.error is not None
            raise RemoteError(env.error.code, env.error.message, env.error.details)
        return env.content

    def heartbeat(self, timeout_s: float | None = None) -> float:
        """Send a heartbeat; return the round-trip time in seconds."""
        t0 = time.perf_counter()
        env = self._exchange("heartbeat", None, {}, timeout_s)
        if env.type == "error":
            assert env.error is not None
            raise RemoteError(env.error.code, env.error.message, env.error.details)
        return time.perf_counter() - t0

    def ping(self, timeout_s: float | None = None) -> dict[str, Any]:
        return self.request("ping", {}, timeout_s)

    def _exchange(
        self, mtype: str, command: str | None, content: dict[str, Any], timeout_s: float | None
    ) -> ReplyEnvelope:
        if self._sock is None:
            raise BusError("client is closed")
        msg_id = self._ids()
        sock = self._sock
        wait_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + wait_s
        # a DEALER whose server refused the handshake has no peer to queue on:
        # without a send timeout the request would block forever
        self._set_timeout(sock, _SNDTIMEO, max(1, int(wait_s * 1000)))
        try:
            body = request_bytes(msg_id, command, content, mtype)
            sock.send(b"", _SNDMORE)  # the two frames by hand: send_multipart's checks
            sock.send(body)  # and flag enums cost more than the sends themselves
        except zmq.Again:
            self._reopen()
            raise BusTimeout(
                f"no reply to {command or mtype!r} from {self.endpoint} within {wait_s:g} s "
                "(the request could not even be queued: no server accepted the connection)"
            ) from None
        while True:
            # a receive timeout, not sock.poll(): poll builds a Poller per call, which cost
            # more than the rest of the client's work per request
            self._set_timeout(sock, _RCVTIMEO, int(max(0.0, deadline - time.monotonic()) * 1000))
            try:
                frames = [sock.recv()]
            except zmq.Again:
                self._reopen()  # a late reply must not be mistaken for the next one
                raise BusTimeout(
                    f"no reply to {command or mtype!r} from {self.endpoint} within {wait_s:g} s"
                ) from None
            while sock.getsockopt(_RCVMORE):  # the rest of a message is there already
                frames.append(sock.recv())
            if len(frames) != 2 or frames[0] != b"":
                continue  # not a control reply; ignore
            try:
                env = parse_reply(frames[1])
            except ValueError:
                continue
            if env.parent_id == msg_id:
                return env
            if env.parent_id is None and env.type == "error":
                return env  # the server could not even read our id
            # stale reply to an earlier, timed-out request: drop
