"""docs/protocol.md against the code: every command of the daemon's table (with its role,
states, content fields and error codes), every error code, every telemetry topic the
code publishes, and every field of the ``status`` reply must be documented."""

from __future__ import annotations

import ast
import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from qkdnode.bus.commands import CallerInfo, CommandSpec
from qkdnode.bus.errors import ErrorCode
from qkdnode.bus.telemetry import HEARTBEAT_TOPIC
from qkdnode.keystore.models import KeyState
from qkdnode.node_commands import NodeCommands
from qkdnode.statemachine import State
from tests.bus.conftest import REPO, daemon_specs, sim_node
from tests.source_trees import parse_file

DOC = REPO / "docs" / "protocol.md"
#: Not the daemon: the development server and the benchmarks publish their own topics.
NOT_THE_DAEMON = {"qkdnode/bus/devserver.py", "qkdnode/bus/bench.py"}
PUBLISH_NAMES = {"publish", "_publish"}


def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def section(text: str, heading: str) -> str:
    """From the line starting with ``heading`` to the next heading of the same or a
    higher level."""
    lines = text.splitlines()
    level = len(heading) - len(heading.lstrip("#"))
    start = next((i for i, ln in enumerate(lines) if ln.startswith(heading)), None)
    assert start is not None, f"docs/protocol.md has no heading {heading!r}"
    end = len(lines)
    for i in range(start + 1, len(lines)):
        m = re.match(r"^(#+) ", lines[i])
        if m and len(m.group(1)) <= level:
            end = i
            break
    return "\n".join(lines[start:end])


def table_row(text: str, first_cell: str) -> str:
    for line in text.splitlines():
        if line.startswith(f"| {first_cell} |"):
            return line
    raise AssertionError(f"no table row for {first_cell}")


def command_section(commands: str, name: str) -> str:
    """The ``####`` subsection whose heading names ``name`` (several may share one)."""
    for m in re.finditer(r"^#### (.*)$", commands, re.MULTILINE):
        if f"`{name}`" in m.group(1).split(", ") or m.group(1) == f"`{name}`":
            return section(commands[m.start() :], "#### ")
    raise AssertionError(f"no '#### `{name}`' subsection under ### Commands")


def published_topics() -> tuple[set[str], set[str]]:
    """Topics published in qkdnode/ (not the dev server): constant names, and the
    constant prefixes of f-string names (``calibration.`` for ``f"calibration.{p}"``)."""
    constants: set[str] = set()
    prefixes: set[str] = set()
    for path in sorted((REPO / "qkdnode").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel in NOT_THE_DAEMON:
            continue
        for node in ast.walk(parse_file(path)):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name not in PUBLISH_NAMES:
                continue
            topic = node.args[0]
            if isinstance(topic, ast.Constant) and isinstance(topic.value, str):
                constants.add(topic.value)
            elif isinstance(topic, ast.JoinedStr):
                head = topic.values[0] if topic.values else None
                assert isinstance(head, ast.Constant), f"{rel}: topic without a constant prefix"
                prefixes.add(str(head.value))
    return constants, prefixes


def calibration_procedures() -> set[str]:
    names: set[str] = set()
    for path in (REPO / "qkdnode" / "procedures").glob("*.py"):
        names |= set(re.findall(r'^\s+procedure: str = "([a-z_]+)"', path.read_text(), re.M))
    return names


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory) -> list[CommandSpec]:
    return daemon_specs(tmp_path_factory.mktemp("node"))


def test_every_command_is_documented(specs: list[CommandSpec]) -> None:
    text = section(doc(), "### Commands")
    live = {s.value for s in State} - {"SHUTDOWN"}
    assert len(specs) >= 12
    for spec in specs:
        row = table_row(text, f"`{spec.name}`")
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == spec.role, f"{spec.name}: role {cells[1]!r} != {spec.role!r}"
        states = cells[2]
        if spec.allowed_states is None:
            assert states == "any", spec.name
        elif set(spec.allowed_states) == live:
            assert states == "live", spec.name
        else:
            assert {s.strip("` ") for s in states.split(",")} == set(spec.allowed_states)
        body = command_section(text, spec.name)
        props = spec.content_model.model_json_schema()["properties"]
        if not props:
            assert cells[3] == "`{}`", f"{spec.name}: content is the empty object"
        for prop in props:
            assert f"`{prop}`" in cells[3], f"{spec.name}: content field {prop} not in table"
            assert f"`{prop}`" in body, f"{spec.name}: content field {prop} not described"
        for code in spec.errors:
            assert f"`{code}`" in body, f"{spec.name}: error code {code} not documented"


def test_every_error_code_is_documented() -> None:
    text = section(doc(), "### Error codes")
    for code in ErrorCode:
        table_row(text, f"`{code}`")


def test_every_published_topic_is_documented() -> None:
    text = section(doc(), "## 3. Telemetry socket")
    topics = section(text, "### Topics")
    constants, prefixes = published_topics()
    assert {"state", "alarm", "block", "peer"} <= constants
    for topic in sorted(constants | {HEARTBEAT_TOPIC}):
        table_row(topics, f"`{topic}`")
    assert prefixes, "no f-string topic found: calibration.<procedure> expected"
    for prefix in sorted(prefixes):
        assert f"`{prefix}<" in topics, f"topic family {prefix}<...> not documented"
    for procedure in sorted(calibration_procedures()):
        assert f"`calibration.{procedure}`" in text, procedure


def test_peer_channel_kinds_are_referenced() -> None:
    text = doc()
    for kind in ("$hello", "$hb", "link.req", "link.rep"):
        assert f"`{kind}`" in section(text, "## 4. Peer socket"), kind
        assert f"`{kind}`" in section(text, "## 3. Telemetry socket"), kind


def test_every_status_field_is_documented(tmp_path: Path) -> None:
    node = sim_node(tmp_path)
    reply: dict[str, Any] = asyncio.run(
        NodeCommands(node)._cmd_status({}, CallerInfo("doc", "monitor"))
    )
    text = section(doc(), "## 6. The `status` reply")
    assert "`stats`:" in text, "the stats table must follow a '`stats`:' line"
    stats = text[text.index("`stats`:") :]
    for key in reply:
        table_row(text, f"`{key}`")
    for key in reply["stats"]:
        assert f"| `{key}` |" in stats, f"status.stats.{key} not documented"
    keystore = table_row(text, "`keystore`")
    for state in KeyState:
        assert f"`{state.value}`" in keystore, f"keystore state {state.value} not documented"


def test_settings_named_in_the_doc() -> None:
    text = section(doc(), "## 2. Control socket")
    for key in (
        "bus.client_rate_limit_per_s",
        "bus.heartbeat_interval_s",
        "bus.heartbeat_liveness",
        "bus.reconnect_max_s",
        "bus.max_control_frame_bytes",
        "bus.max_inflight_requests",
        "bus.plaintext_role",
    ):
        assert f"`{key}`" in text, key
