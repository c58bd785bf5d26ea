"""asyncio control client: concurrent requests, heartbeats, reconnect with backoff."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import structlog
import zmq
import zmq.asyncio

from qkdnode.backoff import Backoff
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
from qkdnode.client.sync import DEFAULT_TIMEOUT_S

log = structlog.get_logger(__name__)


class AsyncClient:
    """asyncio twin of :class:`qkdnode.client.Client`.

    Many requests may be in flight at once (replies are matched by ``parent_id``). With
    ``heartbeat_interval_s`` set, an idle client sends heartbeats; after ``liveness``
    silent intervals it declares the server lost (``connected`` False), fails the
    requests in flight, and reconnects with exponential backoff (Paranoid Pirate).
    """

    def __init__(
        self,
        endpoint: str,
        server_public_key: KeyLike | None = None,
        client_keys: KeyPair | KeyLike | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        context: zmq.asyncio.Context | None = None,
        heartbeat_interval_s: float | None = None,
        liveness: int = 3,
        reconnect_max_s: float = 5.0,
        max_reply_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._server_key = server_key(server_public_key)
        self._keys = client_keypair(client_keys) if self._server_key is not None else None
        self._own_ctx = context is None
        self._ctx = context if context is not None else zmq.asyncio.Context()
        self._ids = IdMaker("a")
        self._pending: dict[str, asyncio.Future[ReplyEnvelope]] = {}
        self._sock: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._hb_task: asyncio.Task[None] | None = None
        self._hb_s = heartbeat_interval_s
        self.liveness_max = liveness
        self.liveness = liveness
        self._reconnect_max_s = reconnect_max_s
        self._max_reply = max_reply_bytes
        self._last_rx = time.monotonic()
        self.reconnects = 0
        self.connected = False
        self._closed = False

    async def __aenter__(self) -> AsyncClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        self._open_socket()
        if self._hb_s is not None and self._hb_task is None:
            self._hb_task = asyncio.create_task(self._heartbeat_loop(), name="client-heartbeat")

    def _open_socket(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        configure(sock, self._server_key, self._keys, self._max_reply, self._reconnect_max_s)
        connect(sock, self.endpoint)
        self._sock = sock
        self._reader = asyncio.create_task(self._read_loop(sock), name="client-reader")

    async def _close_socket(self, reason: str) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(BusError(f"connection to {self.endpoint} {reason}"))
        self._pending.clear()

    async def close(self) -> None:
        self._closed = True
        if self._hb_task is not None:
            self._hb_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._hb_task
            self._hb_task = None
        await self._close_socket("closed")
        if self._own_ctx:
            self._ctx.term()

    async def _read_loop(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            self._last_rx = time.monotonic()
            self.liveness = self.liveness_max
            self.connected = True
            if len(frames) != 2 or frames[0] != b"":
                continue
            try:
                env = parse_reply(frames[1])
            except ValueError:
                continue
            fut = self._pending.pop(env.parent_id or "", None)
            if fut is not None and not fut.done():
                fut.set_result(env)

    async def _heartbeat_loop(self) -> None:
        assert self._hb_s is not None
        backoff = Backoff(self._hb_s, max(self._hb_s, self._reconnect_max_s))
        while not self._closed:
            await asyncio.sleep(self._hb_s)
            if time.monotonic() - self._last_rx < self._hb_s:
                continue  # traffic seen recently: that is a heartbeat
            try:
                await self._exchange("heartbeat", None, {}, self._hb_s)
                backoff.reset()
            except (BusTimeout, BusError):
                self.liveness -= 1
                if self.liveness > 0:
                    continue
                self.connected = False
                delay = backoff.next()
                log.warning(
                    "bus.client.server_lost", endpoint=self.endpoint, retry_in_s=round(delay, 3)
                )
                await self._close_socket("lost (no heartbeat)")
                await asyncio.sleep(delay)
                self.reconnects += 1
                self.liveness = self.liveness_max
                self._open_socket()

    async def call(self, command: str, **content: Any) -> dict[str, Any]:
        return await self.request(command, content)

    async def request(
        self, command: str, content: dict[str, Any] | None = None, timeout_s: float | None = None
    ) -> dict[str, Any]:
        env = await self._exchange("request", command, content or {}, timeout_s)
        if env.type == "error":
            assert env.error is not None
            raise RemoteError(env.error.code, env.error.message, env.error.details)
        return env.content

    async def ping(self, timeout_s: float | None = None) -> dict[str, Any]:
        return await self.request("ping", {}, timeout_s)

    async def heartbeat(self, timeout_s: float | None = None) -> float:
        t0 = time.perf_counter()
        await self._exchange("heartbeat", None, {}, timeout_s)
        return time.perf_counter() - t0

    async def _exchange(
        self, mtype: str, command: str | None, content: dict[str, Any], timeout_s: float | None
    ) -> ReplyEnvelope:
        if self._sock is None:
            if self._closed:
                raise BusError("client is closed")
            await self.open()
        assert self._sock is not None
        msg_id = self._ids()
        fut: asyncio.Future[ReplyEnvelope] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(timeout):
                # the send is inside the deadline too: a DEALER whose server refused
                # the handshake has no peer to queue on and would wait forever
                await self._sock.send_multipart(
                    [b"", request_bytes(msg_id, command, content, mtype)]
                )
                return await fut
        except TimeoutError:
            raise BusTimeout(
                f"no reply to {command or mtype!r} from {self.endpoint} within {timeout:g} s"
            ) from None
        finally:
            self._pending.pop(msg_id, None)
