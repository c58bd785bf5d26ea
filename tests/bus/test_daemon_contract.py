"""The daemon's real command table over a real control socket: every command refuses
content with wrong types, missing fields and unknown fields with ``invalid_content``
naming the field; the schemas published by ``commands`` are strict and never null.

One transmitter daemon runs as a subprocess (simulated link, plaintext bus with
``plaintext_role = "operator"`` as in configs/transmitter.sim.toml). Without a receiver
it stays in CONNECTING, where every command's content is still checked: the content
check comes before the state check.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qkdnode.bus.commands import KEYS_GET_MAX_NUMBER, KEYS_GET_MAX_SIZE_BITS
from qkdnode.bus.errors import ErrorCode
from qkdnode.client import Client, RemoteError
from qkdnode.config.sections import BusSection
from qkdnode.node_commands import NodeCommands
from tests.bus.conftest import daemon_specs, sim_node, spawn_devserver
from tests.daemon.conftest import Daemon, free_port, node_config, start_daemon

#: One value of each JSON type; a value is wrong for a field unless its type is allowed.
SAMPLES: dict[str, Any] = {
    "string": "1",
    "integer": 1,
    "number": 1.5,
    "boolean": True,
    "array": [1],
    "object": {"a": 1},
    "null": None,
}
EXTRA_FIELD = "unexpected_field"


@dataclass
class Live:
    endpoint: str
    daemon: Daemon


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("daemon")
    names = [
        "transmitter_control",
        "transmitter_telemetry",
        "receiver_control",
        "receiver_telemetry",
        "peer",
        "fiber",
    ]
    ports = {n: free_port() for n in names}
    daemon = start_daemon(node_config(tmp, "transmitter", ports), tmp / "node.log")
    try:
        daemon.wait_event("daemon_ready", 90)
        yield Live(f"tcp://127.0.0.1:{ports['transmitter_control']}", daemon)
    finally:
        try:
            daemon.stop(signal.SIGTERM, 30)
        except subprocess.TimeoutExpired:
            daemon.proc.kill()
            daemon.proc.wait(10)


@pytest.fixture(scope="module")
def client(live: Live) -> Iterator[Client]:
    with Client(live.endpoint, timeout_s=10) as c:
        yield c


def refusal(c: Client, command: str, content: Any) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        c.request(command, content)
    return info.value


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string" if isinstance(value, str) else "object"


def allowed_types(prop: dict[str, Any]) -> set[str]:
    types: set[str] = set()
    for alt in prop.get("anyOf", [prop]):
        if "type" in alt:
            types.add(alt["type"])
        for value in alt.get("enum", []):
            types.add(json_type(value))
        if "const" in alt:
            types.add(json_type(alt["const"]))
    if "number" in types:
        types.add("integer")
    return types


def wrong_values(prop: dict[str, Any]) -> list[Any]:
    allowed = allowed_types(prop)
    assert allowed, f"property without a type: {prop}"
    return [v for t, v in SAMPLES.items() if t not in allowed]


def test_commands_publishes_the_daemon_table_with_strict_schemas(
    client: Client, tmp_path: Path
) -> None:
    listed = {c["name"]: c for c in client.call("commands")["commands"]}
    expected = {spec.name for spec in daemon_specs(tmp_path)}
    assert set(listed) == expected
    assert {"ping", "commands", "snapshot", "status", "keys.get", "sim.inject"} <= expected
    codes = {str(c) for c in ErrorCode}
    for name, entry in listed.items():
        schema = entry["content_schema"]
        assert isinstance(schema, dict), name
        assert schema["type"] == "object" and schema["additionalProperties"] is False, name
        assert set(entry["errors"]) <= codes, name
        if schema.get("required"):
            assert schema.get("examples"), f"{name}: required fields but no example"
    assert listed["keys.digest"]["role"] == "operator"
    assert listed["status"]["content_schema"]["properties"] == {}
    number = listed["keys.get"]["content_schema"]["properties"]["number"]
    assert (number["type"], number["minimum"], number["maximum"]) == ("integer", 1, 1024)


def test_every_command_refuses_bad_content_naming_the_field(client: Client) -> None:
    """Wrong types, missing required fields and unknown fields, for every command the
    daemon lists: always ``invalid_content`` with ``details.field`` = the field."""
    counts = {"commands": 0, "unknown": 0, "missing": 0, "wrong_type": 0}
    for entry in client.call("commands")["commands"]:
        name, schema = entry["name"], entry["content_schema"]
        counts["commands"] += 1
        base: dict[str, Any] = dict(schema.get("examples", [{}])[0])

        err = refusal(client, name, {**base, EXTRA_FIELD: 1})
        assert (err.code, err.details["field"]) == ("invalid_content", f"content.{EXTRA_FIELD}")
        assert [e["type"] for e in err.details["errors"]] == ["extra_forbidden"]
        assert EXTRA_FIELD in err.message
        counts["unknown"] += 1

        for field in schema.get("required", []):
            content = {k: v for k, v in base.items() if k != field}
            err = refusal(client, name, content)
            assert (err.code, err.details["field"]) == ("invalid_content", f"content.{field}")
            assert err.details["errors"][0]["type"] == "missing"
            counts["missing"] += 1

        for field, prop in schema["properties"].items():
            for value in wrong_values(prop):
                err = refusal(client, name, {**base, field: value})
                assert err.code == "invalid_content", (name, field, value)
                assert err.details["field"] == f"content.{field}", (name, field, value)
                counts["wrong_type"] += 1
    assert counts["commands"] == 13
    assert counts["unknown"] == 13 and counts["missing"] >= 1 and counts["wrong_type"] >= 30


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ({"number": 0}, "content.number"),
        ({"number": KEYS_GET_MAX_NUMBER + 1}, "content.number"),
        ({"number": -1}, "content.number"),
        ({"number": 2.0}, "content.number"),
        ({"size_bits": 0}, "content.size_bits"),
        ({"size_bits": -8}, "content.size_bits"),
        ({"size_bits": 12}, "content.size_bits"),
        ({"size_bits": KEYS_GET_MAX_SIZE_BITS + 8}, "content.size_bits"),
        ({"size_bits": "256"}, "content.size_bits"),
    ],
)
def test_keys_get_ranges(client: Client, content: dict[str, Any], field: str) -> None:
    err = refusal(client, "keys.get", content)
    assert (err.code, err.details["field"]) == ("invalid_content", field)


def test_keys_get_without_keys_is_no_key_not_internal(client: Client) -> None:
    # The daemon has no peer: its key service is not in step, no key can be delivered.
    for content in ({}, {"number": 1}, {"number": 1024, "size_bits": 65536}):
        err = refusal(client, "keys.get", content)
        assert err.code == "no_key", err.to_dict()
        assert "in step" in err.message or "available" in err.message


def test_keys_digest_answers_an_operator(client: Client) -> None:
    digest = client.call("keys.digest")
    assert digest["count"] == 0 and len(digest["sha256"]) == 64


def test_sim_inject_contract(client: Client) -> None:
    err = refusal(client, "sim.inject", {"fault": "fiber_cut", "angle_rad": 0.1})
    assert (err.code, err.details["field"]) == ("invalid_content", "content.angle_rad")
    err = refusal(client, "sim.inject", {"fault": "encoding_drift", "fraction": 0.5})
    assert (err.code, err.details["field"]) == ("invalid_content", "content.fraction")
    err = refusal(client, "sim.inject", {"fault": "encoding_drift", "angle_rad": 4.0})
    assert (err.code, err.details["field"]) == ("invalid_content", "content.angle_rad")
    err = refusal(client, "sim.inject", {"fault": "meteor"})
    assert (err.code, err.details["field"]) == ("invalid_content", "content.fault")
    # a receiver-side fault: the transmitter's world does not model it
    err = refusal(client, "sim.inject", {"fault": "bright_light"})
    assert (err.code, err.details["field"]) == ("invalid_content", "content.fault")
    err = refusal(client, "sim.inject", {"fault": "clock_step"})  # the receiver's tagger
    assert (err.code, err.details["field"]) == ("invalid_content", "content.fault")
    err = refusal(client, "sim.inject", {"fault": "fiber_cut", "step_ps": 5})
    assert (err.code, err.details["field"]) == ("invalid_content", "content.step_ps")
    assert client.call("sim.inject", fault="encoding_drift", angle_rad=0.2) == {
        "fault": "encoding_drift",
        "cleared": False,
    }
    assert client.call("sim.inject", fault="encoding_drift", clear=True) == {
        "fault": "encoding_drift",
        "cleared": True,
    }


def test_state_is_checked_after_content(client: Client) -> None:
    assert client.call("status")["state"] == "CONNECTING"
    err = refusal(client, "start", {})
    assert err.code == "not_allowed_in_state" and err.details["state"] == "CONNECTING"
    err = refusal(client, "start", {"now": True})
    assert (err.code, err.details["field"]) == ("invalid_content", "content.now")


def test_sim_faults_match_the_simulated_world() -> None:
    from drivers.simlink.world import FAULTS
    from qkdnode.bus.commands import SimInjectContent

    schema = SimInjectContent.model_json_schema()
    assert tuple(schema["properties"]["fault"]["enum"]) == FAULTS


def test_plaintext_role_defaults_to_monitor(start_inproc: Any, tmp_path: Path) -> None:
    assert BusSection().plaintext_role == "monitor"
    node = sim_node(tmp_path)
    srv = start_inproc(table=NodeCommands(node).table(), plaintext_role=BusSection().plaintext_role)
    with Client(srv.endpoint, timeout_s=3) as c:
        assert c.call("ping")["caller"] == {"name": "plaintext", "role": "monitor"}
        listed = {x["name"]: x["callable"] for x in c.call("commands")["commands"]}
        assert {n for n, ok in listed.items() if ok} == {
            "ping",
            "commands",
            "snapshot",
            "status",
            "alarms",
        }
        for name in ("keys.digest", "keys.get", "start", "sim.inject"):
            err = refusal(c, name, {})
            assert err.code == "forbidden" and err.details["required_role"] == "operator"


def test_devserver_plaintext_role_defaults_to_monitor() -> None:
    dp = spawn_devserver("--plaintext")
    try:
        with Client(dp.control, timeout_s=3) as c:
            assert c.call("ping")["caller"]["role"] == "monitor"
            assert refusal(c, "start", {}).code == "forbidden"
    finally:
        dp.proc.terminate()
        dp.proc.wait(5)
