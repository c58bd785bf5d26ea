"""The key service of one node of a link: the delivery rules both KMEs enforce together.

It sits between the consumers (ETSI GS QKD 014 server, operator ``keys.get``) and the key
store, and talks to the peer node over the authenticated peer channel (``link.*``
requests, see docs/protocol.md):

- ``issue`` (enc_keys): picks keys, asks the peer to ``activate`` them for the master SAE
  and its slaves, and hands them out only after the peer has made the reservation durable
  and acknowledged it. A refusal puts the keys back; an unknown outcome (timeout, peer
  gone) erases them here and asks the peer to ``release`` them, and the key-ID sync erases
  them on both sides if that message is lost.
- ``claim`` (dec_keys): serves only keys activated for exactly that master and slave, then
  sends the issuer a delivery ``notice`` so it erases its copy.
- ``sync`` / ``serve_sync``: the key-ID synchronisation on every (re)connection. Until it
  has completed since this process started (or since the peer was lost), every key request
  is refused with :class:`NotInStepError` (ETSI: 503 with ``Retry-After``).

Failure modes: :class:`NotInStepError`, :class:`PeerUnavailableError` and
``KeysUnavailableError`` mean "retry later" (503); ``KeyRequestError`` means the request
itself is wrong (400). No method raises for the peer's message content: a malformed
message gets a refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import structlog
from pydantic import ValidationError

from qkdnode.keystore.errors import KeyStoreError, KeysUnavailableError
from qkdnode.keystore.models import (
    ActivationReply,
    ActivationRequest,
    DeliveredKey,
    DeliveryNotice,
    ReleaseRequest,
    SyncSummary,
)
from qkdnode.keystore.store import IssuedKey, KeyStore
from qkdnode.keystore.sync import reconcile
from qkdnode.link import LinkError, Step

log = structlog.get_logger(__name__)

#: how long the issuer waits for the peer's activation acknowledgement
ACTIVATION_TIMEOUT_S = 5.0
#: how long a key-ID sync may take before it is abandoned (and retried)
SYNC_TIMEOUT_S = 60.0
#: how long a sync waits for the activations under way to end
DRAIN_TIMEOUT_S = ACTIVATION_TIMEOUT_S + 5.0
#: seconds an SAE is told to wait when the service is not in step (ETSI Retry-After)
RETRY_AFTER_S = 2


class NotInStepError(KeyStoreError):
    """The key-ID sync with the peer has not completed yet: retry later (503)."""


class PeerUnavailableError(KeyStoreError):
    """The peer KME cannot confirm an activation now: retry later (503)."""


class PeerRequester(Protocol):
    """The peer channel's request/reply (``LinkCoordinator.request``): raises LinkError."""

    def __call__(self, step: Step, timeout_s: float, **args: Any) -> Awaitable[dict[str, Any]]: ...


class KeyService:
    """Delivery rules of one node. ``request`` reaches the peer; ``connected`` tells
    whether the peer channel is up. Store calls run in worker threads."""

    def __init__(
        self,
        store: KeyStore,
        request: PeerRequester,
        connected: Callable[[], bool],
        *,
        activation_timeout_s: float = ACTIVATION_TIMEOUT_S,
        peer_kme_id: str = "",
    ) -> None:
        self.store = store
        #: the peer's KME ID (ETSI status ``target_KME_ID``)
        self.peer_kme_id = peer_kme_id
        self._request = request
        self._connected = connected
        self.activation_timeout_s = activation_timeout_s
        self._in_step = False
        self._in_step_since: float | None = None
        self._issuing = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._sync_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        #: the block number the peer would use next, from the last sync's reply
        self.peer_next_block_id = 0

    # -- state ----------------------------------------------------------------------------
    @property
    def in_step(self) -> bool:
        """True once a key-ID sync with the peer completed and the peer was not lost since."""
        return self._in_step

    @property
    def max_key_count(self) -> int:
        return self.store.max_key_count

    async def stored_key_count(self, slave: str, size_bits: int) -> int:
        """Stored keys of at least ``size_bits`` this node may hand out (any slave: all
        are at the peer)."""
        return await asyncio.to_thread(self.store.available_for_enc, size_bits)

    def target_kme_id(self, slave: str) -> str:
        return self.peer_kme_id

    def peer_lost(self, reason: str) -> None:
        """The peer went away or restarted: refuse key requests until the next sync."""
        self.out_of_step(reason)

    def out_of_step(self, reason: str) -> None:
        """The two stores may disagree (peer lost, a block commit not confirmed): refuse key
        requests and activations until the next key-ID sync (the transmitter retries it
        every few seconds) has made them agree again."""
        if self._in_step:
            log.info("keyservice.out_of_step", reason=reason)
        self._in_step = False

    def _require_in_step(self) -> None:
        if not self._in_step:
            raise NotInStepError(
                "this KME is not in step with its peer yet (key-ID synchronisation pending)"
            )

    # -- issuer side (enc_keys) -------------------------------------------------------------
    async def issue(
        self, master: str, slaves: Sequence[str], number: int, size_bits: int
    ) -> list[DeliveredKey]:
        """Keys for ``master`` that ``slaves`` can fetch at the peer, after the peer
        confirmed the activation. Runs to its end even if the caller is cancelled (an
        activation is never left half done): the keys are then delivered to nobody."""
        self._require_in_step()
        if not self._connected():
            raise PeerUnavailableError("the peer KME is not reachable; retry later")
        # Counted as under way before the first await, so that a key-ID sync starting now
        # waits for this activation (it drains), and re-checked after the pick.
        self._issuing += 1
        self._idle.clear()
        try:
            issued = await asyncio.to_thread(self.store.pick_for_enc, number, size_bits)
        except BaseException:
            self._done_issuing()
            raise
        if not self._in_step:
            await asyncio.to_thread(self.store.abandon_issue, issued, erase=False)
            self._done_issuing()
            self._require_in_step()
        task = asyncio.create_task(self._activate(master, list(slaves), issued))
        try:
            return await asyncio.shield(task)
        finally:
            if not task.done():
                # The caller went away: let the activation finish, keys go to nobody.
                task.add_done_callback(_swallow)

    def _done_issuing(self) -> None:
        self._issuing -= 1
        if self._issuing == 0:
            self._idle.set()

    async def _activate(
        self, master: str, slaves: list[str], issued: list[IssuedKey]
    ) -> list[DeliveredKey]:
        try:
            try:
                req = self.store.activation_request(master, slaves, issued)
            except (ValueError, ValidationError):
                await asyncio.to_thread(self.store.abandon_issue, issued, erase=False)
                raise
            try:
                raw = await self._request(
                    "activate", self.activation_timeout_s, activation=req.model_dump(mode="json")
                )
                reply = ActivationReply.model_validate(raw)
            except (LinkError, ValidationError) as exc:
                # Unknown outcome: the peer may hold the reservation. Erase here, ask the
                # peer to erase; the key-ID sync repairs a lost release.
                await asyncio.to_thread(self.store.abandon_issue, issued, erase=True)
                self._spawn(self._release(self.store.release_request(issued)))
                log.warning("keyservice.activation_unconfirmed", error=str(exc)[:200])
                raise PeerUnavailableError(
                    "the peer KME did not confirm the key activation; retry later"
                ) from None
            if not reply.activated:
                await asyncio.to_thread(self.store.abandon_issue, issued, erase=False)
                log.warning(
                    "keyservice.activation_refused", refusal=reply.refusal, reason=reply.message
                )
                if reply.refusal == "not_in_step":
                    raise PeerUnavailableError("the peer KME is synchronising; retry later")
                raise KeysUnavailableError(f"the peer KME refused the keys: {reply.message}")
            return await asyncio.to_thread(self.store.confirm_issued, master, slaves, issued)
        finally:
            self._done_issuing()

    async def _release(self, req: ReleaseRequest) -> None:
        try:
            await self._request("release", 10.0, release=req.model_dump(mode="json"))
        except LinkError as exc:
            # The peer still reserves keys we erased: the stores disagree until a key-ID
            # sync, which being out of step makes the transmitter run within seconds
            # (a fault that keeps the peer connected, a disk error, would otherwise leave
            # them apart until the next reconnection).
            log.info("keyservice.release_deferred_to_sync", error=str(exc)[:200])
            self.out_of_step("a release did not reach the peer")

    # -- peer side (dec_keys) ---------------------------------------------------------------
    async def claim(
        self, master: str, slave: str, key_ids: Sequence[uuid.UUID]
    ) -> list[DeliveredKey]:
        """The keys ``key_ids`` for ``slave``, activated by the peer for ``master``."""
        self._require_in_step()
        claimed = await asyncio.to_thread(self.store.claim_keys, master, slave, key_ids)
        if claimed.completed:
            notice = self.store.delivery_notice(claimed.completed)
            self._spawn(self._notify(notice))
        return claimed.keys

    async def _notify(self, notice: DeliveryNotice) -> None:
        try:
            await self._request("notice", 10.0, notice=notice.model_dump(mode="json"))
        except LinkError as exc:  # the key-ID sync tells the issuer later
            log.info("keyservice.notice_deferred_to_sync", error=str(exc)[:200])

    # -- peer requests ----------------------------------------------------------------------
    async def serve_activate(self, args: dict[str, Any]) -> dict[str, Any]:
        try:
            req = ActivationRequest.model_validate(args.get("activation"))
        except ValidationError as exc:
            reply = ActivationReply(
                activated=False, refusal="bad_request", message=f"{exc.error_count()} errors"
            )
            return reply.model_dump(mode="json")
        if not self._in_step:
            reply = ActivationReply(
                activated=False, refusal="not_in_step", message="key-ID sync pending"
            )
        else:
            reply = await asyncio.to_thread(self.store.activate, req)
        return reply.model_dump(mode="json")

    async def serve_release(self, args: dict[str, Any]) -> dict[str, Any]:
        req = ReleaseRequest.model_validate(args.get("release"))
        return {"erased": await asyncio.to_thread(self.store.release, req)}

    async def serve_notice(self, args: dict[str, Any]) -> dict[str, Any]:
        notice = DeliveryNotice.model_validate(args.get("notice"))
        return {"erased": await asyncio.to_thread(self.store.apply_notice, notice)}

    # -- key-ID synchronisation ---------------------------------------------------------------
    async def _drain(self) -> None:
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                await self._idle.wait()
        except TimeoutError:
            raise LinkError("activations still under way; key-ID sync postponed") from None

    async def sync(self) -> SyncSummary:
        """Initiator (transmitter), on every (re)connection: exchange summaries with the
        peer, apply the reconciliation; in step afterwards. Returns the peer's summary.
        Raises LinkError (still out of step) if the peer does not answer."""
        async with self._sync_lock:
            self._in_step = False
            await self._drain()
            mine = await asyncio.to_thread(self.store.summary)
            reply = await self._request(
                "keysync", SYNC_TIMEOUT_S, summary=mine.model_dump(mode="json")
            )
            with contextlib.suppress(TypeError, ValueError):
                self.peer_next_block_id = max(0, int(reply.get("next_block_id", 0)))
            try:
                theirs = SyncSummary.model_validate(reply.get("summary"))
            except ValidationError as exc:
                raise LinkError(
                    f"bad key-ID summary from the peer: {exc.error_count()} errors"
                ) from None
            await asyncio.to_thread(self.store.apply_reconcile, reconcile(mine, theirs))
            self._mark_in_step()
            return theirs

    async def serve_sync(self, args: dict[str, Any]) -> SyncSummary:
        """Responder (receiver): apply the reconciliation with the peer's summary, answer
        with ours; in step afterwards."""
        theirs = SyncSummary.model_validate(args.get("summary"))
        async with self._sync_lock:
            self._in_step = False
            await self._drain()
            mine = await asyncio.to_thread(self.store.summary)
            await asyncio.to_thread(self.store.apply_reconcile, reconcile(mine, theirs))
            self._mark_in_step()
            return mine

    def _mark_in_step(self) -> None:
        self._in_step = True
        self._in_step_since = time.monotonic()
        log.info("keyservice.in_step", **self.store.counts())

    # -- helpers ----------------------------------------------------------------------------
    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def _swallow(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: the caller that wanted it is gone
