"""docs/operations.md, section 1, followed to the letter on three scratch "hosts".

The guide marks what a test can run with HTML comments in its source:

- ``<!-- test: run on=alice,bob -->`` before a ```` ```sh ```` block: run it on each host;
- ``<!-- test: file on=alice name=transmitter.toml -->`` before a ```` ```toml ```` block:
  the reader saves it under that name, then replaces each ``<contents of FILE>`` with the
  key in FILE (the test does that edit, and fails if FILE is not on the host yet);
- ``<!-- test: copy from=alice to=bob,noc files=A,B -->``: the reader carries files to
  other hosts' working directories (absolute and ``~/`` paths are the source host's).

Each host has a scratch root standing in for ``/`` (``$PREFIX``; every ``/etc/``,
``/var/lib/``, ``/opt/``, ``/usr/...`` and ``/run/`` path of a block is rewritten under it,
and a block that still names a system path fails the test), a home directory and a working
directory holding the source tree's ``systemd/`` and ``docs/``. Blocks run with bash
``set -euo pipefail`` in document order. What needs root, systemd or the network is
replaced: ``sudo`` runs its command; ``systemctl``, ``udevadm`` and ``apt-get`` only record
their call; ``python3 -m venv`` makes an environment whose ``qkdnode`` is this checkout's
and whose ``pip`` records its call; ``systemd-tmpfiles``, ``systemd-analyze`` and (as root)
``systemd-sysusers`` run for real with ``--root=$PREFIX``, so the guide's
``systemd-analyze security --threshold=12`` measures the installed unit with the guide's
drop-ins.

Afterwards the hosts must hold two consistent nodes: each config passes ``config check``
(run by the guide itself), every credential the unit and its drop-ins load exists and is
private, the nodes hold each other's public keys and identical pre-shared secrets that the
authentication pool accepts, the clients' keys are the operator's and monitor's, the TLS
files make a working server context whose SAEs have certificates from the client CA, the
IP allow-list admits the peer and the LAN instruments, and ``Documentation=`` is installed.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zmq
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from qkdnode.bus.keys import load_public_key, load_secret_key, public_from_secret
from qkdnode.config import NodeConfig, load_config
from qkdnode.delivery.tls import server_context
from qkdnode.postproc.auth import AuthKeyPool

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs/operations.md"
QKDNODE_EXE = Path(sys.executable).with_name("qkdnode")

MARKER = re.compile(r"^<!-- test: (?P<kind>\w+)(?P<attrs>(?:\s+[\w-]+=\S+)*)\s*-->$")
PASTE = re.compile(r"<contents of ([^>]+)>")
# System paths of the guide's commands, rewritten under the host's scratch root.
SYSTEM_PATH = re.compile(
    r"(?<![\w.~/$}-])(/(?:etc|var/lib|opt|usr/lib|usr/share/doc|usr/local|run|root)(?=/|\b))"
)
# Any system path left after the rewrite (``/dev/...`` is read-only use: urandom, stdin).
UNSAFE_PATH = re.compile(
    r"(?<![\w.~/$}-])/(?:etc|var|opt|usr|run|root|home|srv|boot|lib|lib64|bin|sbin|sys|proc|tmp)\b"
)
SKELETON = (
    "etc/systemd/system",
    "etc/udev/rules.d",
    "opt",
    "run",
    "usr/lib/sysusers.d",
    "usr/lib/tmpfiles.d",
    "usr/local/bin",
    "usr/share/doc",
    "var/lib",
)
TCPIP_RESOURCE = re.compile(r"^TCPIP\d*::([^:]+)::")
SOCKET_RESOURCE = re.compile(r"^socket://([^:/]+):")

PREAMBLE = textwrap.dedent(
    r"""
    set -euo pipefail
    _log() { printf '%s\n' "$*" >> "$STUBLOG"; }
    sudo() {
        case "${1:-}" in
            -*|"") echo "sudo ${1:-}: only 'sudo COMMAND ...' is emulated" >&2; return 2 ;;
        esac
        "$@"
    }
    systemctl() { _log systemctl "$@"; }
    udevadm() { _log udevadm "$@"; }
    apt-get() { _log apt-get "$@"; }
    journalctl() { _log journalctl "$@"; }
    systemd-sysusers() {
        _log systemd-sysusers "$@"
        if [ "$(id -u)" = 0 ] && command -v systemd-sysusers >/dev/null; then
            mkdir -p "$PREFIX/etc"
            command systemd-sysusers --root="$PREFIX" "$@"
        fi
    }
    systemd-tmpfiles() {
        _log systemd-tmpfiles "$@"
        command -v systemd-tmpfiles >/dev/null || return 0
        local err rc=0
        err=$(command systemd-tmpfiles --root="$PREFIX" "$@" 2>&1) || rc=$?
        if [ "$rc" != 0 ]; then
            # Without root only the chown to root fails; the directories are made.
            if [ "$(id -u)" != 0 ] && ! grep -qv 'fchownat() of .* failed: Operation not permitted' <<<"$err"; then
                return 0
            fi
            printf '%s\n' "$err" >&2
            return "$rc"
        fi
    }
    systemd-analyze() {
        _log systemd-analyze "$@"
        if command -v systemd-analyze >/dev/null; then
            (cd "$PREFIX" && command systemd-analyze --root="$PREFIX" "$@")
        fi
    }
    python3() {
        if [ "${1:-}" = -m ] && [ "${2:-}" = venv ]; then
            mkdir -p "$3/bin"
            # `config check` looks for the files the config names under this host's root
            printf '#!/bin/sh\nif [ "$1" = config ] && [ "$2" = check ]; then shift 2; exec "%s" config check --root "$PREFIX" "$@"; fi\nexec "%s" "$@"\n' "$QKDNODE_EXE" "$QKDNODE_EXE" > "$3/bin/qkdnode"
            chmod 755 "$3/bin/qkdnode"
            printf '#!/bin/sh\nprintf "pip %%s\\n" "$*" >> "$STUBLOG"\n' > "$3/bin/pip"
            chmod 755 "$3/bin/pip"
        else
            command python3 "$@"
        fi
    }
    """
)


@dataclass
class Step:
    kind: str
    attrs: dict[str, str]
    line: int
    lang: str = ""
    body: str = ""

    def hosts(self, key: str = "on") -> list[str]:
        return self.attrs[key].split(",")


def parse_guide(text: str) -> list[Step]:
    lines = text.splitlines()
    steps: list[Step] = []
    i = 0
    while i < len(lines):
        m = MARKER.match(lines[i].strip())
        if m is None:
            assert not lines[i].lstrip().startswith("<!-- test:"), (
                f"line {i + 1}: malformed marker {lines[i]!r}"
            )
            i += 1
            continue
        attrs = dict(kv.split("=", 1) for kv in m["attrs"].split())
        step = Step(m["kind"], attrs, i + 1)
        if step.kind in ("run", "file"):
            fence = lines[i + 1] if i + 1 < len(lines) else ""
            assert fence.startswith("```"), f"line {i + 1}: a fenced block must follow"
            step.lang = fence[3:].strip()
            end = i + 2
            while lines[end].strip() != "```":
                end += 1
            step.body = "\n".join(lines[i + 2 : end]) + "\n"
            i = end
        else:
            assert step.kind == "copy", f"line {i + 1}: unknown marker kind {step.kind!r}"
        steps.append(step)
        i += 1
    return steps


@dataclass
class Host:
    name: str
    root: Path
    home: Path
    work: Path
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    def path(self, p: str) -> Path:
        """A path as the guide names it on this host, in the scratch tree."""
        if p.startswith("~/"):
            return self.home / p[2:]
        if p.startswith("/"):
            return self.root / p.lstrip("/")
        return self.work / p

    def stub_calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


def make_host(base: Path, name: str) -> Host:
    root, home, work = base / name / "root", base / name / "home", base / name / "work"
    for d in (root, home, work):
        d.mkdir(parents=True)
    for d in SKELETON:  # what every systemd host has
        (root / d).mkdir(parents=True)
    for sub in ("systemd", "docs"):  # the unpacked source tree
        shutil.copytree(ROOT / sub, work / sub)
    log = base / name / "stubs.log"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CREDENTIALS_DIRECTORY", "CONFIGURATION_DIRECTORY", "STATE_DIRECTORY")
    }
    env.update(
        PREFIX=str(root),
        HOME=str(home),
        STUBLOG=str(log),
        QKDNODE_EXE=str(QKDNODE_EXE),
        PATH=f"{root}/usr/local/bin:{env.get('PATH', '/usr/bin:/bin')}",
        SYSTEMD_LOG_COLOR="0",
        SYSTEMD_PAGER="",
    )
    return Host(name, root, home, work, log, env)


def rewrite(body: str, step: Step) -> str:
    script = SYSTEM_PATH.sub(r"${PREFIX}\1", body)
    left = [m.group(0) for m in UNSAFE_PATH.finditer(script)]
    assert not left, f"line {step.line}: system paths the test cannot redirect: {left}"
    return script


def run_block(host: Host, step: Step, tmp: Path) -> None:
    assert step.lang == "sh", f"line {step.line}: runnable blocks are ```sh"
    script = tmp / f"{host.name}-{step.line}.sh"
    script.write_text(PREAMBLE + rewrite(step.body, step))
    r = subprocess.run(
        ["bash", str(script)],
        cwd=host.work,
        env=host.env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, (
        f"docs/operations.md line {step.line} on {host.name} failed ({r.returncode}):\n"
        f"{step.body}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
    )


def save_file(host: Host, step: Step) -> None:
    """The reader saves the block, then pastes each named key into it."""

    def paste(m: re.Match[str]) -> str:
        src = host.work / m.group(1)
        assert src.is_file(), (
            f"line {step.line}: the config asks for {m.group(1)} on {host.name}, "
            "which the guide has not put there yet"
        )
        return src.read_text().strip()

    (host.work / step.attrs["name"]).write_text(PASTE.sub(paste, step.body))


def carry(hosts: dict[str, Host], step: Step) -> None:
    src = hosts[step.attrs["from"]]
    for name in step.attrs["files"].split(","):
        path = src.path(name)
        assert path.is_file(), f"line {step.line}: {name} does not exist on {src.name}"
        for dest in step.hosts("to"):
            shutil.copy2(path, hosts[dest].work / path.name)


def unit_settings(*files: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for f in files:
        for raw in f.read_text().splitlines():
            line = raw.strip()
            if line and not line.startswith(("#", ";", "[")):
                key, _, value = line.partition("=")
                settings.setdefault(key, []).append(value)
    return settings


@dataclass
class Node:
    host: Host
    instance: str
    cfg: NodeConfig
    unit: dict[str, list[str]]
    credentials: dict[str, Path]

    def address(self) -> str:
        return endpoint_host(self.cfg.bus.control_endpoint)


def endpoint_host(endpoint: str) -> str:
    return endpoint.split("://", 1)[1].rsplit(":", 1)[0].strip("[]")


def find_nodes(hosts: dict[str, Host]) -> dict[str, Node]:
    nodes: dict[str, Node] = {}
    for host in hosts.values():
        for conf in sorted((host.root / "etc/qkdnode").glob("*.toml")):
            instance = conf.stem
            units = host.root / "etc/systemd/system"
            files = [units / "qkdnode@.service"]
            files += sorted((units / f"qkdnode@{instance}.service.d").glob("*.conf"))
            unit = unit_settings(*files)
            creds = {}
            for value in unit.get("LoadCredential", []):
                name, _, src = value.partition(":")
                creds[name] = host.path(src.replace("%i", instance))
            nodes[instance] = Node(host, instance, load_config(conf), unit, creds)
    return nodes


def psk_minimum() -> int | None:
    """``qkdnode.postproc.auth.min_psk_bytes()``, which ``config check`` and the daemon use."""
    from qkdnode.postproc import auth

    fn = getattr(auth, "min_psk_bytes", None)
    return None if fn is None else int(fn())


def allowed_networks(values: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    nets = []
    for value in values:
        for item in value.split():
            if item == "localhost":
                nets += [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
            elif item == "any":
                nets += [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
            else:
                nets.append(ipaddress.ip_network(item, strict=False))
    return nets


def check_credentials(node: Node) -> None:
    assert {"curve.key", "auth.psk"} <= set(node.credentials), node.unit.get("LoadCredential")
    for name, path in node.credentials.items():
        assert path.is_file(), f"{node.host.name}: credential {name} missing: {path}"
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
        assert path.parent.stat().st_mode & 0o777 == 0o700, f"{path.parent} is not 0700"
    public = public_from_secret(load_secret_key(node.credentials["curve.key"]))
    published = node.host.root / f"etc/qkdnode/{node.instance}.pub"
    assert load_public_key(published) == public, f"{published} is not curve.key's public key"


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def check_delivery(node: Node, hosts: dict[str, Host]) -> None:
    d = node.cfg.delivery
    assert d.enabled, f"{node.instance}: the guide sets up key delivery"
    assert not node.cfg.bus.allow_plaintext
    assert d.tls_cert_file and d.client_ca_file
    cert, ca = node.host.path(str(d.tls_cert_file)), node.host.path(str(d.client_ca_file))
    if d.tls_key_file is None:  # the daemon reads the credential tls.key
        assert "tls.key" in node.credentials, f"{node.instance}: no LoadCredential=tls.key"
        key = node.credentials["tls.key"]
    else:
        key = node.host.path(str(d.tls_key_file))
    for p in (cert, ca, key):
        assert p.is_file(), f"{node.host.name}: {p} missing"
    server_context(cert, key, ca)  # the pair matches, the CA loads
    server = x509.load_pem_x509_certificate(cert.read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(v) for v in sans.get_values_for_type(x509.IPAddress)}
    names |= set(sans.get_values_for_type(x509.DNSName))
    assert d.listen_host in names, f"{cert}: SAN {names} lacks {d.listen_host}"
    ca_cert = x509.load_pem_x509_certificate(ca.read_bytes())
    issued = {}
    for host in hosts.values():
        for crt in host.work.rglob("*.crt"):
            c = x509.load_pem_x509_certificate(crt.read_bytes())
            for attr in c.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME):
                issued.setdefault(attr.value, []).append(c)
    for sae in d.saes:
        certs = issued.get(sae.certificate_cn, [])
        assert any(issued_by(c, ca_cert) for c in certs), (
            f"{node.instance}: no certificate for SAE {sae.certificate_cn} from its client CA"
        )


def check_allow_list(node: Node, peer: Node) -> None:
    s = node.unit
    assert "any" in " ".join(s.get("IPAddressDeny", [])).split()
    nets = allowed_networks(s.get("IPAddressAllow", []))
    needed = {node.address(), peer.address(), endpoint_host(node.cfg.bus.peer_endpoint)}
    for inst in node.cfg.instruments.values():
        m = TCPIP_RESOURCE.match(inst.resource) or SOCKET_RESOURCE.match(inst.resource)
        if m:
            needed.add(m.group(1))
    for addr in sorted(needed):
        ip = ipaddress.ip_address(addr)
        assert any(ip in n for n in nets), f"{node.instance}: IPAddressAllow lacks {addr}"


def test_guide_markers_cover_the_installation() -> None:
    steps = parse_guide(GUIDE.read_text())
    kinds = {s.kind for s in steps}
    assert kinds == {"run", "file", "copy"}, kinds
    files = {s.attrs["name"] for s in steps if s.kind == "file"}
    assert files == {"transmitter.toml", "receiver.toml"}
    for s in steps:
        if s.kind == "run":
            rewrite(s.body, s)  # no system path escapes the scratch root


@pytest.mark.system  # builds and installs a wheel (~17 s): make test-system
def test_install_guide_runs_as_written(tmp_path: Path) -> None:
    assert QKDNODE_EXE.exists(), f"{QKDNODE_EXE} missing: install the package editable"
    steps = parse_guide(GUIDE.read_text())
    names = {
        h for s in steps for key in ("on", "from", "to") if key in s.attrs for h in s.hosts(key)
    }
    hosts = {name: make_host(tmp_path, name) for name in sorted(names)}
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for step in steps:
        if step.kind == "run":
            for name in step.hosts():
                run_block(hosts[name], step, scripts)
        elif step.kind == "file":
            save_file(hosts[step.attrs["on"]], step)
        else:
            carry(hosts, step)

    nodes = find_nodes(hosts)
    assert set(nodes) == {"transmitter", "receiver"}, sorted(nodes)
    tx, rx = nodes["transmitter"], nodes["receiver"]
    assert tx.host is not rx.host, "the two nodes must be on different hosts"
    assert tx.cfg.node.role == "transmitter" and rx.cfg.node.role == "receiver"
    assert tx.cfg.node.autostart, "the transmitter starts key exchange by itself"
    assert tx.cfg.node.peer_id == rx.cfg.node.id and rx.cfg.node.peer_id == tx.cfg.node.id

    for node in nodes.values():
        check_credentials(node)
        check_delivery(node, hosts)
        unit_file = node.host.root / "etc/systemd/system/qkdnode@.service"
        doc = node.unit["Documentation"][0].removeprefix("file:")
        assert node.host.path(doc).is_file(), f"Documentation={doc} is not installed"
        assert unit_file.read_text() == (ROOT / "systemd/qkdnode@.service").read_text()
        calls = node.host.stub_calls()
        assert "systemctl daemon-reload" in calls
        assert f"systemctl enable --now qkdnode@{node.instance}.service" in calls, calls
        assert any(c.startswith("systemd-analyze security") for c in calls), calls
        # a node box gets the compiled kernels (section 5): a wheel with a platform tag or
        # the source archive, never a pure-Python wheel
        installs = [c for c in calls if c.startswith("pip install")]
        assert installs, calls
        for c in installs:
            assert re.search(r"-cp3\d+-cp3\d+-\w+\.whl|\.tar\.gz", c), c

    # Each node holds the other's public key; the clients are the operator and monitor.
    tx_pub = public_from_secret(load_secret_key(tx.credentials["curve.key"]))
    rx_pub = public_from_secret(load_secret_key(rx.credentials["curve.key"]))
    assert tx.cfg.bus.peer_public_key == rx_pub.decode()
    assert rx.cfg.bus.peer_public_key == tx_pub.decode()
    client_secrets = [
        k for h in hosts.values() if h not in (tx.host, rx.host) for k in h.home.rglob("*.key")
    ]
    client_publics = {public_from_secret(load_secret_key(k)).decode() for k in client_secrets}
    for node in (tx, rx):
        assert not node.cfg.bus.allow_plaintext
        roles = {c.role for c in node.cfg.bus.clients}
        assert {"operator", "monitor"} <= roles, roles
        for c in node.cfg.bus.clients:
            assert c.public_key in client_publics, f"{node.instance}: client {c.name}"
            assert c.public_key not in (tx_pub.decode(), rx_pub.decode())

    # One pre-shared secret, big enough, accepted where the daemon first uses it.
    psk = tx.credentials["auth.psk"].read_bytes()
    assert psk == rx.credentials["auth.psk"].read_bytes(), "auth.psk differs between nodes"
    assert len(psk) == 1 << 20, "the guide makes 1 MiB"
    minimum = psk_minimum()
    assert minimum is None or len(psk) >= minimum, f"auth.psk: need {minimum} bytes"
    AuthKeyPool.bootstrap(tmp_path / "auth_pool.json", psk)  # what the daemon does first
    leftovers = [p for h in hosts.values() for p in h.work.glob("*.transfer")]
    assert not leftovers, f"transfer copies of secrets left behind: {leftovers}"

    check_allow_list(tx, rx)
    check_allow_list(rx, tx)


def test_config_check_names_the_psk_minimum(tmp_path: Path) -> None:
    """The guide tells the reader that `config check` names the minimum secret size."""
    from qkdnode.postproc import auth

    if not hasattr(auth, "min_psk_bytes"):
        pytest.skip("qkdnode.postproc.auth.min_psk_bytes is not defined yet")
    steps = parse_guide(GUIDE.read_text())
    body = next(s.body for s in steps if s.kind == "file" and s.attrs["name"] == "receiver.toml")
    conf = tmp_path / "receiver.toml"
    conf.write_text(PASTE.sub(lambda _: zmq.curve_keypair()[0].decode(), body))
    minimum = psk_minimum()
    assert minimum is not None
    load_config(conf)
    creds = tmp_path / "creds"
    creds.mkdir(mode=0o700)
    (creds / "auth.psk").write_bytes(b"\x01" * max(1, minimum // 2))
    (creds / "auth.psk").chmod(0o600)
    env = dict(os.environ, CREDENTIALS_DIRECTORY=str(creds))
    r = subprocess.run(
        [str(QKDNODE_EXE), "config", "check", str(conf)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode != 0, r.stdout
    assert str(minimum) in r.stdout + r.stderr, r.stdout + r.stderr
