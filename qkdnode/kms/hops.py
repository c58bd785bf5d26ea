"""Request and reply between the key managers of two neighbouring sites, over one link.

A :class:`HopChannel` numbers its requests (``rid``), matches replies, tags what must be
tagged and checks the tags of what arrives (:mod:`qkdnode.kms.hopauth`). Tag keys come
from the link's store: the sender draws 256 bits of its own side's key and erases them
before the message leaves; the receiver erases the named keys as it verifies. What a
message costs is counted per link and direction (:class:`LinkAccount`).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import BaseModel, ValidationError

from qkdnode.keystore.errors import KeyStoreError
from qkdnode.keystore.models import EraseReason
from qkdnode.kms import hopauth
from qkdnode.kms.ports import LinkPort
from qkdnode.kms.wire import ADV, REP, REQ, Advert, Failure, HopTag, KmsReply, KmsRequest

log = structlog.get_logger(__name__)


class HopError(RuntimeError):
    """A message could not be sent, or its reply did not come, or did not verify.
    ``failure`` is the :data:`qkdnode.kms.wire.Failure` it amounts to."""

    def __init__(self, failure: Failure, message: str) -> None:
        super().__init__(message)
        self.failure = failure


@dataclass(frozen=True)
class Reply:
    """A reply as it arrived: the model, the header as sent (what its tag covers) and
    its buffers."""

    model: KmsReply
    raw: dict[str, Any]
    buffers: list[bytes]


@dataclass
class LinkAccount:
    """Key of one link this site consumed for the key manager, in bits: ``relay_*`` (the
    relayed keys and their pads), ``auth_*`` (tag keys); ``out`` drawn by this site to
    send, ``in`` named by the peer site and erased here."""

    relay_out: int = 0
    relay_in: int = 0
    auth_out: int = 0
    auth_in: int = 0
    tags_refused: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


#: handles a verified request: returns the reply's body and buffers
RequestHandler = Callable[
    ["HopChannel", KmsRequest, list[bytes]], Awaitable[tuple[BaseModel, list[bytes]]]
]
AdvertHandler = Callable[["HopChannel", Advert], None]


class HopChannel:
    """The key managers' conversation over one link (``port``), for site ``me``."""

    def __init__(
        self,
        me: str,
        port: LinkPort,
        on_request: RequestHandler,
        on_advert: AdvertHandler,
    ) -> None:
        self.me = me
        self.port = port
        self.account = LinkAccount()
        self._on_request = on_request
        self._on_advert = on_advert
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        port.attach(self._on_message, self._on_lost)

    @property
    def link_id(self) -> str:
        return self.port.link_id

    @property
    def peer(self) -> str:
        return self.port.peer_site

    # -- tags ---------------------------------------------------------------------------

    async def _sign(self, kind: str, header: dict[str, Any], buffers: Sequence[bytes]) -> HopTag:
        store = self.port.store()
        if store is None:
            raise HopError("no_key", f"link {self.link_id}: key store not open")
        try:
            parts = await asyncio.to_thread(
                store.consume_own, hopauth.TAG_KEY_BITS, EraseReason.AUTHENTICATION
            )
        except KeyStoreError as exc:
            raise HopError("no_key", f"link {self.link_id}: no key for a tag: {exc}") from None
        key = b"".join(k for _, k in parts)
        self.account.auth_out += len(key) * 8
        msg = hopauth.canonical(self.link_id, self.me, kind, header, buffers)
        return HopTag(key_ids=[kid for kid, _ in parts], tag=hopauth.tag(key, msg).hex())

    async def _verify(
        self, kind: str, header: dict[str, Any], buffers: Sequence[bytes], auth: HopTag | None
    ) -> bool:
        """Whether ``auth`` is a good tag of the peer's message (erasing its key)."""
        store = self.port.store()
        if auth is None or store is None:
            return False
        try:
            key = await asyncio.to_thread(
                store.consume_named, auth.key_ids, EraseReason.AUTHENTICATION
            )
        except KeyStoreError as exc:
            log.warning("kms.tag_key_unknown", link=self.link_id, error=str(exc)[:200])
            self.account.tags_refused += 1
            return False
        self.account.auth_in += len(key) * 8
        msg = hopauth.canonical(self.link_id, self.peer, kind, header, buffers)
        ok = hopauth.verify(key, msg, bytes.fromhex(auth.tag))
        if not ok:
            self.account.tags_refused += 1
            log.warning("kms.tag_refused", link=self.link_id, kind=kind)
        return ok

    # -- requests -------------------------------------------------------------------------

    async def request(
        self, body: BaseModel, buffers: Sequence[bytes], timeout_s: float, *, tagged: bool = True
    ) -> Reply:
        """Send ``body`` (tagged unless ``tagged`` is False) and wait for the reply.

        Raises :class:`HopError`: ``no_key`` (no key for the tag), ``link_down`` (the
        channel is down), ``timeout``. The reply's tag is checked by the caller
        (:meth:`verified`), which knows whether the reply needs one."""
        rid = next(self._ids)
        header: dict[str, Any] = {"rid": rid, "body": body.model_dump(mode="json")}
        if tagged:
            header["auth"] = (await self._sign(REQ, header, buffers)).model_dump(mode="json")
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            try:
                await self.port.send(REQ, header, list(buffers))
            except Exception as exc:
                raise HopError("link_down", f"link {self.link_id}: cannot send: {exc}") from None
            async with asyncio.timeout(timeout_s):
                return await fut
        except TimeoutError:
            raise HopError(
                "timeout", f"site {self.peer} did not answer within {timeout_s:.1f} s"
            ) from None
        finally:
            self._pending.pop(rid, None)

    async def verified(self, reply: Reply) -> bool:
        """Whether ``reply`` carries a good tag of the peer (its key is erased)."""
        unsigned = {k: v for k, v in reply.raw.items() if k != "auth"}
        return await self._verify(REP, unsigned, reply.buffers, reply.model.auth)

    async def advertise(self, advert: Advert) -> None:
        """Send a link-state advert (CURVE only: it steers routes, never keys)."""
        await self.port.send(ADV, {"body": advert.model_dump(mode="json")}, [])

    # -- incoming ------------------------------------------------------------------------

    def _on_message(self, kind: str, header: dict[str, Any], buffers: list[bytes]) -> None:
        try:
            if kind == REP:
                reply = KmsReply.model_validate(header)
                fut = self._pending.get(reply.rid)
                if fut is not None and not fut.done():
                    fut.set_result(Reply(reply, header, buffers))
            elif kind == REQ:
                req = KmsRequest.model_validate(header)
                task = asyncio.create_task(self._serve(req, header, buffers), name="kms-request")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif kind == ADV:
                self._on_advert(self, Advert.model_validate(header.get("body")))
            else:
                log.warning("kms.unknown_message", link=self.link_id, kind=kind[:64])
        except ValidationError as exc:
            log.warning(
                "kms.bad_message",
                link=self.link_id,
                kind=kind[:64],
                errors=exc.error_count(),
                first=str(exc.errors(include_input=False, include_url=False)[0]["loc"]),
            )

    def _on_lost(self, reason: str) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(HopError("link_down", f"link {self.link_id}: {reason}"))
        self._pending.clear()

    async def _serve(self, req: KmsRequest, raw: dict[str, Any], buffers: list[bytes]) -> None:
        unsigned = {k: v for k, v in raw.items() if k != "auth"}
        try:
            if req.auth is not None and not await self._verify(REQ, unsigned, buffers, req.auth):
                raise HopError("refused", "the request's tag does not verify")
            if req.auth is None and req.body.op == "relay":
                raise HopError("refused", "a relay must carry a tag")
            body, out = await self._on_request(self, req, buffers)
            reply: dict[str, Any] = {"rid": req.rid, "body": body.model_dump(mode="json")}
        except HopError as exc:
            reply = {"rid": req.rid, "error": f"{exc.failure}: {exc}"[:512]}
            out = []
        except Exception as exc:  # never let a peer's message kill the manager
            log.exception("kms.request_failed", link=self.link_id, error=str(exc)[:200])
            reply = {"rid": req.rid, "error": f"refused: {type(exc).__name__}"}
            out = []
        try:
            if reply.get("body", {}).get("stored"):
                # only a success must be believed: it is tagged (a failure can only
                # make the origin give up, which it may do anyway)
                reply["auth"] = (await self._sign(REP, reply, out)).model_dump(mode="json")
            await self.port.send(REP, reply, out)
        except Exception as exc:
            log.warning("kms.reply_failed", link=self.link_id, error=str(exc)[:200])

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._on_lost("key manager stopped")


def new_relay_id() -> uuid.UUID:
    return uuid.uuid4()
