"""Telemetry: sequence numbers, last-value snapshot, late joiners, gap detection."""

from __future__ import annotations

import itertools
import json
import threading
import time
from typing import Any

import pytest
import zmq

from qkdnode.bus.telemetry import HEARTBEAT_TOPIC
from qkdnode.client import Client, CloneState, TelemetryEvent, subscribe


def ev(topic: str, seq: int, **payload: Any) -> TelemetryEvent:
    return TelemetryEvent("delta", topic, seq, 0.0, payload)


def test_clone_state_snapshot_then_deltas_and_gaps() -> None:
    st = CloneState()
    assert st.on_message(ev("a", 5)) == [] and st.on_message(ev("b", 6)) == []  # buffered
    snap = {
        "seq": 5,
        "topics": {
            "a": {"seq": 5, "ts": 1.0, "payload": {"x": 1}},
            "s": {"seq": 2, "ts": 1.0, "payload": {"y": 2}},
        },
    }
    out = st.apply_snapshot(snap)
    assert [(e.kind, e.topic, e.seq) for e in out] == [
        ("snapshot", "s", 2),
        ("snapshot", "a", 5),
        ("delta", "b", 6),
    ]
    assert st.on_message(ev("a", 6)) == []  # duplicate, already seen
    assert [e.seq for e in st.on_message(ev("a", 7))] == [7]
    assert st.on_message(ev("a", 9)) == [] and st.needs_snapshot  # gap: 8 missing
    assert st.on_message(ev("a", 10)) == []
    out = st.apply_snapshot({"seq": 9, "topics": {"a": {"seq": 9, "ts": 2.0, "payload": {}}}})
    assert [(e.kind, e.seq) for e in out] == [("snapshot", 9), ("delta", 10)]
    assert st.resyncs == 2


def test_clone_state_heartbeat_reveals_lost_tail() -> None:
    st = CloneState()
    st.apply_snapshot({"seq": 3, "topics": {}})
    assert st.on_message(ev(HEARTBEAT_TOPIC, 3)) == [] and not st.needs_snapshot
    assert st.on_message(ev(HEARTBEAT_TOPIC, 4)) == [] and st.needs_snapshot


def test_publish_wire_format_and_snapshot(start_inproc: Any) -> None:
    srv = start_inproc()
    sub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    sub.linger = 0
    sub.setsockopt(zmq.SUBSCRIBE, b"rates.")
    sub.connect(srv.pub.endpoint)
    time.sleep(0.3)  # slow joiner: let the subscription reach the publisher
    seqs = [srv.lt.call(lambda i=i: srv.pub.publish("rates.count", {"hz": i})) for i in range(3)]
    srv.lt.call(lambda: srv.pub.publish("state", {"new": "x"}))
    assert seqs == [1, 2, 3]
    got: list[tuple[bytes, Any]] = []
    while len(got) < 3 and sub.poll(2000):
        topic, body = sub.recv_multipart()
        got.append((topic, json.loads(body)))
    assert [t for t, _ in got] == [b"rates.count"] * 3
    assert [b["seq"] for _, b in got] == [1, 2, 3]
    assert got[2][1]["payload"] == {"hz": 2} and got[2][1]["v"] == 1
    with Client(srv.endpoint, timeout_s=3) as c:
        snap = c.call("snapshot")
    assert snap["seq"] == 4
    assert snap["topics"]["rates.count"]["payload"] == {"hz": 2}
    assert snap["topics"]["state"]["seq"] == 4
    sub.close()
    with pytest.raises(ValueError, match="topic"):
        srv.pub.publish("Bad Topic", {})
    with pytest.raises(TypeError):
        srv.pub.publish("ok", [1])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        srv.pub.publish("ok", {"x": float("nan")})


def test_late_joiner_gets_snapshot_then_ordered_deltas(start_inproc: Any) -> None:
    srv = start_inproc()
    for i in range(50):
        srv.lt.call(lambda i=i: srv.pub.publish(f"t{i % 5}", {"i": i}))
    stop = threading.Event()

    def stream() -> None:
        i = 50
        while not stop.is_set():
            srv.lt.call(lambda i=i: srv.pub.publish(f"t{i % 5}", {"i": i}))
            i += 1
            time.sleep(0.002)

    th = threading.Thread(target=stream)
    th.start()
    try:
        with Client(srv.endpoint, timeout_s=3) as c:
            it = subscribe(srv.pub.endpoint, c, idle_timeout_s=2)
            events = [next(it) for _ in range(60)]
            it.close()
    finally:
        stop.set()
        th.join()
    snaps = [e for e in events if e.kind == "snapshot"]
    deltas = [e for e in events if e.kind == "delta"]
    assert {e.topic for e in snaps} == {f"t{i}" for i in range(5)}
    assert deltas, "no live deltas after the snapshot"
    # every delta follows the snapshot without holes, and values equal their sequence - 1
    seqs = [e.seq for e in deltas]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert seqs[0] == max(e.seq for e in snaps) + 1
    assert all(e.payload["i"] == e.seq - 1 for e in deltas)


def test_subscriber_reports_stale_when_publisher_silent(start_inproc: Any) -> None:
    srv = start_inproc()
    with Client(srv.endpoint, timeout_s=3) as c:
        it = subscribe("tcp://127.0.0.1:1", c, idle_timeout_s=0.3)  # nobody publishes there
        t0 = time.monotonic()
        first = next(it)
        assert first.kind == "stale" and 0.25 < time.monotonic() - t0 < 2
        it.close()


def test_resync_after_dropped_messages(start_inproc: Any) -> None:
    """Pause the subscriber while the publisher overruns its queue: the subscriber sees the
    gap and re-snapshots, ending with the publisher's latest values."""
    srv = start_inproc()
    with Client(srv.endpoint, timeout_s=3) as c:
        it = subscribe(srv.pub.endpoint, c, idle_timeout_s=5)
        srv.lt.call(lambda: srv.pub.publish("x", {"i": 0}))
        assert next(it).topic == "x"
        srv.lt.call(lambda: setattr(srv.pub._sock, "sndhwm", 10))
        n = 100_000
        srv.lt.call(lambda: [srv.pub.publish("x", {"i": i}) for i in range(1, n + 1)])
        events = []
        for e in it:
            events.append(e)
            if e.payload.get("i") == n:
                break
        it.close()
    assert events[-1].payload["i"] == n
    snapshots = [e for e in events if e.kind == "snapshot"]
    assert snapshots, "the gap was not detected (no re-snapshot)"
    for a, b in itertools.pairwise(events):
        if b.kind == "delta":  # deltas never skip: a hole always leads to a snapshot
            assert b.seq == a.seq + 1
