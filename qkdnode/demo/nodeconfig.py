"""The two node configurations of a demo run, built from a :class:`DemoConfig`.

Each node gets only its own side of the simulated link: the transmitter
``[simulation.transmitter]`` (its secret seed, source, fiber, eavesdropper and box), the
receiver ``[simulation.receiver]`` (its seed, box and clock). The transmitter also gets
its box's commissioning record (``[calibration] tap_to_output_db`` and its uncertainty: the
factory's measurement of the drawn truth, :func:`drivers.simlink.truths.commissioning_record`),
since that constant cannot be measured in the field. Both get the same protocol and key
store settings, bus endpoints on free loopback ports, and state directories under the
run's output directory. With ``security = "curve"`` every run generates fresh CURVE key pairs
(one per node, one for the demo's control client) under ``OUT/keys``; the nodes allow
the demo client as ``operator`` and each other as ``peer``.

The configs are written as TOML (``OUT/alice.toml``, ``OUT/bob.toml``) and validated
with :func:`qkdnode.config.parse_config` before the daemons see them.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drivers.simlink.truths import commissioning_record
from qkdnode.config import NodeConfig
from qkdnode.config.loader import parse_config
from qkdnode.demo.config import DemoConfig

TRANSMITTER_ID = "alice"
RECEIVER_ID = "bob"
CLIENT_KEY_NAME = "demo-client"

#: The simulated instruments of each box (the same as configs/*.sim.toml).
TRANSMITTER_INSTRUMENTS: dict[str, dict[str, Any]] = {
    "laser": {"driver": "sim_laser"},
    "intensity_modulator": {"driver": "sim_intensity_modulator"},
    "encoder": {"driver": "sim_encoder"},
    "attenuator": {"driver": "sim_attenuator"},
    "power_meter": {"driver": "sim_power_meter"},
    "state_source": {"driver": "sim_state_source"},
}
RECEIVER_INSTRUMENTS: dict[str, dict[str, Any]] = {
    "spd_h": {"driver": "sim_detector", "options": {"channel": 0}},
    "spd_v": {"driver": "sim_detector", "options": {"channel": 1}},
    "spd_d": {"driver": "sim_detector", "options": {"channel": 2}},
    "spd_a": {"driver": "sim_detector", "options": {"channel": 3}},
    "tagger": {"driver": "sim_time_tagger"},
}


def free_tcp_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that were free a moment ago (bound to 0, then released)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass(frozen=True)
class Endpoints:
    tx_control: str
    tx_telemetry: str
    rx_control: str
    rx_telemetry: str
    peer: str
    fiber: str

    @classmethod
    def allocate(cls, host: str = "127.0.0.1") -> Endpoints:
        ports = free_tcp_ports(6, host)
        urls = [f"tcp://{host}:{p}" for p in ports]
        return cls(*urls)


@dataclass(frozen=True)
class CurveKeys:
    """Key files of one run. Public keys are Z85 text; secrets stay in 0600 files."""

    directory: Path
    tx_public: str
    rx_public: str
    client_public: str

    @property
    def tx_secret_file(self) -> Path:
        return self.directory / f"{TRANSMITTER_ID}.key"

    @property
    def rx_secret_file(self) -> Path:
        return self.directory / f"{RECEIVER_ID}.key"

    @property
    def client_secret_file(self) -> Path:
        return self.directory / f"{CLIENT_KEY_NAME}.key"

    @classmethod
    def generate(cls, directory: Path) -> CurveKeys:
        from qkdnode.bus.keys import write_keypair

        pubs: dict[str, str] = {}
        for name in (TRANSMITTER_ID, RECEIVER_ID, CLIENT_KEY_NAME):
            _, pub_path = write_keypair(directory, name, overwrite=True)
            pubs[name] = pub_path.read_text("ascii").strip()
        return cls(directory, pubs[TRANSMITTER_ID], pubs[RECEIVER_ID], pubs[CLIENT_KEY_NAME])


def _source_targets(cfg: DemoConfig) -> dict[str, Any]:
    """The node's ``[source]`` targets: what calibration aims for = the simulated truth."""
    s = cfg.link.source
    return {
        "slot_rate_hz": s.slot_rate_hz,
        "mu_signal": s.mu_signal,
        "mu_decoy": s.mu_decoy,
        "p_signal": s.p_signal,
        "p_decoy": s.p_decoy,
        "p_basis_z": s.p_basis_z,
        "wavelength_nm": s.wavelength_nm,
    }


def _bus(cfg: DemoConfig, ep: Endpoints, role: str, keys: CurveKeys | None) -> dict[str, Any]:
    tx = role == "transmitter"
    bus: dict[str, Any] = {
        "control_endpoint": ep.tx_control if tx else ep.rx_control,
        "telemetry_endpoint": ep.tx_telemetry if tx else ep.rx_telemetry,
        "peer_endpoint": ep.peer,
        "allow_plaintext": keys is None,
    }
    if keys is None:  # the demo runner calibrates, starts, stops and compares the stores
        bus["plaintext_role"] = "operator"
    if keys is not None:
        peer_name = RECEIVER_ID if tx else TRANSMITTER_ID
        peer_public = keys.rx_public if tx else keys.tx_public
        bus["server_secret_key_file"] = str(keys.tx_secret_file if tx else keys.rx_secret_file)
        bus["peer_public_key"] = peer_public
        bus["clients"] = [
            {"name": CLIENT_KEY_NAME, "public_key": keys.client_public, "role": "operator"},
            {"name": peer_name, "public_key": peer_public, "role": "peer"},
        ]
    return bus


def _commissioning(cfg: DemoConfig) -> dict[str, Any]:
    """The transmitter's ``[calibration]`` box constants: its commissioning record."""
    record = commissioning_record(cfg.link.transmitter)
    return {
        "tap_to_output_db": record.tap_to_output_db,
        "tap_to_output_uncertainty_db": record.tap_to_output_uncertainty_db,
    }


def _simulation(cfg: DemoConfig, role: str, ep: Endpoints) -> dict[str, Any]:
    """The node's ``[simulation]``: its own side of the link, nothing of the other."""
    side = cfg.link.transmitter_side() if role == "transmitter" else cfg.link.receiver_side()
    return {"enabled": True, "fiber_endpoint": ep.fiber, role: side.model_dump(mode="json")}


def node_config_dict(
    cfg: DemoConfig, role: str, out_dir: Path, ep: Endpoints, keys: CurveKeys | None
) -> dict[str, Any]:
    """The TOML data of one node (``role`` is ``transmitter`` or ``receiver``)."""
    tx = role == "transmitter"
    node_id, peer_id = (TRANSMITTER_ID, RECEIVER_ID) if tx else (RECEIVER_ID, TRANSMITTER_ID)
    data: dict[str, Any] = {
        "node": {
            "id": node_id,
            "role": role,
            "peer_id": peer_id,
            "state_dir": str((out_dir / node_id).resolve()),
            "log_level": cfg.demo.log_level,
        },
        "source": _source_targets(cfg),
        "instruments": TRANSMITTER_INSTRUMENTS if tx else RECEIVER_INSTRUMENTS,
        "bus": _bus(cfg, ep, role, keys),
        "protocol": cfg.protocol.model_dump(mode="json", exclude_none=True),
        "keystore": cfg.keystore.model_dump(mode="json", exclude_none=True),
        "simulation": _simulation(cfg, role, ep),
    }
    if tx:
        data["calibration"] = _commissioning(cfg)
    return data


@dataclass(frozen=True)
class NodeFiles:
    role: str
    node_id: str
    config_path: Path
    log_path: Path
    control_endpoint: str
    telemetry_endpoint: str
    config: NodeConfig


def write_node_configs(
    cfg: DemoConfig, out_dir: Path, ep: Endpoints | None = None
) -> tuple[NodeFiles, NodeFiles, CurveKeys | None]:
    """Write and validate both node configs under ``out_dir``; return (tx, rx, keys)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ep = ep or Endpoints.allocate()
    keys = CurveKeys.generate(out_dir / "keys") if cfg.demo.security == "curve" else None
    result: list[NodeFiles] = []
    for role in ("transmitter", "receiver"):
        data = node_config_dict(cfg, role, out_dir, ep, keys)
        node_id = data["node"]["id"]
        path = out_dir / f"{node_id}.toml"
        path.write_text(
            f"# Generated by `qkdnode demo`: {role} of the simulated link.\n" + to_toml(data),
            "utf-8",
        )
        parsed = parse_config(data, str(path))
        result.append(
            NodeFiles(
                role=role,
                node_id=node_id,
                config_path=path,
                log_path=out_dir / f"{node_id}.log",
                control_endpoint=data["bus"]["control_endpoint"],
                telemetry_endpoint=data["bus"]["telemetry_endpoint"],
                config=parsed,
            )
        )
    return result[0], result[1], keys


# --- a small TOML writer (the standard library reads TOML but does not write it) ---------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str | Path):
        return _toml_string(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        items = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_string(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else _toml_string(key)


def _is_table_array(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and bool(value)
        and all(
            isinstance(v, Mapping) and any(isinstance(x, Mapping) for x in v.values())
            for v in value
        )
    )


def _toml_table(
    prefix: list[str], table: Mapping[str, Any], out: list[str], *, array: bool = False
) -> None:
    """``table`` under ``prefix`` (``[[prefix]]`` when ``array``). Lists of tables that
    hold tables themselves (``[[links]]`` entries) are written as arrays of tables."""
    scalars = {
        k: v
        for k, v in table.items()
        if v is not None and not isinstance(v, Mapping) and not _is_table_array(v)
    }
    tables = {k: v for k, v in table.items() if isinstance(v, Mapping)}
    arrays = {k: v for k, v in table.items() if _is_table_array(v)}
    if prefix and (scalars or array or not (tables or arrays)):
        out.append("")
        head = ".".join(_toml_key(p) for p in prefix)
        out.append(f"[[{head}]]" if array else f"[{head}]")
    for k, v in scalars.items():
        out.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for k, v in tables.items():
        _toml_table([*prefix, k], v, out)
    for k, v in arrays.items():
        for entry in v:
            _toml_table([*prefix, k], entry, out, array=True)


def to_toml(data: Mapping[str, Any]) -> str:
    """TOML text for nested dicts of str, int, float, bool, lists and paths (None omitted)."""
    out: list[str] = []
    _toml_table([], data, out)
    return "\n".join(out).lstrip("\n") + "\n"
