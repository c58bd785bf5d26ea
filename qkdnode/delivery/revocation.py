"""Revocation of SAE client certificates: a CRL file to check ETSI 014 callers against.

The key-delivery server authenticates SAEs with client certificates (mutual TLS). An
operator revokes a certificate by putting it on a certificate revocation list (CRL) issued by
the same CA; the file is meant to be loaded at start and again on reload (SIGHUP).

:class:`RevocationList` is one immutable snapshot of a CRL file. :class:`RevocationChecker`
holds the current snapshot (or none: revocation checking off), swaps it atomically on reload
and keeps the previous one when the new file is unusable.

One CRL file holds one complete CRL of one CA. Delta CRLs, indirect CRLs and CRLs that cover
only some revocation reasons or only CA/attribute certificates are refused: using them as if
they were complete would let revoked certificates through. A CRL past its ``next_update`` is
still used (see :meth:`RevocationList.is_stale`): an old list of revocations is better than
none, and refusing it would either drop revocations or stop all key delivery.
"""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

__all__ = ["RevocationChecker", "RevocationError", "RevocationList"]

_PEM_CRL_BEGIN = b"-----BEGIN X509 CRL-----"
# CA key types whose CRL signatures are checked (DSA is deprecated in cryptography).
_CA_KEY_TYPES = (
    ec.EllipticCurvePublicKey,
    rsa.RSAPublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
)


class RevocationError(ValueError):
    """A CRL file cannot be used; the message names the file and what was wrong.

    ``path`` is the CRL file, ``reason`` the problem without the path.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"CRL {path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[type[RevocationError], tuple[Path, str]]:
        return (type(self), (self.path, self.reason))


def _authority_key_id(extensions: x509.Extensions) -> bytes | None:
    try:
        aki = extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    return aki.key_identifier


@dataclass(frozen=True)
class RevocationList:
    """The revoked serial numbers of one CA, read from a CRL file (PEM or DER).

    A certificate is revoked when its issuer name equals :attr:`issuer`, its serial number is
    in :attr:`serials` and, when both the certificate and the CRL name the issuing key
    (authority key identifier), the key identifiers match, so a certificate of another CA
    that happens to have the same name and serial number is not taken for a revoked one.
    """

    path: Path
    ca_file: Path | None
    issuer: x509.Name
    authority_key_id: bytes | None
    serials: frozenset[int]
    last_update: dt.datetime
    next_update: dt.datetime | None

    @classmethod
    def load(cls, path: Path, *, ca_file: Path | None = None) -> RevocationList:
        """Read and check the CRL file ``path``.

        With ``ca_file`` (PEM certificates, e.g. the server's client CA bundle) the CRL must
        be issued and signed by one of those CAs; without it the signature is not checked
        (the file is then trusted as the operator's).

        Raises :class:`RevocationError` (naming ``path``) when the file cannot be read, is
        not exactly one PEM or DER CRL, is a delta/indirect/partial CRL, or, with
        ``ca_file``, when the CA file cannot be read, no CA in it has the CRL's issuer name,
        the signature does not verify against any of them, or their keys are of a type
        other than EC, RSA, Ed25519 or Ed448.
        """
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise RevocationError(path, f"cannot read the file: {exc.strerror or exc}") from None
        crl = _parse_crl(path, data)
        if ca_file is not None:
            _verify_signature(path, crl, ca_file)
        _check_scope(path, crl)
        try:
            serials = frozenset(entry.serial_number for entry in crl)
            aki = _authority_key_id(crl.extensions)
        except ValueError as exc:
            raise RevocationError(path, f"malformed CRL: {exc}") from None
        return cls(
            path=path,
            ca_file=ca_file,
            issuer=crl.issuer,
            authority_key_id=aki,
            serials=serials,
            last_update=crl.last_update_utc,
            next_update=crl.next_update_utc,
        )

    def reload(self) -> RevocationList:
        """A fresh snapshot of the same file, checked against the same CA file.

        ``self`` is never changed: on failure (:class:`RevocationError`, as for :meth:`load`)
        the caller still holds the previous list.
        """
        return RevocationList.load(self.path, ca_file=self.ca_file)

    def is_revoked(self, cert_der: bytes) -> bool:
        """Whether the DER certificate ``cert_der`` is on this list.

        Raises ``ValueError`` when ``cert_der`` is not a DER certificate.
        """
        cert = x509.load_der_x509_certificate(cert_der)
        if cert.serial_number not in self.serials or cert.issuer != self.issuer:
            return False
        if self.authority_key_id is not None:
            cert_aki = _authority_key_id(cert.extensions)
            if cert_aki is not None and cert_aki != self.authority_key_id:
                return False
        return True

    def is_stale(self, now: dt.datetime | None = None) -> bool:
        """Whether the CRL is past its ``next_update`` (a CRL without one is never stale)."""
        if self.next_update is None:
            return False
        return (now or dt.datetime.now(dt.UTC)) > self.next_update


def _parse_crl(path: Path, data: bytes) -> x509.CertificateRevocationList:
    if not data.strip():
        raise RevocationError(path, "the file is empty")
    if b"-----BEGIN" in data:
        blocks = data.count(_PEM_CRL_BEGIN)
        if blocks == 0:
            raise RevocationError(path, "not a CRL: a PEM file without an 'X509 CRL' block")
        if blocks > 1:
            raise RevocationError(path, f"holds {blocks} CRLs; one CRL per file is supported")
        try:
            return x509.load_pem_x509_crl(data)
        except ValueError as exc:
            raise RevocationError(path, f"not a valid PEM CRL: {exc}") from None
    try:
        return x509.load_der_x509_crl(data)
    except ValueError:
        raise RevocationError(path, "not a CRL (neither PEM 'X509 CRL' nor DER)") from None


def _check_scope(path: Path, crl: x509.CertificateRevocationList) -> None:
    """Refuse CRLs that do not list every revoked end-entity certificate of their issuer."""
    try:
        crl_exts = [ext.value for ext in crl.extensions]
        entry_exts = [ext.value for entry in crl for ext in entry.extensions]
    except ValueError as exc:
        raise RevocationError(path, f"malformed CRL: {exc}") from None
    for value in crl_exts:
        if isinstance(value, x509.DeltaCRLIndicator):
            raise RevocationError(path, "a delta CRL; a complete CRL is needed")
        if isinstance(value, x509.IssuingDistributionPoint):
            if value.indirect_crl:
                raise RevocationError(path, "an indirect CRL; these are not supported")
            if value.only_some_reasons is not None:
                raise RevocationError(path, "covers only some revocation reasons")
            if value.only_contains_ca_certs or value.only_contains_attribute_certs:
                raise RevocationError(path, "does not cover end-entity certificates")
    if any(isinstance(value, x509.CertificateIssuer) for value in entry_exts):
        raise RevocationError(path, "an entry names another certificate issuer (indirect CRL)")


def _verify_signature(path: Path, crl: x509.CertificateRevocationList, ca_file: Path) -> None:
    try:
        cas = x509.load_pem_x509_certificates(ca_file.read_bytes())
    except OSError as exc:
        raise RevocationError(
            path, f"cannot read the CA file {ca_file}: {exc.strerror or exc}"
        ) from None
    except ValueError:
        raise RevocationError(path, f"the CA file {ca_file} holds no PEM certificate") from None
    issuers = [ca for ca in cas if ca.subject == crl.issuer]
    if not issuers:
        raise RevocationError(
            path, f"issued by {crl.issuer.rfc4514_string()!r}, which is not a CA in {ca_file}"
        )
    keys = [ca.public_key() for ca in issuers]
    usable = [key for key in keys if isinstance(key, _CA_KEY_TYPES)]
    if not usable:
        raise RevocationError(
            path,
            f"the CA {crl.issuer.rfc4514_string()!r} in {ca_file} has a key type whose "
            "signatures are not supported (EC, RSA, Ed25519 and Ed448 are)",
        )
    for key in usable:
        try:
            if crl.is_signature_valid(key):
                return
        except (ValueError, TypeError):
            continue
    raise RevocationError(
        path,
        f"bad signature: it does not verify against the CA {crl.issuer.rfc4514_string()!r} "
        f"in {ca_file}",
    )


class RevocationChecker:
    """The current :class:`RevocationList` (or none), swapped atomically on reload.

    Safe to use from several threads and from the event loop: :meth:`is_revoked` takes one
    reference to the current list, so a concurrent :meth:`reload` or :meth:`swap` never
    shows it a half-updated list. Reloads are serialised; file I/O happens outside the lock
    that :meth:`is_revoked` takes.
    """

    def __init__(self, crl: RevocationList | None = None) -> None:
        self._crl = crl
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()

    @classmethod
    def from_file(cls, path: Path | None, *, ca_file: Path | None = None) -> RevocationChecker:
        """A checker for the CRL file ``path`` (``None``: no revocation checking).

        Raises :class:`RevocationError` as :meth:`RevocationList.load` does.
        """
        return cls(None if path is None else RevocationList.load(path, ca_file=ca_file))

    @property
    def current(self) -> RevocationList | None:
        """The list in use, or ``None`` when revocation checking is off."""
        with self._lock:
            return self._crl

    def swap(self, crl: RevocationList | None) -> RevocationList | None:
        """Put ``crl`` in use (``None`` turns checking off); returns the previous list."""
        with self._lock:
            previous, self._crl = self._crl, crl
        return previous

    def reload(self) -> RevocationList | None:
        """Re-read the current list's file and put the new list in use.

        Returns the list now in use (``None``, and nothing is read, when checking is off).
        On failure the previous list stays in use and :class:`RevocationError` (naming the
        file and the problem: missing file, not a CRL, bad signature...) is raised.
        """
        with self._reload_lock:
            old = self.current
            if old is None:
                return None
            new = old.reload()
            self.swap(new)
            return new

    def is_revoked(self, cert_der: bytes | None) -> bool:
        """Whether the client certificate ``cert_der`` (DER) is revoked.

        ``None`` (no certificate; the TLS layer requires one) and any certificate while
        checking is off count as not revoked. A certificate that cannot be parsed counts as
        revoked (fail closed).
        """
        if cert_der is None:
            return False
        crl = self.current
        if crl is None:
            return False
        try:
            return crl.is_revoked(cert_der)
        except ValueError:
            return True
