"""CURVE + ZAP: only listed client keys get in, each with its role."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import zmq

from qkdnode.bus.errors import BusError
from qkdnode.bus.zap import ZapHandler
from qkdnode.client import BusTimeout, Client, RemoteError, subscribe
from tests.bus.conftest import Keys, raw_dealer


def test_operator_and_monitor_roles(start_inproc: Any, keys: Keys) -> None:
    srv = start_inproc(curve=True)
    with Client(srv.endpoint, keys.server[0], keys.operator, timeout_s=3) as op:
        assert op.call("ping")["caller"] == {"name": "alice", "role": "operator"}
        assert op.call("start")["state"] == "running"
    with Client(srv.endpoint, keys.server[0], keys.monitor, timeout_s=3) as mon:
        assert mon.call("status")["state"] == "running"
        assert mon.call("snapshot")["seq"] >= 1
        for command in ("stop", "calibrate", "keys.get"):
            with pytest.raises(RemoteError) as info:
                mon.call(command)
            assert info.value.code == "forbidden"
            assert "client 'bob' has role 'monitor'" in info.value.message
        # refusal by role comes before content validation: no schema leaks to a monitor
        with pytest.raises(RemoteError) as info:
            mon.call("keys.get", number="bad")
        assert info.value.code == "forbidden"


def test_unlisted_key_gets_nothing(start_inproc: Any, keys: Keys) -> None:
    srv = start_inproc(curve=True)
    zap = ZapHandler._by_context[int(srv.ctx.underlying)]
    denied_before = zap.denied
    with (
        Client(srv.endpoint, keys.server[0], keys.stranger, timeout_s=0.5) as c,
        pytest.raises(BusTimeout),
    ):
        c.call("ping")
    assert zap.denied > denied_before
    # a throw-away key is refused the same way
    with Client(srv.endpoint, keys.server[0], None, timeout_s=0.5) as c, pytest.raises(BusTimeout):
        c.call("status")


def test_plaintext_client_gets_nothing_from_curve_server(start_inproc: Any) -> None:
    srv = start_inproc(curve=True)
    sock = raw_dealer(srv.endpoint)
    sock.send_multipart(
        [
            b"",
            json.dumps(
                {"v": 1, "id": "x", "type": "request", "ts": 0.0, "command": "ping"}
            ).encode(),
        ]
    )
    assert not sock.poll(500)
    sock.close()


def test_wrong_server_key_gets_nothing(start_inproc: Any, keys: Keys) -> None:
    srv = start_inproc(curve=True)
    with (
        Client(srv.endpoint, keys.stranger[0], keys.operator, timeout_s=0.5) as c,
        pytest.raises(BusTimeout),
    ):
        c.call("ping")


def test_curve_server_requires_secret_key(keys: Keys) -> None:
    import asyncio

    import zmq.asyncio

    from qkdnode.bus.commands import CommandTable
    from qkdnode.bus.control import ControlServer
    from qkdnode.config.sections import BusSection

    async def go() -> None:
        ctx = zmq.asyncio.Context()
        server = ControlServer(
            ctx,
            BusSection(control_endpoint="tcp://127.0.0.1:0"),
            CommandTable(),
            lambda: "idle",
            None,
        )
        with pytest.raises(BusError, match="server_secret_key_file"):
            await server.start()
        ctx.term()

    asyncio.run(go())


def test_plaintext_logs_a_warning(keys: Keys) -> None:
    import asyncio

    import structlog
    import zmq.asyncio

    from qkdnode.bus.commands import CommandTable
    from qkdnode.bus.control import ControlServer
    from qkdnode.config.sections import BusSection

    async def go() -> None:
        ctx = zmq.asyncio.Context()
        bus = BusSection(control_endpoint="tcp://127.0.0.1:0", allow_plaintext=True)
        server = ControlServer(ctx, bus, CommandTable(), lambda: "idle", None)
        with structlog.testing.capture_logs() as logs:
            await server.start()
        await server.stop()
        ctx.term()
        assert any(e["event"] == "bus.plaintext" and e["log_level"] == "warning" for e in logs)

    asyncio.run(go())


def test_telemetry_needs_a_listed_key(start_inproc: Any, keys: Keys) -> None:
    srv = start_inproc(curve=True)
    srv.lt.call(lambda: srv.pub.publish("alarm", {"level": "warning", "text": "test"}))
    with Client(srv.endpoint, keys.server[0], keys.monitor, timeout_s=3) as control:
        events = subscribe(
            srv.pub.endpoint, control, keys.server[0], keys.monitor, idle_timeout_s=2
        )
        first = next(events)
        assert (first.kind, first.topic, first.payload["text"]) == ("snapshot", "alarm", "test")
        events.close()
    # a stranger's SUB socket never receives anything (not even heartbeats)
    sub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    sub.linger = 0
    sub.curve_serverkey = keys.server[0]
    sub.curve_publickey, sub.curve_secretkey = keys.stranger
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(srv.pub.endpoint)
    deadline = time.monotonic() + 0.8
    while time.monotonic() < deadline:
        srv.lt.call(lambda: srv.pub.publish("alarm", {"n": 1}))
        assert not sub.poll(100)
    sub.close()
