"""The control server in-process: allowlist, roles, states, content, handler errors."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from typing import Any

import pytest
from pydantic import BaseModel

from qkdnode.bus.commands import CallerInfo, CommandSpec, CommandTable
from qkdnode.bus.errors import CommandError
from qkdnode.client import BusTimeout, Client, RemoteError
from tests.bus.conftest import Keys


def test_ping_status_and_state_machine(start_inproc: Any) -> None:
    srv = start_inproc()
    with Client(srv.endpoint, timeout_s=3) as c:
        pong = c.call("ping")
        assert pong["pong"] is True and pong["state"] == "idle"
        assert pong["caller"] == {"name": "plaintext", "role": "operator"}
        assert c.call("status")["state"] == "idle"
        assert c.call("start") == {"state": "running"}
        assert c.call("status")["state"] == "running"
        keys = c.call("keys.get", number=3, size_bits=128)["keys"]
        assert len(keys) == 3 and all(len(base64.b64decode(k["key"])) == 16 for k in keys)
        assert len({k["key_ID"] for k in keys}) == 3


def test_state_refusal_names_state_and_allowed(start_inproc: Any) -> None:
    srv = start_inproc()
    with Client(srv.endpoint, timeout_s=3) as c, pytest.raises(RemoteError) as info:
        c.call("keys.get", number=1, size_bits=128)
    err = info.value
    assert err.code == "not_allowed_in_state"
    assert err.details["state"] == "idle" and err.details["allowed_states"] == ["running"]
    assert "'idle'" in err.message and "running" in err.message


def test_invalid_content_names_field(start_inproc: Any) -> None:
    srv = start_inproc()
    with Client(srv.endpoint, timeout_s=3) as c:
        c.call("start")
        cases: list[tuple[dict[str, Any], str]] = [
            ({"number": "3"}, "content.number"),
            ({"number": 1, "size_bits": 7}, "content.size_bits"),
            ({"nope": 1}, "content.nope"),
        ]
        for content, field in cases:
            with pytest.raises(RemoteError) as info:
                c.request("keys.get", content)
            assert info.value.code == "invalid_content"
            assert info.value.details["field"] == field


def test_unknown_command_and_bad_command_name(start_inproc: Any) -> None:
    srv = start_inproc()
    with Client(srv.endpoint, timeout_s=3) as c:
        with pytest.raises(RemoteError) as info:
            c.call("reboot")
        assert info.value.code == "unknown_command"
        with pytest.raises(RemoteError) as info:
            c.call("__import__")
        assert info.value.code == "bad_envelope" and info.value.details["field"] == "command"


def test_monitor_role_in_plaintext(start_inproc: Any) -> None:
    srv = start_inproc(plaintext_role="monitor")
    with Client(srv.endpoint, timeout_s=3) as c:
        assert c.call("status")["state"] == "idle"
        with pytest.raises(RemoteError) as info:
            c.call("start")
        assert info.value.code == "forbidden"
        assert info.value.details == {
            "field": "command",
            "required_role": "operator",
            "role": "monitor",
        }
        assert "requires role 'operator'" in info.value.message


def _table() -> tuple[CommandTable, threading.Event]:
    release = threading.Event()

    class Req(BaseModel):
        x: int

    async def boom(content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        raise RuntimeError("secret 0xdeadbeef must not leak")

    async def refuse(content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        raise CommandError("laser not ready", code="not_ready", details={"field": "laser"})

    async def notdict(content: dict[str, Any], caller: CallerInfo) -> Any:
        return [1, 2]

    async def nonjson(content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        return {"x": object()}

    async def slow(content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        while not release.is_set():
            await asyncio.sleep(0.01)
        return {"done": True}

    async def double(content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        return {"y": content["x"] * 2, "caller": caller.name}

    table = CommandTable(
        [
            CommandSpec("boom", boom, role="monitor"),
            CommandSpec("refuse", refuse, role="monitor"),
            CommandSpec("notdict", notdict, role="monitor"),  # type: ignore[arg-type]
            CommandSpec("nonjson", nonjson, role="monitor"),
            CommandSpec("slow", slow, role="monitor"),
            CommandSpec("double", double, role="monitor", request_model=Req),
            CommandSpec("status", double, role="monitor", request_model=Req),
        ]
    )
    return table, release


def test_handler_failures_become_replies(start_inproc: Any) -> None:
    table, release = _table()
    srv = start_inproc(table=table)
    with Client(srv.endpoint, timeout_s=3) as c:
        with pytest.raises(RemoteError) as info:
            c.call("boom")
        assert info.value.code == "internal" and "RuntimeError" in info.value.message
        assert "deadbeef" not in info.value.message + str(info.value.details)
        with pytest.raises(RemoteError) as info:
            c.call("refuse")
        assert info.value.to_dict() == {
            "code": "not_ready",
            "message": "laser not ready",
            "details": {"field": "laser"},
        }
        for name in ("notdict", "nonjson"):
            with pytest.raises(RemoteError) as info:
                c.call(name)
            assert info.value.code == "internal" and info.value.details["field"] == "content"
        assert c.call("double", x=21) == {"y": 42, "caller": "plaintext"}
    release.set()


def test_slow_command_does_not_block_others(start_inproc: Any) -> None:
    table, release = _table()
    srv = start_inproc(table=table)
    slow_client = Client(srv.endpoint, timeout_s=5)
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(slow_client.call("slow")))
    t.start()
    with Client(srv.endpoint, timeout_s=3) as c:
        for i in range(20):
            assert c.call("double", x=i)["y"] == 2 * i
        assert t.is_alive()  # still waiting for 'slow'
    release.set()
    t.join(5)
    assert result == {"done": True}
    slow_client.close()


def test_client_timeout_then_recovers(start_inproc: Any) -> None:
    table, release = _table()
    srv = start_inproc(table=table)
    with Client(srv.endpoint, timeout_s=0.3) as c:
        t0 = time.monotonic()
        with pytest.raises(BusTimeout):
            c.call("slow")
        assert 0.25 < time.monotonic() - t0 < 2
        release.set()
        time.sleep(0.1)  # the late reply goes to the replaced socket and is lost
        assert c.call("double", x=1)["y"] == 2
        assert c.reconnects == 1


def test_commands_lists_what_caller_may_call(start_inproc: Any, keys: Keys) -> None:
    srv = start_inproc(plaintext_role="monitor")
    with Client(srv.endpoint, timeout_s=3) as c:
        listed = {x["name"]: x for x in c.call("commands")["commands"]}
    assert {"ping", "snapshot", "status", "start", "keys.get"} <= set(listed)
    assert listed["status"]["callable"] is True and listed["start"]["callable"] is False
    assert listed["keys.get"]["allowed_states"] == ["running"]
    assert listed["keys.get"]["content_schema"]["properties"]["number"]["type"] == "integer"


def test_get_state_failure_is_survived(start_inproc: Any) -> None:
    table, _ = _table()

    async def any_(content: dict[str, Any], caller: CallerInfo) -> dict[str, Any]:
        return {}

    table.add(CommandSpec("guarded", any_, frozenset({"idle"}), "monitor"))
    srv = start_inproc(table=table)
    srv.server._get_state = lambda: 1 / 0
    with Client(srv.endpoint, timeout_s=3) as c, pytest.raises(RemoteError) as info:
        c.call("guarded")
    assert info.value.details["state"] == "unknown"
