"""Key-ID synchronisation between the two nodes of a link: the pure message logic.

On (re)connection each node sends its :class:`SyncSummary` over the authenticated peer
channel, then applies ``reconcile(own, peer's)`` to its store. Both nodes compute the same
decisions from the same two summaries, so after both applied them they hold the same
keys under the same IDs, and no key whose delivery state is uncertain survives:

- a block the peer does not hold at all is discarded;
- a block pending here and committed there is committed here; pending on both is
  discarded on both (neither side can have delivered from it);
- a key live here but no longer live there (lost, erased, discarded) is discarded here;
- a key the peer erased as delivered at both ends is erased here as delivered;
- a key activated on one node and not issued on the other (a crash or a lost reply in the
  middle of an activation), or issued on one and not reserved nor delivered on the other,
  is erased on both: nobody can say whether its master SAE got it, so nobody serves it.

Rules for the caller: no activation may be under way on either node while the summaries
are taken and applied (the delivery service refuses key requests until the sync is done).
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
    l_issued, l_reserved, l_fetched = set(local.issued), set(local.reserved), set(local.fetched)
    r_issued, r_reserved, r_fetched = set(remote.issued), set(remote.reserved), set(remote.fetched)
    uncertain = (
        (r_reserved - l_issued)
        | (l_reserved - r_issued)
        | (l_issued - r_reserved - r_fetched)
        | (r_issued - l_reserved - l_fetched)
    )
    return ReconcileActions(
        commit_blocks=commit,
        discard_blocks=discard,
        discard_keys=discard_keys,
        erase_delivered=sorted(r_fetched),
        erase_uncertain=sorted(uncertain - r_fetched),
    )
