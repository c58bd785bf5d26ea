"""Pair coordination over the peer channel: the messages two nodes of a link exchange to
agree on what they are doing (calibrate, synchronize, exchange, stop) and on block numbers.

The transmitter coordinates: operator commands for the pair go to it, and it asks the
receiver to follow with a ``link.req`` message; the receiver answers ``link.rep`` with the
same request id once the step is done (or failed). Messages of the post-processing
protocol travel on the same channel under the ``pp.`` prefix and are authenticated by
:mod:`qkdnode.postproc`.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = structlog.get_logger(__name__)

LINK_PREFIX = "link."
PP_PREFIX = "pp."
#: messages between the key managers of two sites (qkdnode.kms)
KMS_PREFIX = "kms."

Step = Literal[
    "calibrate",
    "light",
    "sync",
    "sync_end",
    "exchange",
    "stop",
    "keysync",
    "notice",
    "activate",
    "release",
    "probe",
    "track",
    "polarization_window",
    "polarization_states",
    "halt",
    "state",
    "pass_end",
    "skip",
    "dark",
    "skip_end",
]


class LinkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rid: int = Field(ge=0)
    step: Step
    args: dict[str, Any] = Field(default_factory=dict)


class LinkReply(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rid: int = Field(ge=0)
    ok: bool
    error: str = ""
    result: dict[str, Any] = Field(default_factory=dict)


class LinkError(RuntimeError):
    """The peer refused or failed a coordination step, or did not answer in time."""


Send = Callable[[str, dict[str, Any]], Awaitable[None]]
Handler = Callable[[LinkRequest], Awaitable[dict[str, Any]]]


class LinkCoordinator:
    """Request/reply on top of the peer channel (either side may ask)."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[LinkReply]] = {}
        self.handler: Handler | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def request(self, step: Step, timeout_s: float, **args: Any) -> dict[str, Any]:
        """Ask the peer to perform ``step``; returns its result or raises LinkError."""
        rid = next(self._ids)
        fut: asyncio.Future[LinkReply] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            try:
                await self._send(
                    "link.req", LinkRequest(rid=rid, step=step, args=args).model_dump()
                )
            except Exception as exc:  # a peer channel that is down (PeerDisconnected), ...
                raise LinkError(f"cannot send {step!r} to the peer: {exc}") from exc
            async with asyncio.timeout(timeout_s):
                reply = await fut
        except TimeoutError:
            raise LinkError(f"peer did not complete {step!r} within {timeout_s:g} s") from None
        finally:
            self._pending.pop(rid, None)
        if not reply.ok:
            raise LinkError(f"peer refused {step!r}: {reply.error}")
        return reply.result

    def fail_pending(self, reason: str) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_result(LinkReply(rid=0, ok=False, error=reason))
        self._pending.clear()

    def on_message(self, kind: str, header: dict[str, Any]) -> None:
        """Feed one ``link.*`` message from the peer channel (never raises)."""
        try:
            if kind == "link.rep":
                rep = LinkReply.model_validate(header)
                fut = self._pending.get(rep.rid)
                if fut is not None and not fut.done():
                    fut.set_result(rep)
            elif kind == "link.req":
                req = LinkRequest.model_validate(header)
                task = asyncio.create_task(self._serve(req), name=f"link-{req.step}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                log.warning("link_unknown_message", kind=kind)
        except ValidationError as exc:
            log.warning("link_bad_message", kind=kind, errors=exc.error_count())

    async def _serve(self, req: LinkRequest) -> None:
        try:
            if self.handler is None:
                raise LinkError("node not ready")
            result = await self.handler(req)
            reply = LinkReply(rid=req.rid, ok=True, result=result)
        except asyncio.CancelledError:
            reply = LinkReply(rid=req.rid, ok=False, error="cancelled")
        except Exception as exc:
            reply = LinkReply(rid=req.rid, ok=False, error=str(exc) or type(exc).__name__)
        try:
            await self._send("link.rep", reply.model_dump())
        except Exception as exc:
            log.warning("link_reply_failed", step=req.step, error=str(exc))
