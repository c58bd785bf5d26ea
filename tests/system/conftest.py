"""A real transmitter/receiver pair of node daemons on a simulated link, for system tests.

Each node is a ``python -m qkdnode run`` subprocess with its own state directory, SQLite
key store and free loopback ports; the tests drive and watch them over the control bus
only (and read their JSON logs). Every daemon started here is killed by the fixture's
finalizer if a test leaves it running.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qkdnode.bus.errors import BusError
from qkdnode.bus.keys import load_keypair, write_keypair
from qkdnode.client import Client
from qkdnode.delivery.pki import init_ca, issue_cert, revoke_cert
from qkdnode.delivery.tls import client_context
from tests.daemon.conftest import Daemon, free_port, node_config

#: Detections per key block. At ~1.2 M detections/s a block takes a few seconds; smaller
#: blocks (1e6) never yield key under the finite-key bounds (phase error bound hits 0.5).
BLOCK_DETECTIONS = 4_000_000
#: Generous limits: the machine is shared and loaded; we assert on states, never speed.
START_TIMEOUT_S = 180.0
RECOVER_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 20.0

SAE_MASTER = "sae-alice"
SAE_SLAVE = "sae-bob"
#: a second pair (carol -> dave), a second slave of alice (erin), a retired SAE whose
#: certificate starts on the CRL, and one registered with no pair at all (mallory)
SAE_CAROL = "sae-carol"
SAE_DAVE = "sae-dave"
SAE_ERIN = "sae-erin"
SAE_RETIRED = "sae-retired"
SAE_MALLORY = "sae-mallory"
ALL_SAES = (SAE_MASTER, SAE_SLAVE, SAE_CAROL, SAE_DAVE, SAE_ERIN, SAE_RETIRED, SAE_MALLORY)
SAE_PAIRS = (
    (SAE_MASTER, SAE_SLAVE),
    (SAE_MASTER, SAE_ERIN),
    (SAE_CAROL, SAE_DAVE),
    (SAE_RETIRED, SAE_SLAVE),
)


def _die_with_parent() -> None:
    """In the child: SIGKILL when the test process dies (even by SIGKILL), Linux only."""
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def start_daemon(config: Path, log_path: Path) -> Daemon:
    """``python -m qkdnode run --config FILE --log-json``; output to ``log_path``."""
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qkdnode", "run", "--config", str(config), "--log-json"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
            cwd=str(config.parent),
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
        )
    return Daemon(proc, log_path)


@dataclass
class Pki:
    """CA, one server certificate per KME, one client certificate per SAE."""

    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def client(self, cn: str) -> ssl.SSLContext:
        return client_context(self.ca, self.dir / f"{cn}.crt", self.dir / f"{cn}.key")

    @classmethod
    def create(cls, d: Path) -> Pki:
        init_ca(d)
        for kme in ("kme-alice", "kme-bob"):
            issue_cert(d, kme, server=True, sans=["127.0.0.1", "localhost"])
        for sae in ALL_SAES:
            issue_cert(d, sae)
        revoke_cert(d, SAE_RETIRED)
        return cls(d)

    @property
    def crl(self) -> Path:
        return self.dir / "crl.pem"


def delivery_toml(pki: Pki, me: str, port: int) -> str:
    """The ``[delivery]`` section of node ``me`` ("alice" or "bob")."""
    kme, peer = ("KME-ALICE", "KME-BOB") if me == "alice" else ("KME-BOB", "KME-ALICE")
    saes = "\n".join(
        f'[[delivery.saes]]\nsae_id = "{s}"\ncertificate_cn = "{s}"\n' for s in ALL_SAES
    )
    pairs = ", ".join(f'["{m}", "{s}"]' for m, s in SAE_PAIRS)
    return f"""
[delivery]
enabled = true
listen_host = "127.0.0.1"
listen_port = {port}
kme_id = "{kme}"
peer_kme_id = "{peer}"
tls_cert_file = "{pki.dir / f"kme-{me}.crt"}"
tls_key_file = "{pki.dir / f"kme-{me}.key"}"
client_ca_file = "{pki.ca}"
crl_file = "{pki.crl}"
pairs = [{pairs}]

{saes}
"""


PLAINTEXT_LINE = "allow_plaintext = true   # local simulation only; real nodes use CURVE keys"


def curve_keys(d: Path) -> dict[str, tuple[Path, str]]:
    """CURVE key pairs of alice, bob and the test client: name -> (secret file, public)."""
    out = {}
    for name in ("alice", "bob", "client"):
        secret, public = write_keypair(d, name, overwrite=True)
        out[name] = (secret, public.read_text("ascii").strip())
    return out


def curve_bus_toml(keys: dict[str, tuple[Path, str]], me: str) -> str:
    """The ``[bus]`` lines that replace ``allow_plaintext = true`` for node ``me``."""
    peer = "bob" if me == "alice" else "alice"
    return (
        "allow_plaintext = false\n"
        f'server_secret_key_file = "{keys[me][0]}"\n'
        f'peer_public_key = "{keys[peer][1]}"\n'
        f'clients = [{{ name = "test-client", public_key = "{keys["client"][1]}", '
        f'role = "operator" }}, {{ name = "{peer}", public_key = "{keys[peer][1]}", '
        'role = "peer" }]\n'
    )


@dataclass
class Node:
    """One daemon of the pair: its config, log and control client."""

    role: str
    config: Path
    log_dir: Path
    control_endpoint: str
    daemon: Daemon | None = None
    starts: int = 0
    etsi_port: int | None = None
    #: CURVE: the node's public key and the test client's key file (None: plaintext bus)
    server_public: str | None = None
    client_key_file: Path | None = None
    _client: Client | None = None

    @property
    def name(self) -> str:
        return "alice" if self.role == "transmitter" else "bob"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.{self.starts}.log"

    def start(self) -> None:
        assert self.daemon is None or self.daemon.proc.poll() is not None, "already running"
        self.starts += 1
        self.daemon = start_daemon(self.config, self.log_path)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        assert self.daemon is not None
        code = self.daemon.stop(sig, timeout_s)
        self.close_client()
        return code

    def kill_leftover(self) -> None:
        if self.daemon is not None and self.daemon.proc.poll() is None:
            self.daemon.proc.kill()
            self.daemon.proc.wait(30)
        self.close_client()

    def close_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    @property
    def client(self) -> Client:
        if self._client is None:
            if self.server_public is not None and self.client_key_file is not None:
                self._client = Client(
                    self.control_endpoint,
                    server_public_key=self.server_public,
                    client_keys=load_keypair(self.client_key_file),
                    timeout_s=CALL_TIMEOUT_S,
                )
            else:
                self._client = Client(self.control_endpoint, timeout_s=CALL_TIMEOUT_S)
        return self._client

    def call(self, command: str, **content: Any) -> dict[str, Any]:
        return self.client.call(command, **content)

    def status(self) -> dict[str, Any] | None:
        """The node's status, or None when it does not answer (starting, stopped, busy)."""
        try:
            return self.client.call("status")
        except BusError:
            return None

    def lines(self) -> list[dict[str, Any]]:
        """JSON log records of every run of this node, oldest first."""
        out: list[dict[str, Any]] = []
        for i in range(1, self.starts + 1):
            path = self.log_dir / f"{self.name}.{i}.log"
            if not path.exists():
                continue
            for line in path.read_text(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
        return out

    def events(self, event: str, **match: Any) -> list[dict[str, Any]]:
        return [
            r
            for r in self.lines()
            if r.get("event") == event and all(r.get(k) == v for k, v in match.items())
        ]

    def log_tail(self, chars: int = 3000) -> str:
        path = self.log_path
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"

    # ---------------------------------------------------------------- ETSI GS QKD 014
    def etsi(
        self, pki: Pki, sae_cn: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, dict[str, Any]]:
        """GET (no body) or POST (JSON body) ``/api/v1/keys/<path>`` as SAE ``sae_cn``."""
        assert self.etsi_port is not None
        url = f"https://127.0.0.1:{self.etsi_port}/api/v1/keys/{path}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, context=pki.client(sae_cn), timeout=30) as r:
                return int(r.status), json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), json.loads(exc.read() or b"{}")


@dataclass
class Pair:
    """Transmitter and receiver daemons of one simulated link."""

    tx: Node
    rx: Node
    tmp: Path
    pki: Pki | None = None
    history: list[tuple[float, str | None, str | None]] = field(default_factory=list)

    @property
    def nodes(self) -> tuple[Node, Node]:
        return self.tx, self.rx

    def start(self) -> None:
        # Receiver first: it binds nothing the transmitter needs, and must cope with a
        # transmitter that appears later (power-on order is unknown in the field).
        self.rx.start()
        self.tx.start()

    def kill_all(self) -> None:
        for n in self.nodes:
            n.kill_leftover()

    def statuses(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        a, b = self.tx.status(), self.rx.status()
        self.history.append(
            (time.monotonic(), a["state"] if a else None, b["state"] if b else None)
        )
        return a, b

    def wait(
        self,
        what: str,
        predicate: Callable[[dict[str, Any] | None, dict[str, Any] | None], bool],
        timeout_s: float,
        poll_s: float = 0.5,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Poll both nodes' status until ``predicate(tx, rx)`` holds."""
        deadline = time.monotonic() + timeout_s
        a: dict[str, Any] | None = None
        b: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            a, b = self.statuses()
            if predicate(a, b):
                assert a is not None and b is not None
                return a, b
            time.sleep(poll_s)
        raise AssertionError(self.report(f"timed out after {timeout_s:g} s waiting for {what}"))

    def wait_exchanging(
        self, timeout_s: float = RECOVER_TIMEOUT_S, min_blocks_after: int | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Both nodes EXCHANGING (and, if given, the transmitter past that block count)."""

        def ok(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
            if a is None or b is None:
                return False
            if a["state"] != "EXCHANGING" or b["state"] != "EXCHANGING":
                return False
            if min_blocks_after is None:
                return True
            return blocks_done(a) > min_blocks_after

        return self.wait("both nodes EXCHANGING", ok, timeout_s)

    def report(self, message: str) -> str:
        seen: list[str] = []
        for _, a, b in self.history:
            s = f"{a}/{b}"
            if not seen or seen[-1] != s:
                seen.append(s)
        return (
            f"{message}\nstate history (tx/rx): {' -> '.join(seen[-30:])}\n"
            f"--- transmitter log tail ---\n{self.tx.log_tail()}\n"
            f"--- receiver log tail ---\n{self.rx.log_tail()}"
        )


def blocks_done(status: dict[str, Any]) -> int:
    st = status["stats"]
    return int(st["blocks_ok"]) + int(st["blocks_aborted"])


def states_seen(node: Node) -> list[str]:
    """Every state the node entered, in order, over all its runs (from the log)."""
    return [str(r["new"]) for r in node.events("state_changed")]


def make_pair(
    tmp: Path,
    *,
    autostart: bool = True,
    delivery: bool = False,
    block_detections: int = BLOCK_DETECTIONS,
    extra_tx: str = "",
    extra_rx: str = "",
) -> Pair:
    names = [
        "transmitter_control",
        "transmitter_telemetry",
        "receiver_control",
        "receiver_telemetry",
        "peer",
        "fiber",
    ]
    ports = {n: free_port() for n in names}
    tmp.mkdir(parents=True, exist_ok=True)
    pki = Pki.create(tmp / "pki") if delivery else None
    # Key delivery needs an authenticated peer channel: CURVE keys for both nodes and the
    # test's control client.
    curve = curve_keys(tmp / "curve") if delivery else None
    nodes: list[Node] = []
    for role, extra in (("transmitter", extra_tx), ("receiver", extra_rx)):
        me = "alice" if role == "transmitter" else "bob"
        etsi_port = free_port() if delivery else None
        add = extra
        if pki is not None and etsi_port is not None:
            add += delivery_toml(pki, me, etsi_port)
        path = node_config(tmp, role, ports, add)
        text, n = re.subn(
            r"^block_detections = \d+",
            f"block_detections = {block_detections}",
            path.read_text(),
            flags=re.MULTILINE,
        )
        assert n == 1, f"{path}: expected one protocol.block_detections line, found {n}"
        if curve is not None:
            text = text.replace(PLAINTEXT_LINE, curve_bus_toml(curve, me))
        if role == "transmitter" and autostart:
            text = text.replace('log_level = "info"', 'log_level = "info"\nautostart = true', 1)
        path.write_text(text)
        nodes.append(
            Node(
                role,
                path,
                tmp,
                f"tcp://127.0.0.1:{ports[f'{role}_control']}",
                etsi_port=etsi_port,
                server_public=None if curve is None else curve[me][1],
                client_key_file=None if curve is None else curve["client"][0],
            )
        )
    return Pair(nodes[0], nodes[1], tmp, pki)


@pytest.fixture
def pair_factory(tmp_path: Path) -> Iterator[Callable[..., Pair]]:
    made: list[Pair] = []

    def factory(**kw: Any) -> Pair:
        p = make_pair(tmp_path / f"pair{len(made)}", **kw)
        made.append(p)
        return p

    yield factory
    for p in made:
        p.kill_all()
