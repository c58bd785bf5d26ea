"""Book-keeping of finished blocks: statistics, the key store's landing of each block's
keys (the two-phase commit inside the block), QBER."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import numpy as np
import structlog

from qkdnode.keystore.ids import ID_SEED_BYTES
from qkdnode.pair.core import SessionCore, _scalars, _slot_slip
from qkdnode.postproc.blockstats import BlockStats
from qkdnode.postproc.pipeline import U8, BlockResult, KeyLanding

log = structlog.get_logger(__name__)


class PairLanding(KeyLanding):
    """Where this node's blocks' keys go (:class:`qkdnode.postproc.pipeline.KeyLanding`):
    the key store, pending, then committed or discarded within the block's last round
    trip. Keys become AVAILABLE on a node only once both nodes hold them durably: the
    receiver commits only when the transmitter said it stored them and its own copy is
    on disk; the transmitter commits on the receiver's word. A crash or a lost message in
    between leaves a pending copy that the key-ID sync settles (no key is served meanwhile).
    """

    def __init__(self, session: BlocksMixin) -> None:
        self.session = session

    async def store(self, block_id: int, key: U8, stats: BlockStats) -> bool:
        from qkdnode.keystore.models import Provenance

        s = self.session
        key_bytes = np.packbits(key).tobytes()
        size = s.cfg.keystore.key_size_bits
        if len(key_bytes) < ID_SEED_BYTES + size // 8:
            return False  # too short for one key and its ID seed: both sides agree
        qber = stats.qber_z if stats.qber_z is not None else stats.qber_x
        prov = Provenance(
            qber=qber or 0.0, eps_sec=s.cfg.protocol.eps_sec, eps_cor=s.cfg.protocol.eps_cor
        )
        return await s._store_block(block_id, key_bytes, size, prov)

    async def commit(self, block_id: int) -> bool:
        s = self.session
        try:
            await asyncio.to_thread(s.keystore.commit_block, block_id)
        except (sqlite3.Error, OSError) as exc:
            self._store_failed(block_id, "commit", exc)
            return False
        s.node.keyflow.block_committed()
        return True

    async def discard(self, block_id: int) -> None:
        try:
            await asyncio.to_thread(self.session.keystore.discard_block, block_id)
        except (sqlite3.Error, OSError) as exc:
            self._store_failed(block_id, "discard", exc)

    async def unconfirmed(self, block_id: int, why: str) -> None:
        log.warning("block_commit_unconfirmed", block_id=block_id, error=why[:200])
        keys = self.session.keys
        if keys is not None:
            keys.out_of_step(f"block {block_id} commit unconfirmed")

    def _store_failed(self, block_id: int, step: str, exc: BaseException) -> None:
        """A commit or discard the disk refused (full, I/O error): the block stays pending
        here, whatever the peer did; the key service goes out of step, so no key is served
        until the key-ID sync (retried every few seconds) has settled the block."""
        log.error(f"block_{step}_failed", block_id=block_id, error=str(exc)[:200])
        s = self.session
        s.node.alarm("keystore_write_error", f"block {block_id} {step} failed: {str(exc)[:200]}")
        if s.keys is not None:
            s.keys.out_of_step(f"block {block_id} {step} failed")


class BlocksMixin(SessionCore):
    """Book-keeping of finished blocks: statistics, key store, the two-phase commit,
    QBER."""

    async def _finish_block(
        self, block_id: int, result: BlockResult, started: float, pulses: int
    ) -> None:
        """Book-keeping of one finished block: statistics, telemetry, QBER watch (its keys
        went to the key store within the block, through :class:`PairLanding`).

        ``pulses`` is the number of slots the block's detections span (both nodes count
        the same: the receiver measures it and announces it with the block)."""
        stats = self.node.stats
        block = result.stats
        block.pulses = pulses
        stats.sifted_bits += block.sifted_z + (block.sifted_x or 0)
        stats.pulses += pulses
        stats.withheld_slots += block.withheld_slots or 0
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
        proto = self.cfg.protocol
        self.node.publish(
            "block",
            {
                "block_id": block_id,
                "ok": bool(result.ok),
                **fields,
                # the security parameters the block's keys carry as provenance
                "eps_sec": proto.eps_sec,
                "eps_cor": proto.eps_cor,
            },
        )
        if self.role == "transmitter" and qber is not None:
            await self._watch_qber(qber)

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
