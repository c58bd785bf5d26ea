"""A small test PKI for local runs: one CA, server and client certificates (ECDSA P-256),
and a CRL of revoked certificates.

Not for production: real deployments use the operator's PKI. Private keys are written with
mode 0600 and never logged.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT_NAME = "ca.crt"
CA_KEY_NAME = "ca.key"


class PkiError(Exception):
    """A CA or certificate cannot be created or loaded."""


@dataclass(frozen=True)
class IssuedFiles:
    cert_file: Path
    key_file: Path


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def init_ca(
    out_dir: Path, *, common_name: str = "qkdnode test CA", days: int = 3650
) -> IssuedFiles:
    """Create ``ca.crt`` and ``ca.key`` in ``out_dir``; refuses to overwrite an existing CA."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out_dir / CA_CERT_NAME, out_dir / CA_KEY_NAME
    if cert_path.exists() or key_path.exists():
        raise PkiError(f"a CA already exists in {out_dir}")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return IssuedFiles(cert_path, key_path)


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT_NAME).read_bytes())
        key = serialization.load_pem_private_key((ca_dir / CA_KEY_NAME).read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot load the CA from {ca_dir}: {type(exc).__name__}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"the CA key in {ca_dir} is not an EC key")
    return cert, key


def issue_cert(
    ca_dir: Path,
    common_name: str,
    *,
    out_dir: Path | None = None,
    server: bool = False,
    sans: list[str] | None = None,
    days: int = 825,
) -> IssuedFiles:
    """Issue ``<cn>.crt``/``<cn>.key`` signed by the CA in ``ca_dir``.

    A client certificate (default) has extended key usage clientAuth; ``server=True`` adds
    serverAuth and the subject alternative names ``sans`` (IP addresses or DNS names;
    default: the CN).
    """
    if not common_name or "/" in common_name or common_name.startswith("."):
        raise PkiError(f"invalid common name {common_name!r}")
    ca_cert, ca_key = _load_ca(ca_dir)
    out = out_dir or ca_dir
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    names: list[x509.GeneralName] = []
    for san in sans or ([common_name] if server else []):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            names.append(x509.DNSName(san))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = out / f"{common_name}.crt", out / f"{common_name}.key"
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return IssuedFiles(cert_path, key_path)


CRL_NAME = "crl.pem"
CRL_VALIDITY = dt.timedelta(days=30)


def _load_crl(crl_path: Path, ca_cert: x509.Certificate) -> x509.CertificateRevocationList:
    try:
        crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot load the CRL {crl_path}: {type(exc).__name__}") from None
    key = ca_cert.public_key()
    if (
        crl.issuer != ca_cert.subject
        or not isinstance(key, ec.EllipticCurvePublicKey)
        or not crl.is_signature_valid(key)
    ):
        raise PkiError(
            f"the CRL {crl_path} was not issued by the CA {ca_cert.subject.rfc4514_string()!r}"
        )
    return crl


def revoke_cert(pki_dir: Path, cn: str) -> Path:
    """Add ``<pki_dir>/<cn>.crt`` to the CRL ``<pki_dir>/crl.pem`` and return the CRL's path.

    The CRL is signed by the CA in ``pki_dir``, created if absent, keeps every earlier
    revocation, gets the next CRL number and is valid for 30 days (``next_update``).
    Revoking a certificate twice only re-signs the CRL. The file is replaced atomically, so
    a daemon reloading it never reads half a CRL.

    Raises :class:`PkiError` (naming the file) for an invalid common name, a missing
    certificate or CA file, a certificate not issued by this CA, or an existing CRL that
    cannot be read or was not issued by this CA; ``OSError`` when the CRL cannot be written.
    """
    if not cn or "/" in cn or cn.startswith("."):
        raise PkiError(f"invalid common name {cn!r}")
    cert_path = pki_dir / f"{cn}.crt"
    for needed in (pki_dir / CA_CERT_NAME, pki_dir / CA_KEY_NAME):
        if not needed.is_file():
            raise PkiError(f"no CA: {needed} does not exist")
    if not cert_path.is_file():
        raise PkiError(f"no certificate {cert_path}")
    ca_cert, ca_key = _load_ca(pki_dir)
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert.verify_directly_issued_by(ca_cert)
    except (OSError, ValueError, TypeError) as exc:
        raise PkiError(
            f"{cert_path} is not a certificate of the CA in {pki_dir}: {type(exc).__name__}"
        ) from None
    except InvalidSignature:
        raise PkiError(f"{cert_path} is not a certificate of the CA in {pki_dir}") from None

    crl_path = pki_dir / CRL_NAME
    previous: list[x509.RevokedCertificate] = []
    number = 1
    if crl_path.exists():
        old = _load_crl(crl_path, ca_cert)
        previous = list(old)
        try:
            number = old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
        except x509.ExtensionNotFound:
            number = 1
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + CRL_VALIDITY)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    for entry in previous:
        builder = builder.add_revoked_certificate(entry)
    if all(entry.serial_number != cert.serial_number for entry in previous):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(now)
            .build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    tmp_path = crl_path.with_name(f".{CRL_NAME}.tmp")
    try:
        tmp_path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        os.replace(tmp_path, crl_path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return crl_path
