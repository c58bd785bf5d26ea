from __future__ import annotations

import datetime as dt
import pickle
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from qkdnode.cli import main
from qkdnode.delivery.pki import PkiError, init_ca, issue_cert, revoke_cert
from qkdnode.delivery.revocation import RevocationChecker, RevocationError, RevocationList


def _der(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )


def _ca(d: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def _crl(
    d: Path, serials: list[int], *, builder: x509.CertificateRevocationListBuilder | None = None
) -> x509.CertificateRevocationList:
    """A CRL signed by the CA in ``d`` listing ``serials``."""
    ca_cert, ca_key = _ca(d)
    now = dt.datetime.now(dt.UTC)
    b = builder or x509.CertificateRevocationListBuilder()
    b = b.issuer_name(ca_cert.subject).last_update(now).next_update(now + dt.timedelta(days=1))
    for serial in serials:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    return b.sign(ca_key, hashes.SHA256())


def _cert_with_serial(ca_dir: Path, serial: int, cn: str = "sae-1") -> bytes:
    """A DER client certificate with a chosen serial number, signed by the CA in ``ca_dir``."""
    ca_cert, ca_key = _ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    init_ca(d)
    for cn in ("sae-1", "sae-2", "sae-3"):
        issue_cert(d, cn)
    return d


# -- loading --------------------------------------------------------------------------------


def test_pem_crl_revokes_listed_cert_only(pki: Path) -> None:
    crl_path = revoke_cert(pki, "sae-1")
    assert crl_path == pki / "crl.pem"
    crl = RevocationList.load(crl_path, ca_file=pki / "ca.crt")
    assert crl.is_revoked(_der(pki / "sae-1.crt"))
    assert not crl.is_revoked(_der(pki / "sae-2.crt"))
    sae1 = x509.load_pem_x509_certificate((pki / "sae-1.crt").read_bytes())
    assert crl.serials == {sae1.serial_number}
    assert crl.issuer == _ca(pki)[0].subject
    now = dt.datetime.now(dt.UTC)
    assert crl.last_update <= now
    assert crl.next_update is not None
    assert dt.timedelta(days=29) < crl.next_update - now <= dt.timedelta(days=30)
    assert not crl.is_stale()
    assert crl.is_stale(now + dt.timedelta(days=31))


def test_der_crl_loads_like_pem(pki: Path, tmp_path: Path) -> None:
    pem = x509.load_pem_x509_crl(revoke_cert(pki, "sae-2").read_bytes())
    der_path = tmp_path / "crl.der"
    der_path.write_bytes(pem.public_bytes(serialization.Encoding.DER))
    crl = RevocationList.load(der_path, ca_file=pki / "ca.crt")
    assert crl.is_revoked(_der(pki / "sae-2.crt"))
    assert not crl.is_revoked(_der(pki / "sae-1.crt"))
    assert crl.path == der_path


def test_without_ca_file_the_signature_is_not_checked(pki: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    init_ca(other, common_name="other CA")
    issue_cert(other, "x")
    crl = RevocationList.load(revoke_cert(other, "x"))
    assert crl.ca_file is None
    assert crl.is_revoked(_der(other / "x.crt"))


@pytest.mark.parametrize("other_cn", ["other CA", "qkdnode test CA"])
def test_same_serial_from_another_ca_is_not_revoked(
    pki: Path, tmp_path: Path, other_cn: str
) -> None:
    crl = RevocationList.load(revoke_cert(pki, "sae-1"), ca_file=pki / "ca.crt")
    serial = x509.load_pem_x509_certificate((pki / "sae-1.crt").read_bytes()).serial_number
    other = tmp_path / "other"
    init_ca(other, common_name=other_cn)  # the second case has the same issuer name
    assert crl.is_revoked(_cert_with_serial(pki, serial))
    assert not crl.is_revoked(_cert_with_serial(other, serial))


@pytest.mark.parametrize("other_cn", ["other CA", "qkdnode test CA"])
def test_crl_of_another_ca_is_refused(pki: Path, tmp_path: Path, other_cn: str) -> None:
    other = tmp_path / "other"
    init_ca(other, common_name=other_cn)
    issue_cert(other, "sae-1")
    crl_path = revoke_cert(other, "sae-1")
    with pytest.raises(RevocationError) as exc:
        RevocationList.load(crl_path, ca_file=pki / "ca.crt")
    assert str(crl_path) in str(exc.value)
    assert exc.value.path == crl_path
    if other_cn == "other CA":
        assert "not a CA in" in str(exc.value)
    else:  # same name, other key
        assert "bad signature" in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_unusable_files_are_refused_naming_the_path(pki: Path, tmp_path: Path) -> None:
    ca = pki / "ca.crt"
    missing = tmp_path / "missing.pem"
    with pytest.raises(RevocationError, match="cannot read the file") as exc:
        RevocationList.load(missing)
    assert str(missing) in str(exc.value)

    cases: dict[str, tuple[bytes, str]] = {
        "empty.pem": (b"", "empty"),
        "junk.der": (b"\x30\x03\x02\x01\x01junk", "not a CRL"),
        "cert.pem": ((pki / "sae-1.crt").read_bytes(), "not a CRL"),
        "broken.pem": (b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n", "PEM CRL"),
    }
    two = _crl(pki, [1]).public_bytes(serialization.Encoding.PEM)
    cases["two.pem"] = (two + two, "2 CRLs")
    for name, (data, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(RevocationError) as exc:
            RevocationList.load(path, ca_file=ca)
        assert str(path) in str(exc.value), name
        assert reason in str(exc.value), name

    crl_path = revoke_cert(pki, "sae-1")
    with pytest.raises(RevocationError, match="cannot read the CA file") as exc:
        RevocationList.load(crl_path, ca_file=tmp_path / "no-ca.crt")
    assert str(crl_path) in str(exc.value)
    assert str(tmp_path / "no-ca.crt") in str(exc.value)
    with pytest.raises(RevocationError, match="holds no PEM certificate"):
        RevocationList.load(crl_path, ca_file=crl_path)


def test_incomplete_crls_are_refused(pki: Path, tmp_path: Path) -> None:
    idp = {
        "indirect": x509.IssuingDistributionPoint(None, None, False, False, None, True, False),
        "some revocation reasons": x509.IssuingDistributionPoint(
            None, None, False, False, frozenset({x509.ReasonFlags.key_compromise}), False, False
        ),
        "end-entity": x509.IssuingDistributionPoint(None, None, False, True, None, False, False),
    }
    builders = {
        name: x509.CertificateRevocationListBuilder().add_extension(ext, critical=True)
        for name, ext in idp.items()
    }
    builders["delta"] = x509.CertificateRevocationListBuilder().add_extension(
        x509.DeltaCRLIndicator(1), critical=True
    )
    for name, builder in builders.items():
        path = tmp_path / "crl.pem"
        path.write_bytes(_crl(pki, [7], builder=builder).public_bytes(serialization.Encoding.PEM))
        with pytest.raises(RevocationError, match=name) as exc:
            RevocationList.load(path, ca_file=pki / "ca.crt")
        assert str(path) in str(exc.value)


def test_revocation_error_pickles() -> None:
    err = RevocationError(Path("/x/crl.pem"), "bad signature")
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == str(err) == "CRL /x/crl.pem: bad signature"
    assert copy.reason == "bad signature"


# -- reload ---------------------------------------------------------------------------------


def test_reload_picks_up_a_new_revocation(pki: Path) -> None:
    crl = RevocationList.load(revoke_cert(pki, "sae-1"), ca_file=pki / "ca.crt")
    checker = RevocationChecker(crl)
    assert checker.is_revoked(_der(pki / "sae-1.crt"))
    assert not checker.is_revoked(_der(pki / "sae-2.crt"))
    revoke_cert(pki, "sae-2")
    assert crl.reload() is not crl
    assert not checker.is_revoked(_der(pki / "sae-2.crt"))  # not before the reload
    new = checker.reload()
    assert new is checker.current is not crl
    assert checker.is_revoked(_der(pki / "sae-1.crt"))  # earlier revocations are kept
    assert checker.is_revoked(_der(pki / "sae-2.crt"))
    assert not checker.is_revoked(_der(pki / "sae-3.crt"))
    assert not crl.is_revoked(_der(pki / "sae-2.crt"))  # a snapshot never changes


def test_failed_reload_keeps_the_old_list(pki: Path, tmp_path: Path) -> None:
    crl_path = revoke_cert(pki, "sae-1")
    checker = RevocationChecker.from_file(crl_path, ca_file=pki / "ca.crt")
    before = checker.current
    assert before is not None
    other = tmp_path / "other"
    init_ca(other)  # same CA name, other key
    issue_cert(other, "x")
    foreign = revoke_cert(other, "x").read_bytes()

    def broken_files() -> list[tuple[str, str]]:
        return [("", "empty"), ("garbage", "not a CRL"), ("foreign", "bad signature")]

    for content, reason in broken_files():
        if content == "foreign":
            crl_path.write_bytes(foreign)
        else:
            crl_path.write_text(content)
        with pytest.raises(RevocationError, match=reason) as exc:
            checker.reload()
        assert str(crl_path) in str(exc.value)
        assert checker.current is before
        assert checker.is_revoked(_der(pki / "sae-1.crt"))
    crl_path.unlink()
    with pytest.raises(RevocationError, match="cannot read the file"):
        checker.reload()
    assert checker.current is before
    assert checker.is_revoked(_der(pki / "sae-1.crt"))
    revoke_cert(pki, "sae-3")  # a good file again: the next reload succeeds
    checker.reload()
    assert checker.is_revoked(_der(pki / "sae-3.crt"))
    assert not checker.is_revoked(_der(pki / "sae-1.crt"))  # the CRL was recreated


def test_checker_without_list_and_odd_certificates(pki: Path) -> None:
    off = RevocationChecker.from_file(None)
    assert off.current is None
    assert off.reload() is None
    assert not off.is_revoked(_der(pki / "sae-1.crt"))
    assert not off.is_revoked(None)
    on = RevocationChecker.from_file(revoke_cert(pki, "sae-1"))
    assert not on.is_revoked(None)
    assert on.is_revoked(b"not a certificate")  # fail closed
    with pytest.raises(ValueError):
        assert on.current is not None and on.current.is_revoked(b"not a certificate")
    previous = on.swap(None)
    assert previous is not None and previous.is_revoked(_der(pki / "sae-1.crt"))
    assert not on.is_revoked(_der(pki / "sae-1.crt"))


@pytest.mark.system  # ~10 s of concurrent reloads: make test-system
def test_concurrent_reloads_and_checks(pki: Path) -> None:
    checker = RevocationChecker.from_file(revoke_cert(pki, "sae-1"), ca_file=pki / "ca.crt")
    sae1 = _der(pki / "sae-1.crt")
    failures: list[str] = []
    stop = threading.Event()

    def check() -> None:
        while not stop.is_set():
            if not checker.is_revoked(sae1):
                failures.append("sae-1 seen as not revoked")

    def reload() -> None:
        for _ in range(20):
            checker.reload()

    readers = [threading.Thread(target=check) for _ in range(4)]
    writers = [threading.Thread(target=reload) for _ in range(2)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert failures == []


# -- test PKI: revoke_cert and `qkdnode pki revoke` ----------------------------------------


def test_revoke_cert_keeps_earlier_entries_and_counts(pki: Path) -> None:
    revoke_cert(pki, "sae-1")
    revoke_cert(pki, "sae-2")
    revoke_cert(pki, "sae-2")  # twice: listed once, CRL re-signed
    crl = x509.load_pem_x509_crl((pki / "crl.pem").read_bytes())
    assert crl.is_signature_valid(_ca(pki)[1].public_key())
    serials = sorted(e.serial_number for e in crl)
    expected = sorted(
        x509.load_pem_x509_certificate((pki / f"{cn}.crt").read_bytes()).serial_number
        for cn in ("sae-1", "sae-2")
    )
    assert serials == expected
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 3
    assert sorted(p.name for p in pki.iterdir() if p.name.startswith((".", "crl"))) == ["crl.pem"]


def test_revoke_cert_errors(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="no certificate"):
        revoke_cert(pki, "nobody")
    with pytest.raises(PkiError, match="invalid common name"):
        revoke_cert(pki, "../sae-1")
    other = tmp_path / "other"
    init_ca(other)
    issue_cert(other, "x")
    (pki / "x.crt").write_bytes((other / "x.crt").read_bytes())
    with pytest.raises(PkiError, match="not a certificate of the CA") as exc:
        revoke_cert(pki, "x")
    assert str(pki / "x.crt") in str(exc.value)
    (pki / "crl.pem").write_bytes(revoke_cert(other, "x").read_bytes())
    with pytest.raises(PkiError, match="was not issued by the CA") as exc:
        revoke_cert(pki, "sae-1")
    assert str(pki / "crl.pem") in str(exc.value)


def test_pki_revoke_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pki"
    assert main(["pki", "init", "--out", str(out)]) == 0
    assert main(["pki", "issue", "--out", str(out), "--cn", "sae-1"]) == 0
    assert main(["pki", "issue", "--out", str(out), "--cn", "sae-2"]) == 0
    capsys.readouterr()
    assert main(["pki", "revoke", "--out", str(out), "--cn", "sae-1"]) == 0
    assert str(out / "crl.pem") in capsys.readouterr().out
    assert main(["pki", "revoke", "--out", str(out), "--cn", "sae-2"]) == 0
    crl = RevocationList.load(out / "crl.pem", ca_file=out / "ca.crt")
    assert crl.is_revoked(_der(out / "sae-1.crt"))
    assert crl.is_revoked(_der(out / "sae-2.crt"))
    assert "PRIVATE" not in capsys.readouterr().out


def test_pki_revoke_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pki"
    assert main(["pki", "revoke", "--out", str(out), "--cn", "sae-1"]) == 2  # no CA
    assert str(out / "ca.crt") in capsys.readouterr().err
    assert main(["pki", "init", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["pki", "revoke", "--out", str(out), "--cn", "sae-1"]) == 2  # no such cert
    assert str(out / "sae-1.crt") in capsys.readouterr().err
    assert main(["pki", "revoke", "--out", str(out), "--cn", "../evil"]) == 2
    assert "invalid common name" in capsys.readouterr().err
    assert not (out / "crl.pem").exists()
    with pytest.raises(SystemExit) as exc:
        main(["pki", "revoke", "--out", str(out)])  # --cn missing
    assert exc.value.code == 2
