"""Two key services (the two KMEs of one link) joined by an in-memory peer channel.

The peer requests travel through two real :class:`qkdnode.link.LinkCoordinator` objects,
as JSON, exactly as between two daemons, but without sockets; a test can cut the channel
(``connected = False``: requests fail as if the peer were gone) or drop replies.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkdnode.delivery.keyservice import KeyService
from qkdnode.keystore.ids import ID_SEED_BYTES, link_id_for
from qkdnode.keystore.models import Provenance
from qkdnode.keystore.store import KeyStore
from qkdnode.link import LinkCoordinator, LinkError, LinkRequest

PROV = Provenance(qber=0.02, eps_sec=1e-10, eps_cor=1e-15)
LINK = link_id_for("alice", "bob")


@dataclass
class Kme:
    store: KeyStore
    service: KeyService
    link: LinkCoordinator
    side: str
    connected: bool = True
    drop_replies: set[str] = field(default_factory=set)


class KmePair:
    """``tx`` issues even keys, ``rx`` odd ones; ``add_blocks`` gives both the same keys."""

    def __init__(self, d: Path, *, key_ttl_s: float = 3600.0, activation_timeout_s: float = 1.0):
        self.kmes: dict[str, Kme] = {}
        for side in ("transmitter", "receiver"):
            store = KeyStore.open(
                d / f"{side}.sqlite", link_id=LINK, side=side, key_ttl_s=key_ttl_s
            )  # type: ignore[arg-type]
            kme_ref: list[Kme] = []

            def make_send(me: list[Kme]) -> Any:
                async def send(kind: str, header: dict[str, Any]) -> None:
                    this = me[0]
                    if not this.connected:
                        raise LinkError("peer channel down")
                    other = self.other(this)
                    if kind == "link.rep" and _step_of(this, header) in this.drop_replies:
                        return
                    other.link.on_message(kind, json.loads(json.dumps(header)))

                return send

            link = LinkCoordinator(make_send(kme_ref))
            service = KeyService(
                store,
                link.request,
                lambda ref=kme_ref: ref[0].connected,  # type: ignore[misc]
                activation_timeout_s=activation_timeout_s,
            )
            kme = Kme(store, service, link, side)
            kme_ref.append(kme)
            link.handler = self._handler(kme)
            self.kmes[side] = kme
        self.next_block = 0

    @property
    def tx(self) -> Kme:
        return self.kmes["transmitter"]

    @property
    def rx(self) -> Kme:
        return self.kmes["receiver"]

    def other(self, kme: Kme) -> Kme:
        return self.rx if kme is self.tx else self.tx

    def _handler(self, kme: Kme) -> Any:
        async def handle(req: LinkRequest) -> dict[str, Any]:
            kme._last_steps = getattr(kme, "_last_steps", {})  # type: ignore[attr-defined]
            kme._last_steps[req.rid] = req.step  # type: ignore[attr-defined]
            svc = kme.service
            if req.step == "activate":
                return await svc.serve_activate(req.args)
            if req.step == "release":
                return await svc.serve_release(req.args)
            if req.step == "notice":
                return await svc.serve_notice(req.args)
            if req.step == "keysync":
                return {"summary": (await svc.serve_sync(req.args)).model_dump(mode="json")}
            raise LinkError(f"unknown step {req.step}")

        return handle

    def add_blocks(self, n: int = 1, keys_per_block: int = 64, size_bits: int = 256) -> None:
        for _ in range(n):
            data = os.urandom(ID_SEED_BYTES + keys_per_block * size_bits // 8)
            b = self.next_block
            self.next_block += 1
            for kme in self.kmes.values():
                kme.store.add_block(b, data, size_bits, PROV)
            self.rx.store.commit_block(b)
            self.tx.store.commit_block(b)

    async def sync(self) -> None:
        await self.tx.service.sync()

    def close(self) -> None:
        for kme in self.kmes.values():
            kme.store.close()


def _step_of(kme: Kme, header: dict[str, Any]) -> str:
    steps: dict[int, str] = getattr(kme, "_last_steps", {})
    return steps.get(int(header.get("rid", -1)), "")


async def settle() -> None:
    """Let background notices and releases arrive."""
    for _ in range(20):
        await asyncio.sleep(0.01)
