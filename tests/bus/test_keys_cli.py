"""``qkdnode keys`` and ``qkdnode ctl`` as real subprocesses; key loading helpers."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import zmq

from qkdnode.bus.errors import KeyFileError
from qkdnode.bus.keys import (
    find_client_key,
    load_credential_secret,
    load_keypair,
    load_public_key,
    load_secret_key,
    resolve_server_secret,
    write_keypair,
)
from qkdnode.cli.ctl_render import render_view
from qkdnode.client import TelemetryEvent
from tests.bus.conftest import DevProc


def qkdnode(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qkdnode", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_gen_curve_writes_usable_pair(tmp_path: Path) -> None:
    r = qkdnode("keys", "gen-curve", "--out", str(tmp_path / "k"), "--name", "op", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    secret_file, public_file = Path(info["secret_file"]), Path(info["public_file"])
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    public, secret = load_keypair(secret_file)
    assert public == load_public_key(public_file) == info["public_key"].encode()
    assert zmq.curve_public(secret) == public
    assert secret.decode() not in r.stdout  # the secret is never printed
    again = qkdnode("keys", "gen-curve", "--out", str(tmp_path / "k"), "--name", "op")
    assert again.returncode == 2 and "exists" in again.stderr
    pub = qkdnode("keys", "public", str(secret_file))
    assert pub.returncode == 0 and pub.stdout.strip() == public.decode()


def test_key_loading_errors_never_show_keys(tmp_path: Path) -> None:
    secret_path, public_path = write_keypair(tmp_path, "srv")
    secret = secret_path.read_text().strip()
    os.chmod(secret_path, 0o644)
    with pytest.raises(KeyFileError, match="group/world") as info:
        load_secret_key(secret_path)
    assert secret not in str(info.value)
    bad = tmp_path / "bad.key"
    bad.write_text("not a key but a secret-ish string 1234567890\n")
    os.chmod(bad, 0o600)
    with pytest.raises(KeyFileError, match="no Z85 secret key") as info:
        load_secret_key(bad)
    assert "1234567890" not in str(info.value)
    with pytest.raises(KeyFileError, match="cannot read"):
        load_secret_key(tmp_path / "missing.key")
    with pytest.raises(KeyFileError, match="invalid key name"):
        write_keypair(tmp_path, "../evil")


def test_zmq_certificate_format_and_credentials(tmp_path: Path, monkeypatch: Any) -> None:
    import zmq.auth

    pub_file, sec_file = zmq.auth.create_certificates(str(tmp_path), "cert")
    os.chmod(sec_file, 0o600)
    public, secret = zmq.auth.load_certificate(sec_file)
    assert load_secret_key(sec_file) == secret
    assert load_public_key(pub_file) == public
    creds = tmp_path / "creds"
    creds.mkdir()
    write_keypair(creds, "curve")
    (creds / "curve.key").rename(creds / "curve.key.tmp")
    (creds / "curve.key.tmp").rename(creds / "curve.key")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert load_credential_secret() == (creds / "curve.key").read_bytes().strip()
    assert resolve_server_secret(None) == load_credential_secret()
    assert resolve_server_secret(Path(sec_file)) == secret
    monkeypatch.setenv("QKDNODE_KEY_DIR", str(tmp_path))
    write_keypair(tmp_path, "me")
    assert find_client_key("me") == load_keypair(tmp_path / "me.key")
    with pytest.raises(KeyFileError, match="not found"):
        find_client_key("nobody")


def run_ctl(capsys: Any, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``qkdnode ctl`` in-process (same parser and handlers as the CLI)."""
    import argparse

    from qkdnode.cli import ctl_cmd

    parser = argparse.ArgumentParser(prog="qkdnode")
    ctl_cmd.register(parser.add_subparsers(dest="command"))
    capsys.readouterr()
    try:
        args = parser.parse_args(argv)
        code = args.func(args)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out.out, out.err)


def test_ctl_against_curve_devserver(
    tmp_path: Path, devserver: Any, capsys: Any, monkeypatch: Any
) -> None:
    write_keypair(tmp_path, "srv")
    write_keypair(tmp_path, "op")
    write_keypair(tmp_path, "mon")
    pub = {n: (tmp_path / f"{n}.pub").read_text().strip() for n in ("srv", "op", "mon")}
    dp: DevProc = devserver(
        "--secret-key",
        str(tmp_path / "srv.key"),
        "--client",
        f"op:operator:{pub['op']}",
        "--client",
        f"mon:monitor:{pub['mon']}",
        "--telemetry-hz",
        "20",
    )
    env = dict(os.environ, QKDNODE_KEY_DIR=str(tmp_path))
    monkeypatch.setenv("QKDNODE_KEY_DIR", str(tmp_path))
    base = [
        "ctl",
        "--endpoint",
        dp.control,
        "--telemetry-endpoint",
        dp.telemetry,
        "--server-key",
        str(tmp_path / "srv.pub"),
    ]

    def ctl(key: str, *args: str) -> subprocess.CompletedProcess[str]:
        return run_ctl(capsys, [*base, "--client-key", key, *args])

    # once through the real entry point, the rest in-process
    r = qkdnode(*base, "--client-key", "op", "status", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "idle"
    r = ctl("op", "status", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "idle"
    assert "state: idle" in ctl("mon", "status").stdout
    r = ctl("mon", "start", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["code"] == "forbidden"
    r = ctl("mon", "start")
    assert r.returncode == 1 and "forbidden" in r.stderr and "monitor" in r.stderr
    assert json.loads(ctl("op", "start", "--json").stdout) == {"state": "running"}
    r = ctl("op", "keys", "--number", "2", "--size-bits", "64", "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)["keys"]) == 2
    lines = ctl("op", "keys", "--number", "3", "--size-bits", "64").stdout.splitlines()
    assert len(lines) == 3 and all(len(base64.b64decode(line.split()[1])) == 8 for line in lines)
    assert ctl("op", "keys", "--size-bits", "7").returncode == 2
    r = ctl("op", "calibrate", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["details"]["state"] == "running"
    assert json.loads(ctl("op", "stop", "--json").stdout) == {"state": "idle"}
    assert json.loads(ctl("op", "calibrate", "--json").stdout)["ok"] is True
    assert json.loads(ctl("op", "sync", "--json").stdout)["synchronized"] is True
    r = ctl("op", "call", "echo", "--content", '{"a": [1, 2]}', "--json")
    assert json.loads(r.stdout) == {"a": [1, 2]}
    r = ctl("mon", "watch", "--count", "5")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(events) == 5 and events[0]["kind"] == "snapshot"
    assert {e["kind"] for e in events} <= {"snapshot", "delta"}
    # an unlisted key: no answer, clean failure
    write_keypair(tmp_path, "stranger")
    r = run_ctl(capsys, [*base, "--client-key", "stranger", "--timeout", "0.5", "status"])
    assert r.returncode == 1 and "timeout" in r.stderr
    r = ctl("missing", "status")
    assert r.returncode == 2 and "not found" in r.stderr


def test_render_view() -> None:
    values = {
        "rates.count": TelemetryEvent("delta", "rates.count", 3, 0.0, {"hz": 1.5e5}),
        "state": TelemetryEvent("snapshot", "state", 2, 0.0, {"new": "running"}),
    }
    text = render_view(values, 3, False, "tcp://x")
    lines = text.splitlines()
    assert "seq 3" in lines[0] and "STALE" not in lines[0]
    assert lines[2].startswith("rates.count") and "hz=150000" in lines[2]
    assert lines[3].startswith("state") and "new=running" in lines[3]
    assert "STALE" in render_view(values, 3, True, "tcp://x")
