"""``qkdnode config check`` refuses what ``qkdnode run`` would refuse, naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import zmq

ROOT = Path(__file__).resolve().parents[2]


def check(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qkdnode", "config", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def sim_config(tmp_path: Path, role: str = "receiver") -> str:
    text = (ROOT / "configs" / f"{role}.sim.toml").read_text()
    me = "bob" if role == "receiver" else "alice"
    return text.replace(f'state_dir = "state/{me}"', f'state_dir = "{tmp_path / me}"')


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(text)
    return p


def test_the_shipped_simulation_configs_pass(tmp_path: Path) -> None:
    for role in ("transmitter", "receiver"):
        r = check(write(tmp_path, sim_config(tmp_path, role)))
        assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    ("edit", "key", "message"),
    [
        (
            ('driver = "sim_time_tagger"', 'driver = "no_such_tagger"'),
            "instruments.tagger.driver",
            "unknown driver 'no_such_tagger'",
        ),
        (
            ("tcp://127.0.0.1:5553", "tcp://127.0.0.1:70000"),
            "bus.control_endpoint",
            "port in 0..65535",
        ),
        (
            ("tcp://127.0.0.1:5553", "tcp://127.0.0.1"),
            "bus.control_endpoint",
            "tcp://HOST:PORT",
        ),
        (
            ("allow_plaintext = true", "allow_plaintext = false"),
            "bus.server_secret_key_file",
            "no CURVE secret key",
        ),
        (
            (
                "allow_plaintext = true",
                'allow_plaintext = false\npeer_public_key = "' + "~" * 40 + '"',
            ),
            "bus.peer_public_key",
            "not a Z85 CURVE key",
        ),
    ],
)
def test_refused_with_the_key_named(
    tmp_path: Path, edit: tuple[str, str], key: str, message: str
) -> None:
    text = sim_config(tmp_path)
    assert edit[0] in text
    r = check(write(tmp_path, text.replace(edit[0], edit[1], 1)))
    assert r.returncode == 2, r.stdout
    assert key in r.stderr and message in r.stderr, r.stderr


def test_missing_files_are_named_with_their_keys(tmp_path: Path) -> None:
    pub, _ = zmq.curve_keypair()
    text = sim_config(tmp_path).replace(
        "allow_plaintext = true",
        f'allow_plaintext = false\nserver_secret_key_file = "{tmp_path}/absent.key"\n'
        f'peer_public_key = "{pub.decode()}"',
    )
    text += f"""
[delivery]
enabled = true
tls_cert_file = "{tmp_path}/kme.crt"
client_ca_file = "{tmp_path}/ca.crt"
crl_file = "{tmp_path}/crl.pem"
"""
    text = text.replace("[protocol]\n", f'[protocol]\nauth_psk_file = "{tmp_path}/auth.psk"\n')
    r = check(write(tmp_path, text))
    assert r.returncode == 2
    for key, path in (
        ("bus.server_secret_key_file", "absent.key"),
        ("delivery.tls_cert_file", "kme.crt"),
        ("delivery.client_ca_file", "ca.crt"),
        ("delivery.crl_file", "crl.pem"),
        ("protocol.auth_psk_file", "auth.psk"),
    ):
        assert any(key in line and path in line for line in r.stderr.splitlines()), (key, r.stderr)
    assert "delivery.tls_key_file: required" in r.stderr


def test_a_state_directory_that_cannot_be_created_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    text = sim_config(tmp_path).replace(
        f'state_dir = "{tmp_path / "bob"}"', f'state_dir = "{blocker}/bob"'
    )
    r = check(write(tmp_path, text))
    assert r.returncode == 2
    assert "node.state_dir" in r.stderr and "not a directory" in r.stderr, r.stderr


def test_a_psk_too_small_is_refused_by_check_and_by_run(tmp_path: Path) -> None:
    from qkdnode.postproc.auth import min_psk_bytes

    psk = tmp_path / "auth.psk"
    psk.write_bytes(b"\x01" * (min_psk_bytes() - 1))
    psk.chmod(0o600)
    text = sim_config(tmp_path).replace("[protocol]\n", f'[protocol]\nauth_psk_file = "{psk}"\n')
    path = write(tmp_path, text)
    r = check(path)
    assert r.returncode == 2
    assert "protocol.auth_psk_file" in r.stderr and str(min_psk_bytes()) in r.stderr, r.stderr
    run = subprocess.run(
        [sys.executable, "-m", "qkdnode", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert str(psk) in run.stderr and str(min_psk_bytes()) in run.stderr
    psk.write_bytes(b"\x01" * min_psk_bytes())
    assert check(path).returncode == 0
