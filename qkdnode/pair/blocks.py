"""Book-keeping of finished blocks: statistics, key store, the two-phase commit, QBER."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any, Literal

import structlog

from qkdnode.keystore.ids import ID_SEED_BYTES
from qkdnode.link import LinkError
from qkdnode.pair.core import SessionCore, _scalars, _slot_slip
from qkdnode.postproc.pipeline import BlockResult

log = structlog.get_logger(__name__)


class BlocksMixin(SessionCore):
    """Book-keeping of finished blocks: statistics, key store, the two-phase commit,
    QBER."""

    async def _finish_block(
        self, block_id: int, result: BlockResult, started: float, pulses: int
    ) -> None:
        """Book-keeping of one finished block: statistics, key store, telemetry, QBER watch.

        ``pulses`` is the number of slots the block's detections span (both nodes count
        the same: the receiver measures it and announces it with the block)."""
        from qkdnode.keystore.models import Provenance

        stats = self.node.stats
        block = result.stats
        block.pulses = pulses
        stats.sifted_bits += block.sifted_z + (block.sifted_x or 0)
        stats.pulses += pulses
        stats.detections += block.detections
        qber = block.qber_z if block.qber_z is not None else block.qber_x
        if qber is not None:
            stats.qber = qber
        stats.last_block = block.as_dict()
        auth_bits = max(block.auth_bits_sent, block.auth_bits_received)
        self.node.keyflow.block_finished(
            bool(result.ok), result.abort_reason, qber, auth_bits or None
        )
        if not result.ok and self.role == "transmitter" and _slot_slip(block):
            # Bits as random as coin flips: the slot clock slipped by whole slots (a clock
            # step of the receiver's tagger): every later block would abort the same way.
            message = (
                f"X-basis error rate {block.qber_x or 0.0:.3f} on {block.sifted_x or 0} "
                "bits: the slot alignment slipped (clock step?)"
            )
            log.warning("slot_alignment_lost", block_id=block_id, message=message)
            self.node.alarm("lock_lost", message)
            self.node.stats.synchronized = False
            self._detached(self._resynchronise(message))
        stored = False
        if result.ok:
            key = result.key_bytes
            size = self.cfg.keystore.key_size_bits
            if len(key) >= ID_SEED_BYTES + size // 8:
                prov = Provenance(
                    qber=qber or 0.0,
                    eps_sec=self.cfg.protocol.eps_sec,
                    eps_cor=self.cfg.protocol.eps_cor,
                )
                stored = await self._store_block(block_id, key, size, prov)
        if self.role == "receiver":
            self._block_event(block_id).set()
        else:
            await self._commit_pair(block_id, stored)
        if result.ok:
            stats.blocks_ok += 1
            stats.secret_bits += block.final_key_bits
        else:
            stats.blocks_aborted += 1
        stats.auth_key_balance_bits = self._auth_balance_bits()
        metrics = self.node.metrics
        if metrics is not None:
            qb: dict[str, float] = {}
            if block.qber_z is not None:
                qb["Z"] = block.qber_z
            if block.qber_x is not None:
                qb["X"] = block.qber_x
            stages = dict(block.seconds)
            metrics.observe_block(
                {
                    "outcome": "ok" if result.ok else "aborted",
                    "qber": qb or None,
                    "sifted_bits": block.sifted_z + (block.sifted_x or 0),
                    "secret_bits": block.final_key_bits,
                    "disclosed_bits": block.ec_disclosed_bits,
                    "duration_s": sum(stages.values()) or None,
                    "ec_efficiency": block.ec_efficiency,
                    "stage_durations_s": stages,
                }
            )
            metrics.set_auth_balance_bits(stats.auth_key_balance_bits)
        fields = {k: v for k, v in _scalars(block.as_dict()).items() if k != "block_id"}
        log.info("block_summary", ok=bool(result.ok), reason=result.abort_reason, **fields)
        self.node.publish("block", {"block_id": block_id, "ok": bool(result.ok), **fields})
        if self.role == "transmitter" and qber is not None:
            await self._watch_qber(qber)

    def _block_event(self, block_id: int) -> asyncio.Event:
        ev = self._blocks_done.get(block_id)
        if ev is None:
            ev = self._blocks_done[block_id] = asyncio.Event()
            for old in [b for b in self._blocks_done if b < block_id - 16]:
                del self._blocks_done[old]
        return ev

    async def _store_block(self, block_id: int, key: bytes, size: int, prov: Any) -> bool:
        """Add a block's keys as PENDING; False (block dropped, exchange goes on) when the
        store is full because consumers are not taking keys, or cannot be written (disk
        full, I/O error: alarm ``keystore_write_error``). The two-phase commit then
        discards the block on both nodes, so the stores stay identical."""
        from qkdnode.keystore import StoreFullError

        try:
            await asyncio.to_thread(self.keystore.add_block, block_id, key, size, prov)
        except StoreFullError as exc:
            self.node.stats.blocks_dropped += 1
            log.warning("block_dropped_keystore_full", block_id=block_id, error=str(exc))
            self.node.alarm("keystore_full", f"key store full, blocks dropped: {exc}")
            self._store_full = True
            return False
        except (sqlite3.Error, OSError) as exc:
            self.node.stats.blocks_dropped += 1
            log.error("block_not_stored", block_id=block_id, error=str(exc)[:200])
            self.node.alarm(
                "keystore_write_error", f"block {block_id} not stored: {str(exc)[:200]}"
            )
            return False
        if self._store_full:
            log.info("keystore_has_room_again", block_id=block_id)
        self._store_full = False
        self.node.alarms.clear("keystore_full", "a block was stored")
        self.node.alarms.clear("keystore_write_error", "a block was stored")
        return True

    async def _commit_pair(self, block_id: int, stored: bool) -> None:
        """Transmitter: two-phase commit of a block's keys with the receiver.

        Keys become AVAILABLE on a node only once both nodes hold them durably: the
        receiver commits first (it answers only after its own copy is on disk), then we
        do. A crash in between is repaired by the key-ID sync on reconnect.
        """
        step: Literal["commit", "discard"] = "commit" if stored else "discard"
        try:
            reply = await self.node.link.request(step, 60.0, block_id=block_id)
        except LinkError as exc:
            log.warning("block_commit_unconfirmed", block_id=block_id, error=str(exc))
            # Stays PENDING here, perhaps committed there: no key is served on either node
            # until the key-ID sync (retried every few seconds) has settled the block.
            if self.keys is not None:
                self.keys.out_of_step(f"block {block_id} commit unconfirmed")
            return
        if stored and reply.get("committed"):
            await asyncio.to_thread(self.keystore.commit_block, block_id)
            self.node.keyflow.block_committed()
        elif stored:
            await asyncio.to_thread(self.keystore.discard_block, block_id)
            log.warning("block_discarded_peer_has_no_key", block_id=block_id)

    async def _peer_commit(self, step: str, block_id: int) -> dict[str, Any]:
        """Receiver: commit or discard ``block_id`` once our side of it has finished."""
        async with asyncio.timeout(60.0):
            await self._block_event(block_id).wait()
        info = await asyncio.to_thread(self.keystore.block_provenance, block_id)
        if info is None:
            return {"committed": False}
        if step == "commit":
            await asyncio.to_thread(self.keystore.commit_block, block_id)
            self.node.keyflow.block_committed()
            return {"committed": True}
        await asyncio.to_thread(self.keystore.discard_block, block_id)
        return {"committed": False}
