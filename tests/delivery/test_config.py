from __future__ import annotations

import pytest
from pydantic import ValidationError

from qkdnode.config.sections import DeliverySection, KeystoreSection, SaeEntry

SAES = [SaeEntry(sae_id="m", certificate_cn="cn-m"), SaeEntry(sae_id="s", certificate_cn="cn-s")]


def test_valid_delivery_section() -> None:
    cfg = DeliverySection(saes=SAES, pairs=[("m", "s")])
    assert cfg.peer_notice_wait_s == 1.0 and not cfg.require_peer_notice
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
        ({"peer_notice_wait_s": -1}, "greater than or equal"),
    ],
)
def test_invalid_delivery_sections(kw: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"saes": SAES, **kw}
    with pytest.raises(ValidationError, match=message):
        DeliverySection(**args)  # type: ignore[arg-type]


def test_peer_names_come_from_cn_then_dns_sans() -> None:
    from qkdnode.delivery.tls import peer_common_names

    cert = {
        "subject": ((("countryName", "CH"),), (("commonName", "sae-1"),)),
        "subjectAltName": (("DNS", "sae-1.example"), ("IP Address", "127.0.0.1")),
    }
    assert peer_common_names(cert) == ["sae-1", "sae-1.example"]
    assert peer_common_names(None) == []
    assert peer_common_names({}) == []
