"""The monitor endpoint (docs/protocol.md, "Monitor endpoint"): read-only snapshots
served by a thread, with the control socket's keys, roles and rate limit, never older
than ``bus.monitor_max_age_s``."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import zmq

from qkdnode.client import BusTimeout, Client, RemoteError
from tests.bus.conftest import LOOP, Keys, raw_dealer, recv_json


def _monitor(srv: Any) -> str:
    endpoint = srv.server.monitor_endpoint
    assert endpoint is not None
    return str(endpoint)


def test_status_from_the_monitor_endpoint_states_its_age(start_inproc: Any, keys: Keys) -> None:
    srv = start_inproc(curve=True, monitor_endpoint=LOOP, monitor_max_age_s=0.5)
    with Client(_monitor(srv), keys.server[0], keys.monitor, timeout_s=3) as mon:
        t0 = time.time()
        reply = mon.call("status")
        snap = reply.pop("snapshot")
        assert reply["state"] == "idle"
        assert set(reply) == {"state", "uptime_s", "calibrations", "pid"}
        assert 0.0 <= snap["age_s"] <= snap["max_age_s"] == 0.5
        assert t0 - 0.5 - 0.05 <= snap["taken_ts"] <= time.time()
        hb = mon.heartbeat()
        assert hb > 0


def test_operator_command_on_control_is_seen_by_the_next_monitor_status(
    start_inproc: Any, keys: Keys
) -> None:
    # a long bound: only the refresh after the operator command can show the change
    srv = start_inproc(curve=True, monitor_endpoint=LOOP, monitor_max_age_s=30.0)
    with (
        Client(srv.endpoint, keys.server[0], keys.operator, timeout_s=3) as op,
        Client(_monitor(srv), keys.server[0], keys.monitor, timeout_s=3) as mon,
    ):
        assert mon.call("status")["state"] == "idle"
        assert op.call("start")["state"] == "running"
        assert mon.call("status")["state"] == "running"


@pytest.mark.parametrize("who", ["monitor", "operator"])
def test_no_command_changes_the_node_through_the_monitor_endpoint(
    start_inproc: Any, keys: Keys, who: str
) -> None:
    srv = start_inproc(curve=True, monitor_endpoint=LOOP)
    key = keys.monitor if who == "monitor" else keys.operator
    with Client(_monitor(srv), keys.server[0], key, timeout_s=3) as c:
        for command in ("start", "stop", "calibrate", "keys.get", "ping", "no.such"):
            with pytest.raises(RemoteError) as info:
                c.call(command)
            assert info.value.code == "unknown_command", command
            assert info.value.details["served"] == ["status"]
    assert srv.lt.call(lambda: srv.node.state) == "idle"
    assert srv.lt.call(lambda: srv.node.calibrations) == 0


def test_unlisted_key_and_plaintext_client_get_nothing(start_inproc: Any, keys: Keys) -> None:
    srv = start_inproc(curve=True, monitor_endpoint=LOOP)
    with (
        Client(_monitor(srv), keys.server[0], keys.stranger, timeout_s=0.5) as c,
        pytest.raises(BusTimeout),
    ):
        c.call("status")
    sock = raw_dealer(_monitor(srv))
    request = json.dumps(
        {"v": 1, "id": "x", "type": "request", "ts": 0.0, "command": "status"}
    ).encode()
    try:
        sock.send_multipart([b"", request])
    except zmq.Again:
        pass  # handshake refused before the request could be queued: nothing as well
    else:
        assert not sock.poll(500)
    sock.close()
    assert srv.server._monitor.stats["messages"] == 0


def test_garbage_gets_structured_errors_and_the_thread_survives(
    start_inproc: Any, keys: Keys
) -> None:
    srv = start_inproc(curve=True, monitor_endpoint=LOOP)
    sock = raw_dealer(_monitor(srv), (keys.server[0], keys.monitor))
    try:
        cases: list[tuple[list[bytes], str]] = [
            ([b"", b"{not json"], "bad_json"),
            ([b"", b'{"v": 1, "v": 1}'], "bad_json"),
            ([b"", b"[1]"], "bad_envelope"),
            ([b"", b'{"v": 2, "id": "a", "type": "request", "ts": 0}'], "unsupported_version"),
            ([b"x", b"{}"], "bad_frames"),
            ([b"", b"{}", b"{}"], "bad_frames"),
            (
                [
                    b"",
                    b'{"v":1,"id":"a","type":"request","ts":0,"command":"status",'
                    b'"content":{"x":1}}',
                ],
                "invalid_content",
            ),
        ]
        for frames, code in cases:
            sock.send_multipart(frames)
            reply = recv_json(sock)
            assert reply["type"] == "error" and reply["error"]["code"] == code, frames
    finally:
        sock.close()
    with Client(_monitor(srv), keys.server[0], keys.monitor, timeout_s=3) as mon:
        assert mon.call("status")["state"] == "idle"


def test_a_snapshot_older_than_the_bound_is_refused(start_inproc: Any, keys: Keys) -> None:
    srv = start_inproc(curve=True, monitor_endpoint=LOOP, monitor_max_age_s=0.05)
    with Client(_monitor(srv), keys.server[0], keys.monitor, timeout_s=3) as mon:
        assert mon.call("status")["snapshot"]["age_s"] <= 0.05
        # the event loop is stuck (a long computation): it cannot re-take the snapshot
        srv.lt.loop.call_soon_threadsafe(time.sleep, 0.6)
        time.sleep(0.2)
        with pytest.raises(RemoteError) as info:
            mon.call("status")
        assert info.value.code == "not_ready"
        assert info.value.details["age_s"] > info.value.details["max_age_s"] == 0.05
        time.sleep(0.6)  # the loop is back: fresh snapshots again
        assert mon.call("status")["snapshot"]["age_s"] <= 0.05


def test_rate_limit_spans_both_sockets(start_inproc: Any, keys: Keys) -> None:
    srv = start_inproc(
        curve=True, monitor_endpoint=LOOP, client_rate_limit_per_s=5.0, monitor_max_age_s=30.0
    )
    with (
        Client(srv.endpoint, keys.server[0], keys.monitor, timeout_s=3) as ctl,
        Client(_monitor(srv), keys.server[0], keys.monitor, timeout_s=3) as mon,
    ):
        for _ in range(5):  # the burst, spent on the control socket
            ctl.call("status")
        with pytest.raises(RemoteError) as info:
            mon.call("status")
        assert info.value.code == "rate_limited"


def test_monitor_endpoint_stops_with_the_server(start_inproc: Any, keys: Keys) -> None:
    srv = start_inproc(curve=True, monitor_endpoint=LOOP)
    monitor = srv.server._monitor
    srv.lt.run(srv.server.stop())
    assert not monitor._thread.is_alive()
    with (
        Client(_monitor(srv), keys.server[0], keys.monitor, timeout_s=0.3) as mon,
        pytest.raises(BusTimeout),
    ):
        mon.call("status")
