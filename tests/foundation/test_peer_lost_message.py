"""The peer channel's "messages lost" event says which sequence numbers disagree."""

from __future__ import annotations

import re

import zmq.asyncio

from qkdnode.bus.errors import PeerDisconnected
from qkdnode.bus.peer import PeerChannel
from qkdnode.config.sections import BusSection


def _lost_event(recv_seq: int, seen: int, *, heartbeat: bool) -> PeerDisconnected:
    ctx = zmq.asyncio.Context()
    try:
        bus = BusSection(
            control_endpoint="tcp://127.0.0.1:1",
            telemetry_endpoint="tcp://127.0.0.1:2",
            peer_endpoint="tcp://127.0.0.1:3",
            allow_plaintext=True,
        )
        ch = PeerChannel(ctx, bus, "receiver", None)
        ch._recv_seq = recv_seq
        if heartbeat:
            ch._check_tail(seen)  # a heartbeat carries the peer's last sent sequence number
        else:
            ch._lost(seen)  # a data message out of sequence
        item = ch._inbox.get_nowait()
    finally:
        ctx.destroy(linger=0)
    assert isinstance(item, PeerDisconnected) and item.reason == "lost"
    return item


def test_lost_tail_names_the_two_sequence_numbers() -> None:
    # We received up to 4; the peer's heartbeat says it sent 5: message 5 was lost. The
    # message used to read "expected 5, got 5".
    text = str(_lost_event(4, 5, heartbeat=True))
    numbers = [int(n) for n in re.findall(r"\d+", text)]
    assert numbers == [4, 5], text
    assert "received up to seq 4" in text and "sent seq 5" in text


def test_gap_in_data_messages() -> None:
    text = str(_lost_event(4, 7, heartbeat=False))
    assert "received up to seq 4" in text and "sent seq 7" in text and "abort the block" in text
