"""A node with several links: the ``[[links]]`` config form, as a clumsy operator writes it."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from qkdnode.config import ConfigError, load_config, load_site, parse_site

ROOT = Path(__file__).resolve().parents[2]
BRAVO = ROOT / "configs" / "line" / "bravo.toml"


def bravo() -> dict[str, Any]:
    return tomllib.loads(BRAVO.read_text())


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_site(data, "bravo.toml")
    return err.value.problems


def test_the_shipped_line_configs_load_as_one_node_with_two_links() -> None:
    site = load_site(BRAVO)
    assert site.multi and site.id == "bravo"
    ab, bc = site.links
    assert (ab.id, ab.cfg.node.role, ab.cfg.node.peer_id) == ("alpha-bravo", "receiver", "alpha")
    assert (bc.id, bc.cfg.node.role, bc.cfg.node.peer_id) == (
        "bravo-charlie",
        "transmitter",
        "charlie",
    )
    # each link keeps its state apart, under the node's state directory
    assert ab.cfg.node.state_dir == Path("state/line/bravo/alpha-bravo")
    assert bc.cfg.node.state_dir == Path("state/line/bravo/bravo-charlie")
    assert ab.cfg.node.id == bc.cfg.node.id == "bravo"
    assert not ab.cfg.node.autostart and bc.cfg.node.autostart
    # each side holds its own side of its simulated link only
    assert ab.cfg.simulation is not None and ab.cfg.simulation.transmitter is None
    assert bc.cfg.simulation is not None and bc.cfg.simulation.receiver is None
    for name in ("alpha", "charlie"):
        one = load_site(ROOT / "configs" / "line" / f"{name}.toml")
        assert not one.multi and [link.id for link in one.links] == [""]


def test_a_one_link_config_is_a_node_with_one_link_as_before() -> None:
    path = ROOT / "configs" / "transmitter.sim.toml"
    site = load_site(path)
    assert not site.multi
    assert site.links[0].cfg == load_config(path)


def test_tools_that_take_one_link_refuse_a_node_with_several_and_say_why() -> None:
    with pytest.raises(ConfigError, match="several links"):
        load_config(BRAVO)


def test_errors_name_the_link_and_the_key() -> None:
    data = bravo()
    data["links"][1]["source"]["mu_signal"] = -1
    data["links"][0]["bus"]["control_endpoint"] = "tcp://127.0.0.1"
    data["links"][0]["role"] = "relay"
    got = problems(data)
    assert any(p.startswith("links[1].source.mu_signal: must be > 0") for p in got), got
    assert any(p.startswith("links[0].bus.control_endpoint:") for p in got), got
    assert any(p.startswith("links[0].role:") for p in got), got


def test_top_level_sections_are_every_links_defaults_and_a_link_overrides_them() -> None:
    data = bravo()
    data["bus"]["max_control_frame_bytes"] = 2_000_000
    data["links"][1]["bus"]["max_control_frame_bytes"] = 3_000_000
    data["keystore"]["key_size_bits"] = 512
    ab, bc = parse_site(data, "bravo.toml").links
    assert ab.cfg.bus.max_control_frame_bytes == 2_000_000  # the node's
    assert bc.cfg.bus.max_control_frame_bytes == 3_000_000  # the link's own
    assert ab.cfg.bus.allow_plaintext and bc.cfg.bus.allow_plaintext  # shared, kept
    assert ab.cfg.bus.control_endpoint != bc.cfg.bus.control_endpoint  # each link's own
    assert ab.cfg.keystore.key_size_bits == bc.cfg.keystore.key_size_bits == 512
    # a shared value that is wrong is named in every link that takes it
    data["protocol"]["eps_sec"] = -1
    got = problems(data)
    assert any(p.startswith("links[0].protocol.eps_sec:") for p in got), got
    assert any(p.startswith("links[1].protocol.eps_sec:") for p in got), got


def test_hardware_at_the_top_level_and_unknown_sections_are_refused() -> None:
    data = bravo()
    data["instruments"] = {"laser": {"driver": "sim_laser"}}
    data["simulation"] = {"fiber_endpoint": "tcp://127.0.0.1:6000"}
    data["buss"] = {}
    got = problems(data)
    assert any(p.startswith("instruments: belongs to one link: put it in") for p in got), got
    assert any(p.startswith("simulation: belongs to one link: put it in") for p in got), got
    assert any(p.startswith("buss: unknown key") for p in got), got


@pytest.mark.parametrize(
    ("mutate", "expect"),
    [
        (lambda d: d["links"][1].update(id="alpha-bravo"), "links[1].id: link 'alpha-bravo'"),
        (
            lambda d: d["links"][1]["bus"].update(
                control_endpoint=d["links"][0]["bus"]["control_endpoint"]
            ),
            "links[1].bus.control_endpoint: tcp://127.0.0.1:5574 is also links[0].bus",
        ),
        (
            lambda d: d["links"][1]["bus"].update(telemetry_endpoint="tcp://127.0.0.1:5574"),
            "links[1].bus.telemetry_endpoint: tcp://127.0.0.1:5574 is also links[0].bus."
            "control_endpoint",
        ),
        (
            lambda d: d["links"][1]["bus"].update(monitor_endpoint="tcp://127.0.0.1:5574"),
            "links[1].bus.monitor_endpoint: tcp://127.0.0.1:5574 is also links[0].bus."
            "control_endpoint",
        ),
        (
            lambda d: d["links"][1]["bus"].update(monitor_endpoint="udp://127.0.0.1:5599"),
            "links[1].bus.monitor_endpoint: must start with tcp:// or ipc://",
        ),
        (
            lambda d: d["links"][1]["simulation"].update(fiber_endpoint="tcp://127.0.0.1:5573"),
            "links[1].simulation.fiber_endpoint",
        ),
        (
            lambda d: d["links"][0]["instruments"]["spd_h"].pop("resource"),
            "links[0].instruments.spd_h.resource: this node simulates several links",
        ),
        (lambda d: d["links"][0].pop("id"), "links[0].id: required key is missing"),
        (lambda d: d["links"][0].update(id="a b"), "links[0].id: letters, digits"),
        (lambda d: d["links"][0].update(state_dir="x"), "links[0].state_dir: unknown key"),
        (lambda d: d["links"][0].update(peer_id="bravo"), "node.id and node.peer_id must differ"),
        (lambda d: d.update(links=[]), "links: needs one or more [[links]] tables"),
        (lambda d: d["node"].update(role="receiver"), "node.role: unknown key"),
        (lambda d: d["links"][0].update(bus=False), "links[0].bus:"),
    ],
)
def test_clumsy_multi_link_configs_are_refused_naming_the_key(mutate: Any, expect: str) -> None:
    data = bravo()
    mutate(data)
    got = problems(data)
    assert any(expect in p for p in got), got


def test_config_check_lists_every_link_and_exits_2_on_a_clash(tmp_path: Path) -> None:
    def check(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "qkdnode", "config", "check", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    ok = check(BRAVO)
    assert ok.returncode == 0, ok.stderr
    assert "link 'alpha-bravo': receiver 'bravo' with 'alpha'" in ok.stdout
    assert "link 'bravo-charlie': transmitter 'bravo' with 'charlie'" in ok.stdout
    bad = tmp_path / "bravo.toml"
    bad.write_text(BRAVO.read_text().replace("5576", "5574"))
    res = check(bad)
    assert res.returncode == 2
    assert f"{bad}: links[1].bus.control_endpoint: tcp://127.0.0.1:5574 is also" in res.stderr


def test_ctl_addresses_every_link_of_a_node_and_refuses_one_endpoint_for_several() -> None:
    import argparse

    from qkdnode.cli.ctl_errors import UsageError
    from qkdnode.cli.ctl_nodes import node_addrs

    args = argparse.Namespace(config=[str(BRAVO)], endpoint=[], telemetry_endpoint=[])
    addrs = node_addrs(args)
    assert [(a.label, a.control) for a in addrs] == [
        ("bravo/alpha-bravo", "tcp://127.0.0.1:5574"),
        ("bravo/bravo-charlie", "tcp://127.0.0.1:5576"),
    ]
    args.endpoint = ["tcp://127.0.0.1:5574"]
    with pytest.raises(UsageError, match="names 2 links"):
        node_addrs(args)


# --- [network]: the map a site of a key management network carries ------------------------


def _network(**changes: Any) -> dict[str, Any]:
    net: dict[str, Any] = {
        "sites": ["alpha", "bravo", "charlie"],
        "links": [
            {"id": "alpha-bravo", "a": "alpha", "b": "bravo"},
            {"id": "bravo-charlie", "a": "bravo", "b": "charlie"},
        ],
        "directory": [
            {"sae_id": "sae-b", "site": "bravo"},
            {"sae_id": "sae-c", "site": "charlie"},
        ],
        "delivery": {
            "enabled": True,
            "listen_port": 9443,
            "saes": [{"sae_id": "sae-b", "certificate_cn": "sae-b"}],
            "pairs": [["sae-b", "sae-c"]],
        },
    }
    net.update(changes)
    return net


def test_a_site_in_a_network_carries_the_map_and_its_kme() -> None:
    data = bravo()
    data["network"] = _network()
    site = parse_site(data, "bravo.toml")
    assert site.network is not None and site.network.site_of("sae-c") == "charlie"
    # a pair may name an SAE registered elsewhere (the directory says where)
    assert site.network.delivery.pairs == [("sae-b", "sae-c")]


def test_a_map_that_does_not_fit_the_site_is_refused_naming_each_key() -> None:
    data = bravo()
    data["network"] = _network(
        links=[
            {"id": "alpha-bravo", "a": "alpha", "b": "charlie"},  # not bravo's peer
            {"id": "bravo-delta", "a": "bravo", "b": "delta"},  # delta is no site
        ],
        directory=[{"sae_id": "sae-b", "site": "alpha"}, {"sae_id": "sae-c", "site": "charlie"}],
    )
    got = problems(data)
    assert "network.links[1].b: site 'delta' is not in sites" in got
    data["network"]["links"][1] = {"id": "bravo-charlie", "a": "bravo", "b": "charlie"}
    got = problems(data)
    assert any(
        p.startswith("links[0]: network.links names 'alpha-bravo' between 'alpha' and 'charlie'")
        for p in got
    ), got
    assert (
        "network.delivery.saes[0]: SAE 'sae-b' is registered here but the directory places "
        "it at 'alpha'"
    ) in got


def test_network_port_clash_and_one_link_form_are_refused() -> None:
    data = bravo()
    data["network"] = _network()
    data["links"][0]["metrics"] = {"enabled": True, "listen_port": 9443}
    assert (
        "network.delivery.listen_port: port 9443 is also links[0].metrics.listen_port"
        in problems(data)
    )
    one = tomllib.loads((ROOT / "configs" / "line" / "alpha.toml").read_text())
    one["network"] = _network()
    with pytest.raises(ConfigError, match=r"network: .*\[\[links\]\] entry"):
        parse_site(one, "alpha.toml")
    data = bravo()
    data["network"] = _network(delivery={"pairs": [["sae-b", "nobody"]]})
    assert "network.delivery.pairs[0]: slave SAE 'nobody' is not in the directory" in problems(data)
