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
    request = json.dumps(
        {"v": 1, "id": "x", "type": "request", "ts": 0.0, "command": "ping"}
    ).encode()
    try:
        sock.send_multipart([b"", request])
    except zmq.Again:
        # the server refused the handshake before the request was queued: the
        # DEALER has no peer left to send to, which is "nothing" as well
        pass
    else:
        assert not sock.poll(500)
    sock.close()


@pytest.mark.timeout(60)
def test_client_refused_by_curve_server_times_out_every_time(start_inproc: Any) -> None:
    """A plaintext client against a CURVE server: every call ends in BusTimeout.

    When the server refuses the handshake, libzmq may drop the client's only pipe;
    a send then has nowhere to queue and, without its own deadline, blocks forever
    (seen in CI as a hung ``qkdnode ctl``). Repeated because the drop is a race.
    """
    srv = start_inproc(curve=True)
    for attempt in range(8):
        with Client(srv.endpoint, None, None, timeout_s=0.3) as c:
            time.sleep(0.05 * (attempt % 4))  # let the refusal land before the send, sometimes
            t0 = time.monotonic()
            with pytest.raises(BusTimeout):
                c.call("ping")
            assert time.monotonic() - t0 < 2.0


@pytest.mark.timeout(60)
def test_async_client_refused_by_curve_server_times_out_every_time(start_inproc: Any) -> None:
    import asyncio

    from qkdnode.client import AsyncClient

    srv = start_inproc(curve=True)

    async def go() -> None:
        for attempt in range(8):
            client = AsyncClient(srv.endpoint, None, None, timeout_s=0.3)
            await client.open()
            try:
                await asyncio.sleep(0.05 * (attempt % 4))
                t0 = time.monotonic()
                with pytest.raises(BusTimeout):
                    await client.call("ping")
                assert time.monotonic() - t0 < 2.0
            finally:
                await client.close()

    asyncio.run(go())


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
