"""Where a node finds its configuration, state and credentials.

Under systemd the unit's ``ConfigurationDirectory=``, ``StateDirectory=`` and
``LoadCredential=`` settings export ``$CONFIGURATION_DIRECTORY``, ``$STATE_DIRECTORY`` and
``$CREDENTIALS_DIRECTORY`` (systemd.exec(5)). Outside systemd the same functions fall back
to the explicit paths of the command line and the config file, so development, tests and
the service use one code path.

Each variable may hold several colon-separated directories (one per directory named in
the unit); the first one is this node's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

DEFAULT_CONFIG_NAME = "node.toml"
CONFIG_SUFFIX = ".toml"


class PathResolutionError(Exception):
    """A configuration, state or credential path cannot be determined."""


def _env_dirs(name: str, environ: Mapping[str, str] | None) -> list[Path]:
    env = os.environ if environ is None else environ
    raw = env.get(name, "")
    return [Path(p) for p in raw.split(":") if p]


def state_dir(cfg_state_dir: Path, *, environ: Mapping[str, str] | None = None) -> Path:
    """The node's state directory (key store, calibration results).

    An absolute ``node.state_dir`` in the config is an explicit choice and always wins.
    A relative one (the default is ``state``) is replaced by ``$STATE_DIRECTORY`` under
    systemd (``StateDirectory=qkdnode/%i`` -> ``/var/lib/qkdnode/<instance>``) and is used
    as given, relative to the working directory, otherwise.
    """
    if cfg_state_dir.is_absolute():
        return cfg_state_dir
    dirs = _env_dirs("STATE_DIRECTORY", environ)
    if dirs:
        return dirs[0]
    return cfg_state_dir


def config_path(arg: str | None, *, environ: Mapping[str, str] | None = None) -> Path:
    """The config file named by ``--config``.

    - a path with a directory part (``./tx.toml``, ``/etc/qkdnode/tx.toml``) is used as is;
    - a bare name (``transmitter`` or ``transmitter.toml``; ``.toml`` is appended when the
      name has no suffix) is looked up in ``$CONFIGURATION_DIRECTORY`` when set, and in the
      working directory otherwise;
    - nothing means ``$CONFIGURATION_DIRECTORY/node.toml``.

    Raises :class:`PathResolutionError` when nothing is given outside systemd.
    """
    dirs = _env_dirs("CONFIGURATION_DIRECTORY", environ)
    if arg is None or arg == "":
        if not dirs:
            raise PathResolutionError(
                "no config file given (--config) and $CONFIGURATION_DIRECTORY is not set"
            )
        name = DEFAULT_CONFIG_NAME
    else:
        given = Path(arg)
        if given.name != arg or arg in (".", ".."):
            return given
        name = arg if given.suffix else arg + CONFIG_SUFFIX
    if not dirs:
        return Path(name)
    for d in dirs:
        candidate = d / name
        if candidate.exists():
            return candidate
    return dirs[0] / name


def _non_empty_file(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def credential_path(
    name: str, fallback: Path | None, *, environ: Mapping[str, str] | None = None
) -> Path:
    """The file holding secret ``name`` (``curve.key``, ``tls.key``, ``auth.psk``).

    ``$CREDENTIALS_DIRECTORY/name`` when systemd passed the credential
    (``LoadCredential=name:/etc/credstore/...``); otherwise ``fallback``, the path from
    the config file. An empty credential file counts as not given. When systemd passed a
    credential directory without this name and no fallback is configured, the (missing)
    credential path is returned so the error when opening it names what the unit should
    provide.

    Raises :class:`PathResolutionError` when there is neither a credential directory nor
    a fallback.
    """
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"invalid credential name {name!r}")
    dirs = _env_dirs("CREDENTIALS_DIRECTORY", environ)
    if dirs:
        candidate = dirs[0] / name
        if fallback is None or _non_empty_file(candidate):
            return candidate
        return fallback
    if fallback is None:
        raise PathResolutionError(
            f"secret {name!r} not configured: set its file in the config or pass it as a "
            f"systemd credential (LoadCredential={name}:...)"
        )
    return fallback


def read_credential(
    name: str, fallback: Path | None, *, environ: Mapping[str, str] | None = None
) -> bytes:
    """The bytes of secret ``name`` (see :func:`credential_path`).

    Refuses a file that other users can read (a secret key must be mode 0600 or 0400);
    systemd's credential files always pass. Errors name the path, never the content.
    """
    path = credential_path(name, fallback, environ=environ)
    try:
        with path.open("rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if mode & 0o007:
                raise PathResolutionError(
                    f"secret file {path} is readable by other users "
                    f"(mode {mode & 0o777:o}); run: chmod 600 {path}"
                )
            data = f.read()
    except OSError as exc:
        raise PathResolutionError(
            f"cannot read secret {name!r} from {path}: {exc.strerror or exc}"
        ) from None
    if not data:
        raise PathResolutionError(f"secret {name!r} in {path} is empty")
    return data


class InsecureFileError(PathResolutionError):
    """A file holding key material is readable or writable by other users."""


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed; every directory this call creates is mode
    0700 whatever the process umask. An existing directory is left as it is (systemd's
    ``StateDirectory=`` makes it 0700). Raises OSError naming the path."""
    missing = []
    p = path
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True, mode=0o700)
        os.chmod(d, 0o700)
    return path


def create_private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 (whatever the umask) if it does not exist, in a
    directory made by :func:`private_dir`."""
    private_dir(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def check_private_file(path: Path, what: str) -> None:
    """Refuse (:class:`InsecureFileError`, naming ``path``) a file that other users may
    read or write: key material must be 0600 or 0400. A missing file passes."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    if mode & 0o077:
        raise InsecureFileError(
            f"{what} {path} is accessible to other users (mode {mode & 0o777:o}); "
            f"run: chmod 600 {path}"
        )
