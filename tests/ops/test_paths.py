"""Resolution of config, state and credential paths, in and outside systemd."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qkdnode.paths import (
    PathResolutionError,
    config_path,
    credential_path,
    read_credential,
    state_dir,
)


def test_state_dir_outside_systemd_is_the_configured_path() -> None:
    assert state_dir(Path("state"), environ={}) == Path("state")
    assert state_dir(Path("/srv/qkd/state"), environ={}) == Path("/srv/qkd/state")


def test_state_dir_under_systemd_replaces_a_relative_path(tmp_path: Path) -> None:
    env = {"STATE_DIRECTORY": f"{tmp_path}/transmitter:{tmp_path}/other"}
    assert state_dir(Path("state"), environ=env) == tmp_path / "transmitter"
    # An absolute path in the config is an explicit choice and wins.
    assert state_dir(Path("/srv/qkd"), environ=env) == Path("/srv/qkd")


def test_config_path_explicit_paths_are_used_as_given(tmp_path: Path) -> None:
    env = {"CONFIGURATION_DIRECTORY": str(tmp_path)}
    assert config_path("./tx.toml", environ=env) == Path("./tx.toml")
    assert config_path("/etc/other/tx.toml", environ=env) == Path("/etc/other/tx.toml")
    assert config_path("configs/tx.toml", environ={}) == Path("configs/tx.toml")


def test_config_path_bare_name_looks_in_configuration_directory(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (second / "receiver.toml").write_text("")
    env = {"CONFIGURATION_DIRECTORY": f"{first}:{second}"}
    # The instance name %i, without suffix, as the unit passes it.
    assert config_path("transmitter", environ=env) == first / "transmitter.toml"
    assert config_path("transmitter.toml", environ=env) == first / "transmitter.toml"
    # Found in the second directory.
    assert config_path("receiver", environ=env) == second / "receiver.toml"
    assert config_path(None, environ=env) == first / "node.toml"


def test_config_path_bare_name_outside_systemd_is_relative_to_cwd() -> None:
    assert config_path("transmitter", environ={}) == Path("transmitter.toml")
    with pytest.raises(PathResolutionError, match="CONFIGURATION_DIRECTORY"):
        config_path(None, environ={})


def test_credential_from_credentials_directory(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "curve.key").write_bytes(b"secret-z85")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    fallback = tmp_path / "elsewhere.key"
    assert credential_path("curve.key", fallback, environ=env) == creds / "curve.key"
    assert credential_path("curve.key", None, environ=env) == creds / "curve.key"
    # Not passed by the unit: the config file's path.
    assert credential_path("auth.psk", fallback, environ=env) == fallback
    # Not passed and not configured: the credential path, so the open error names it.
    assert credential_path("auth.psk", None, environ=env) == creds / "auth.psk"


def test_empty_credential_counts_as_not_given(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "tls.key").write_bytes(b"")  # SetCredential=tls.key: default
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    fallback = tmp_path / "tls.key"
    assert credential_path("tls.key", fallback, environ=env) == fallback
    with pytest.raises(PathResolutionError, match="empty"):
        read_credential("tls.key", None, environ=env)


def test_credential_outside_systemd(tmp_path: Path) -> None:
    key = tmp_path / "auth.psk"
    key.write_bytes(b"\x01\x02")
    key.chmod(0o600)
    assert credential_path("auth.psk", key, environ={}) == key
    assert read_credential("auth.psk", key, environ={}) == b"\x01\x02"
    with pytest.raises(PathResolutionError, match=r"LoadCredential=auth\.psk"):
        credential_path("auth.psk", None, environ={})


@pytest.mark.parametrize("name", ["", "../etc/shadow", "a/b", ".", ".."])
def test_credential_name_must_be_a_file_name(name: str) -> None:
    with pytest.raises(ValueError):
        credential_path(name, Path("/x"), environ={})


def test_read_credential_refuses_a_world_readable_secret(tmp_path: Path) -> None:
    key = tmp_path / "curve.key"
    key.write_bytes(b"do-not-print-me")
    key.chmod(0o644)
    with pytest.raises(PathResolutionError) as err:
        read_credential("curve.key", key, environ={})
    assert "chmod 600" in str(err.value)
    assert "do-not-print-me" not in str(err.value)


def test_read_credential_missing_file_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.key"
    with pytest.raises(PathResolutionError, match=re.escape(str(missing))):
        read_credential("curve.key", missing, environ={})
