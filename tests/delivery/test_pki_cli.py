from __future__ import annotations

import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from qkdnode.cli import main


def test_pki_init_and_issue_make_a_working_chain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pki"
    assert main(["pki", "init", "--out", str(out)]) == 0
    assert (
        main(["pki", "issue", "--out", str(out), "--cn", "kme-a", "--server", "--san", "127.0.0.1"])
        == 0
    )
    assert main(["pki", "issue", "--out", str(out), "--cn", "sae-1"]) == 0
    for name in ("ca.key", "kme-a.key", "sae-1.key"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600
    server = x509.load_pem_x509_certificate((out / "kme-a.crt").read_bytes())
    client = x509.load_pem_x509_certificate((out / "sae-1.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    # the files load into real TLS contexts
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(out / "kme-a.crt", out / "kme-a.key")
    ctx.load_verify_locations(out / "ca.crt")
    assert "PRIVATE" not in capsys.readouterr().out


def test_pki_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pki"
    assert main(["pki", "issue", "--out", str(out), "--cn", "x"]) == 1  # no CA yet
    assert main(["pki", "init", "--out", str(out)]) == 0
    assert main(["pki", "init", "--out", str(out)]) == 1  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(["pki", "issue", "--out", str(out), "--cn", "../evil"]) == 2
    assert main(["pki", "issue", "--out", str(out), "--cn", "c", "--san", "1.2.3.4"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["pki", "issue", "--out", str(out)])  # --cn missing
    assert exc.value.code == 2
