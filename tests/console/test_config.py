"""``[console]``: off by default, loopback unless mutual TLS, one per node."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from qkdnode.config import ConfigError, parse_site
from qkdnode.config.console import ConsoleSection


def test_nothing_listens_unless_the_config_names_it() -> None:
    cfg = ConsoleSection()
    assert not cfg.enabled
    assert cfg.retention_days == 7.0
    assert cfg.local_role == "monitor"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"listen_host": "192.0.2.7"}, "binds a loopback address only"),
        ({"listen_host": "0.0.0.0"}, "wildcard bind"),
        (
            {"listen_host": "192.0.2.7", "tls_cert_file": "s.crt"},
            "tls_cert_file, tls_key_file and client_ca_file together",
        ),
        (
            {
                "listen_host": "192.0.2.7",
                "tls_cert_file": "s.crt",
                "tls_key_file": "s.key",
                "client_ca_file": "ca.crt",
            },
            "list the client certificate CNs",
        ),
        (
            {"listen_host": "127.0.0.1", "operators": ["op"], "monitors": ["op"]},
            "both operators and monitors",
        ),
    ],
)
def test_unsafe_or_half_done_settings_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ConsoleSection.model_validate(fields)


def test_mutual_tls_may_bind_a_management_address() -> None:
    cfg = ConsoleSection.model_validate(
        {
            "listen_host": "192.0.2.7",
            "tls_cert_file": "s.crt",
            "tls_key_file": "s.key",
            "client_ca_file": "ca.crt",
            "monitors": ["noc"],
        }
    )
    assert cfg.tls and cfg.enabled


def _site(extra: str) -> dict[str, object]:
    import tomllib

    text = (
        '[node]\nid = "bravo"\n'
        '[[links]]\nid = "ab"\nrole = "receiver"\npeer_id = "alpha"\n'
        '[links.bus]\ncontrol_endpoint = "tcp://127.0.0.1:7001"\n'
        'telemetry_endpoint = "tcp://127.0.0.1:7002"\npeer_endpoint = "tcp://127.0.0.1:7003"\n'
        "allow_plaintext = true\n" + extra
    )
    return tomllib.loads(text)


def test_a_site_has_one_console_for_all_its_links(tmp_path: Path) -> None:
    site = parse_site(_site('[console]\nlisten_host = "127.0.0.1"\nlisten_port = 9000\n'))
    assert site.console.enabled and site.console.listen_port == 9000
    with pytest.raises(ConfigError, match=r"links\[0\]\.console: the console is the node's"):
        parse_site(_site('[links.console]\nlisten_host = "127.0.0.1"\n'))
    with pytest.raises(ConfigError, match=r"console\.listen_host.*loopback"):
        parse_site(_site('[console]\nlisten_host = "10.1.2.3"\n'))


def test_config_check_names_a_missing_console_certificate(tmp_path: Path) -> None:
    from qkdnode.cli.config_cmd import site_problems

    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    site = parse_site(
        _site(
            f'[console]\nlisten_host = "127.0.0.1"\ntls_cert_file = "{tmp_path / "no.crt"}"\n'
            f'tls_key_file = "{ca}"\nclient_ca_file = "{ca}"\nmonitors = ["noc"]\n'
        )
    )
    problems = [p for p in site_problems(site) if p.startswith("console.")]
    assert problems == [f"console.tls_cert_file: {tmp_path / 'no.crt'} does not exist"]
