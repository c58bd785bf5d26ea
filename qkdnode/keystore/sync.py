"""Key-ID synchronisation between the two nodes of a link: the pure message logic.

On (re)connection each node sends its :class:`SyncSummary` over the authenticated peer
channel, then applies ``reconcile(own, peer's)`` to its store. Both nodes compute the same
decisions from the same two summaries, so after both applied them they hold the same
keys under the same IDs:

- a block the peer does not hold at all is discarded;
- a block pending here and committed there is committed here; pending on both is
  discarded on both (neither side can have delivered from it);
- a key live here but no longer live there (lost, erased, discarded) is discarded here;
- keys the peer reports delivered are applied like a :class:`DeliveryNotice`
  (reserved for the pair, or erased when delivered on both nodes).
"""

from __future__ import annotations

from qkdnode.keystore.errors import LinkMismatchError
from qkdnode.keystore.models import ReconcileActions, SyncSummary


def reconcile(local: SyncSummary, remote: SyncSummary) -> ReconcileActions:
    """Actions the node that produced ``local`` must apply, given the peer's ``remote``."""
    if local.link_id != remote.link_id:
        raise LinkMismatchError(
            f"peer summary is for link {remote.link_id!r}, this node serves {local.link_id!r}"
        )
    if local.side == remote.side:
        raise LinkMismatchError(f"peer claims the same side {remote.side!r} as this node")
    remote_blocks = {b.block_id: b for b in remote.blocks}
    commit: list[int] = []
    discard: list[int] = []
    discard_keys: list[tuple[int, int]] = []
    for block in sorted(local.blocks, key=lambda b: b.block_id):
        peer = remote_blocks.get(block.block_id)
        if peer is None:
            discard.append(block.block_id)
            continue
        if not block.committed:
            if peer.committed:
                commit.append(block.block_id)
            else:
                discard.append(block.block_id)
                continue
        peer_live = set(peer.live_indices)
        discard_keys.extend(
            (block.block_id, i) for i in sorted(block.live_indices) if i not in peer_live
        )
    return ReconcileActions(
        commit_blocks=commit,
        discard_blocks=discard,
        discard_keys=discard_keys,
        peer_delivered=list(remote.delivered),
    )
