from __future__ import annotations

import pytest
from pydantic import ValidationError

from qkdnode.config.loader import ConfigError, parse_config
from qkdnode.config.sections import DeliverySection, KeystoreSection, SaeEntry

SAES = [SaeEntry(sae_id="m", certificate_cn="cn-m"), SaeEntry(sae_id="s", certificate_cn="cn-s")]


def test_valid_delivery_section() -> None:
    cfg = DeliverySection(saes=SAES, pairs=[("m", "s")])
    assert cfg.max_sae_id_count == 8 and cfg.crl_file is None
    assert not hasattr(cfg, "require_peer_notice") and not hasattr(cfg, "peer_notice_wait_s")
    assert KeystoreSection().compact_interval_s == 300.0


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"pairs": [("m", "x")]}, "SAE ID 'x' is not listed"),
        ({"pairs": [("m", "m")]}, "both 'm'"),
        ({"saes": [*SAES, SaeEntry(sae_id="m", certificate_cn="other")]}, "duplicate sae_id"),
        (
            {"saes": [*SAES, SaeEntry(sae_id="z", certificate_cn="cn-m")]},
            "duplicate certificate_cn",
        ),
        ({"min_key_size_bits": 512, "max_key_size_bits": 256}, "min_key_size_bits"),
        ({"max_sae_id_count": -1}, "greater than or equal"),
        ({"max_sae_id_count": 16}, "less than or equal"),
        ({"require_peer_notice": True}, "require_peer_notice is no longer valid"),
        ({"require_peer_notice": False}, "require_peer_notice is no longer valid"),
        ({"peer_notice_wait_s": 1.0}, "peer_notice_wait_s is no longer valid"),
    ],
)
def test_invalid_delivery_sections(kw: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"saes": SAES, **kw}
    with pytest.raises(ValidationError, match=message):
        DeliverySection(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["require_peer_notice", "peer_notice_wait_s"])
def test_a_config_file_with_a_removed_delivery_key_is_refused_naming_it(name: str) -> None:
    data = {"delivery": {"enabled": False, name: 1}}
    with pytest.raises(ConfigError) as err:
        parse_config(data, "node.toml")
    lines = [p for p in err.value.problems if p.startswith("delivery")]
    assert len(lines) == 1
    assert lines[0].startswith(f"delivery: {name} is no longer valid")
    assert "remove the line" in lines[0]
    assert f"node.toml: delivery: {name} is no longer valid" in str(err.value)


def test_peer_names_come_from_cn_then_dns_sans() -> None:
    from qkdnode.delivery.tls import peer_common_names

    cert = {
        "subject": ((("countryName", "CH"),), (("commonName", "sae-1"),)),
        "subjectAltName": (("DNS", "sae-1.example"), ("IP Address", "127.0.0.1")),
    }
    assert peer_common_names(cert) == ["sae-1", "sae-1.example"]
    assert peer_common_names(None) == []
    assert peer_common_names({}) == []
