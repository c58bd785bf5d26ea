"""CURVE key pairs: generate, write, and load from files or systemd credentials.

Files hold one Z85 key (40 characters) and a newline: ``NAME.key`` the secret key
(mode 0600), ``NAME.pub`` the public key. Certificate files written by
``zmq.auth.create_certificates`` (``public-key = "..."`` / ``secret-key = "..."``) are
accepted too. Errors name the file, never the key.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import zmq

from qkdnode.bus.errors import KeyFileError

Z85_KEY_LEN = 40
_Z85_RE = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")
_CERT_RE = re.compile(r'^\s*(public|secret)-key\s*=\s*"([^"]{40})"\s*$', re.MULTILINE)
SECRET_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"
CREDENTIAL_SERVER_KEY = "curve.key"


def is_z85_key(text: str) -> bool:
    return bool(_Z85_RE.match(text))


def generate_keypair() -> tuple[bytes, bytes]:
    """Return ``(public, secret)`` as Z85 bytes."""
    public, secret = zmq.curve_keypair()
    return public, secret


def public_from_secret(secret: bytes) -> bytes:
    return zmq.curve_public(secret)


def write_keypair(out_dir: str | Path, name: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``NAME.key`` (0600) and ``NAME.pub`` into ``out_dir``; return both paths."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name) or name.startswith("."):
        raise KeyFileError(f"invalid key name {name!r}: use letters, digits, '_', '.', '-'")
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    secret_path = directory / f"{name}{SECRET_SUFFIX}"
    public_path = directory / f"{name}{PUBLIC_SUFFIX}"
    if not overwrite and (secret_path.exists() or public_path.exists()):
        raise KeyFileError(f"{secret_path} or {public_path} exists (use --force to replace)")
    public, secret = generate_keypair()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(secret_path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, secret + b"\n")
    finally:
        os.close(fd)
    public_path.write_bytes(public + b"\n")
    return secret_path, public_path


def parse_key_text(text: str, kind: str, source: str) -> bytes:
    """Extract a Z85 key of ``kind`` ("public" or "secret") from file text."""
    stripped = text.strip()
    if is_z85_key(stripped):
        return stripped.encode("ascii")
    for match in _CERT_RE.finditer(text):
        if match.group(1) == kind and is_z85_key(match.group(2)):
            return match.group(2).encode("ascii")
    raise KeyFileError(f"{source}: no Z85 {kind} key found (expected 40 Z85 characters)")


def _read(path: Path) -> str:
    try:
        return path.read_text("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise KeyFileError(f"{path}: cannot read key file: {reason}") from None


def load_secret_key(path: str | Path) -> bytes:
    """Load a Z85 secret key; warns nothing, but refuses group/world-readable files."""
    p = Path(path)
    text = _read(p)
    mode = p.stat().st_mode
    if mode & 0o077:
        raise KeyFileError(f"{p}: secret key file must not be group/world accessible (chmod 600)")
    secret = parse_key_text(text, "secret", str(p))
    public_from_secret(secret)  # validates the key
    return secret


def load_public_key(path_or_key: str | Path) -> bytes:
    """A Z85 public key given inline or as a file path (``.pub`` or certificate)."""
    if isinstance(path_or_key, str) and is_z85_key(path_or_key.strip()):
        return path_or_key.strip().encode("ascii")
    p = Path(path_or_key)
    return parse_key_text(_read(p), "public", str(p))


def load_keypair(path: str | Path) -> tuple[bytes, bytes]:
    """``(public, secret)`` from a secret key file (``NAME`` or ``NAME.key``)."""
    p = Path(path)
    if not p.exists() and p.suffix != SECRET_SUFFIX:
        p = p.with_name(p.name + SECRET_SUFFIX)
    secret = load_secret_key(p)
    return public_from_secret(secret), secret


def credentials_dir() -> Path | None:
    """systemd's ``$CREDENTIALS_DIRECTORY`` (LoadCredential=/SetCredential=), if set."""
    value = os.environ.get("CREDENTIALS_DIRECTORY")
    return Path(value) if value else None


def load_credential_secret(name: str = CREDENTIAL_SERVER_KEY) -> bytes | None:
    """The secret key stored as systemd credential ``name``, or None when not provided."""
    directory = credentials_dir()
    if directory is None or not (directory / name).exists():
        return None
    path = directory / name
    return parse_key_text(_read(path), "secret", f"credential {name!r}")


def resolve_server_secret(secret_key_file: Path | None) -> bytes | None:
    """This node's secret key: the configured file, else credential ``curve.key``."""
    if secret_key_file is not None:
        return load_secret_key(secret_key_file)
    return load_credential_secret(CREDENTIAL_SERVER_KEY)


def find_client_key(name: str) -> tuple[bytes, bytes]:
    """Resolve ``--client-key NAME``: a path, or NAME.key in the usual key directories.

    Searched in order: the path itself, ``$QKDNODE_KEY_DIR``, ``$CREDENTIALS_DIRECTORY``,
    ``~/.config/qkdnode/keys``.
    """
    candidates = [Path(name), Path(name + SECRET_SUFFIX)]
    dirs = [os.environ.get("QKDNODE_KEY_DIR"), os.environ.get("CREDENTIALS_DIRECTORY")]
    dirs.append(str(Path.home() / ".config" / "qkdnode" / "keys"))
    for d in dirs:
        if d:
            candidates += [Path(d) / name, Path(d) / (name + SECRET_SUFFIX)]
    for c in candidates:
        if c.is_file():
            return load_keypair(c)
    raise KeyFileError(
        f"client key {name!r} not found (looked for {name}{SECRET_SUFFIX} "
        "in ., $QKDNODE_KEY_DIR, $CREDENTIALS_DIRECTORY, ~/.config/qkdnode/keys)"
    )
