"""Network namespaces for multi-site runs: traffic between sites crosses the per-link veths.

Needs root (or CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2: the whole module is skipped,
with the reason, where :func:`netns_problem` finds them missing. Every test uses its own
random prefix, so parallel runs do not clash, and checks that nothing is left behind.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from qkdnode.demo import netns
from qkdnode.demo.netns import (
    LINK_NET,
    MGMT_NET,
    NetnsCommandError,
    NetnsTopology,
    NetnsUnavailable,
    SiteLink,
    link_network,
    netns_problem,
)

_PROBLEM = netns_problem()
if _PROBLEM is not None:
    pytest.skip(f"network namespaces unavailable on this host: {_PROBLEM}", allow_module_level=True)

PORT = 7000  # the same in every namespace: each has its own port space

# Serves forever: accepts a connection, sends "site:<name>", closes. "ready" once listening.
LISTENER = """
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen()
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    conn.sendall(("site:" + sys.argv[2]).encode())
    conn.close()
"""

# Connects once; prints what the server sent, or "error: ..." and exits 1.
CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.0) as s:
        print(s.recv(64).decode())
except OSError as exc:
    print(f"error: {exc}")
    sys.exit(1)
"""


def _prefix() -> str:
    return "qkt" + secrets.token_hex(3)


def _leftovers(prefix: str) -> tuple[list[str], list[str]]:
    """Namespaces and root-namespace links whose names start with ``prefix``."""
    ns_out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    spaces = [line.split()[0] for line in ns_out.stdout.splitlines() if line.strip()]
    link_out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    links = [line.split(":")[1].strip().split("@")[0] for line in link_out.stdout.splitlines()]
    return [n for n in spaces if n.startswith(prefix)], [n for n in links if n.startswith(prefix)]


def _listen(topo: NetnsTopology, site: str, name: str | None = None) -> subprocess.Popen[str]:
    """A listener on 0.0.0.0:PORT inside ``site``'s namespace, ready when returned."""
    proc: subprocess.Popen[str] = topo.popen(
        site,
        [sys.executable, "-c", LISTENER, str(PORT), name or site],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _connect(topo: NetnsTopology, site: str, host: str) -> str:
    """From inside ``site``: what a server at host:PORT says, or "error: ...\"."""
    done = topo.run(
        site, [sys.executable, "-c", CLIENT, host, str(PORT)], capture_output=True, text=True
    )
    return done.stdout.strip() or f"error: {done.stderr.strip()}"


def _eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture
def line() -> Iterator[NetnsTopology]:
    """a - b - c, each site with a listener on PORT."""
    prefix = _prefix()
    topo = NetnsTopology(prefix, ["a", "b", "c"], [SiteLink("a", "b"), SiteLink("b", "c")])
    try:
        for site in topo.sites:
            _listen(topo, site)
        yield topo
    finally:
        topo.close()
        assert topo.cleanup_errors == []
        assert _leftovers(prefix) == ([], [])


def test_address_plan(line: NetnsTopology) -> None:
    assert line.namespace("b") == f"{line.prefix}-b"
    assert (line.address("a", "b"), line.address("b", "a")) == ("198.18.0.1", "198.18.0.2")
    assert (line.address("b", "c"), line.address("c", "b")) == ("198.18.0.5", "198.18.0.6")
    with pytest.raises(KeyError, match="no link between 'a' and 'c'"):
        line.address("a", "c")
    with pytest.raises(KeyError, match="unknown site 'x'"):
        line.namespace("x")
    mgmt = [ipaddress.IPv4Address(line.mgmt_address(s)) for s in line.sites]
    assert len(set(mgmt)) == 3
    assert all(m in MGMT_NET for m in mgmt)
    assert line.wrap("c", ["true"]) == ["ip", "netns", "exec", f"{line.prefix}-c", "true"]
    # The addresses really sit on b's interfaces, one per link plus management.
    shown = line.run("b", ["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True)
    assert f"{line.interface('b', 'a')}    inet 198.18.0.2/30" in shown.stdout
    assert f"{line.interface('b', 'c')}    inet 198.18.0.5/30" in shown.stdout
    assert f"mgmt    inet {line.mgmt_address('b')}/30" in shown.stdout


def test_link_network_scheme() -> None:
    assert str(link_network(0)) == "198.18.0.0/30"
    assert str(link_network(63)) == "198.18.0.252/30"
    assert str(link_network(64)) == "198.18.1.0/30"
    assert link_network(netns.MAX_LINKS - 1).subnet_of(LINK_NET)
    with pytest.raises(ValueError, match="link index"):
        link_network(netns.MAX_LINKS)


def test_neighbours_reach_each_other_but_not_beyond(line: NetnsTopology) -> None:
    assert _connect(line, "a", line.address("b", "a")) == "site:b"
    assert _connect(line, "c", line.address("b", "c")) == "site:b"
    # c's address on the b-c link: b reaches it, a has no route (no forwarding through b).
    assert _connect(line, "b", line.address("c", "b")) == "site:c"
    refused = _connect(line, "a", line.address("c", "b"))
    assert refused.startswith("error:") and "unreachable" in refused
    # Nor is there a shortcut through the root namespace's management links.
    assert "unreachable" in _connect(line, "a", line.mgmt_address("c"))
    # Each namespace has its own loopback: a's listener, not b's.
    assert _connect(line, "a", "127.0.0.1") == "site:a"


def test_root_reaches_sites_at_mgmt_address(line: NetnsTopology) -> None:
    for site in line.sites:
        with socket.create_connection((line.mgmt_address(site), PORT), timeout=2.0) as conn:
            assert conn.recv(64) == f"site:{site}".encode()


def test_link_down_cuts_and_link_up_restores(line: NetnsTopology) -> None:
    target = line.address("b", "a")
    assert _connect(line, "a", target) == "site:b"
    line.link_down("b", "a")  # either order names the link
    assert _connect(line, "a", target).startswith("error:")
    assert _connect(line, "c", line.address("b", "c")) == "site:b"  # the other link is fine
    line.link_up("a", "b")
    assert _eventually(lambda: _connect(line, "a", target) == "site:b")
    with pytest.raises(KeyError, match="no link between 'a' and 'c'"):
        line.link_down("a", "c")


def test_close_removes_everything_and_is_idempotent() -> None:
    prefix = _prefix()
    topo = NetnsTopology(prefix, ["a", "b"], [SiteLink("a", "b")])
    spaces, links = _leftovers(prefix)
    assert sorted(spaces) == [f"{prefix}-a", f"{prefix}-b"]
    assert sorted(links) == [f"{prefix}m0", f"{prefix}m1"]
    listener = _listen(topo, "a")
    topo.close()
    assert listener.poll() is not None  # close() stopped what popen() started
    assert _leftovers(prefix) == ([], [])
    topo.close()
    assert topo.cleanup_errors == []
    with pytest.raises(RuntimeError, match="closed"):
        topo.run("a", ["true"])


def test_stale_objects_of_the_prefix_are_removed_others_kept() -> None:
    prefix, other = _prefix(), _prefix()
    ip = ["ip"]
    subprocess.run([*ip, "netns", "add", f"{prefix}-stale"], check=True)
    subprocess.run(
        [*ip, "link", "add", f"{prefix}m9", "type", "veth"]
        + ["peer", "name", "mgmt", "netns", f"{prefix}-stale"],
        check=True,
    )
    subprocess.run([*ip, "netns", "add", f"{other}-keep"], check=True)
    try:
        with NetnsTopology(prefix, ["a"], [], management=False) as topo:
            assert _leftovers(prefix) == ([f"{prefix}-a"], [])
            assert _leftovers(other) == ([f"{other}-keep"], [])
            with pytest.raises(RuntimeError, match="management=False"):
                topo.mgmt_address("a")
        assert _leftovers(prefix) == ([], [])
    finally:
        subprocess.run([*ip, "netns", "delete", f"{other}-keep"], check=True)
        subprocess.run([*ip, "netns", "delete", f"{prefix}-stale"], check=False)
        subprocess.run([*ip, "link", "delete", f"{prefix}m9"], check=False, capture_output=True)


def test_two_topologies_get_distinct_management_blocks() -> None:
    first, second = _prefix(), _prefix()
    with (
        NetnsTopology(first, ["a", "b"], [SiteLink("a", "b")]) as one,
        NetnsTopology(second, ["a", "b"], [SiteLink("a", "b")]) as two,
    ):
        assert one.mgmt_block != two.mgmt_block
        _listen(one, "a", "one")
        _listen(two, "a", "two")
        for topo, name in ((one, "one"), (two, "two")):
            with socket.create_connection((topo.mgmt_address("a"), PORT), timeout=2.0) as conn:
                assert conn.recv(64) == f"site:{name}".encode()
    assert _leftovers(first) == ([], []) and _leftovers(second) == ([], [])


def test_failed_construction_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = _prefix()
    real_ip = netns._ip

    def failing_ip(args: Any) -> str:
        if f"{prefix}m1" in args and "addr" in args:
            raise NetnsCommandError(["ip", *args], 2, "RTNETLINK answers: injected failure")
        return real_ip(args)

    monkeypatch.setattr(netns, "_ip", failing_ip)
    with pytest.raises(NetnsCommandError, match="injected failure") as caught:
        NetnsTopology(prefix, ["a", "b", "c"], [SiteLink("a", "b")])
    assert f"{prefix}m1" in str(caught.value)
    assert _leftovers(prefix) == ([], [])


@pytest.mark.parametrize(
    ("prefix", "sites", "links", "match"),
    [
        ("has-dash", ["a"], [], "prefix"),
        ("waytoolongprefix", ["a"], [], "prefix"),
        ("qk", [], [], "at least one site"),
        ("qk", ["a", "a"], [], "repeat"),
        ("qk", ["a/b"], [], "site 'a/b'"),
        ("qk", ["a"], [SiteLink("a", "z")], "unknown site 'z'"),
        ("qk", ["a"], [SiteLink("a", "a")], "itself"),
        ("qk", ["a", "b"], [SiteLink("a", "b"), SiteLink("b", "a")], "twice"),
    ],
)
def test_bad_arguments_fail_before_any_ip_command(
    monkeypatch: pytest.MonkeyPatch,
    prefix: str,
    sites: list[str],
    links: list[SiteLink],
    match: str,
) -> None:
    def no_ip(args: Any) -> str:
        raise AssertionError(f"ip {args} run for invalid arguments")

    monkeypatch.setattr(netns, "_ip", no_ip)
    with pytest.raises(ValueError, match=match):
        NetnsTopology(prefix, sites, links)


def test_refused_netns_add_is_reported_with_its_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    real_ip = netns._ip

    def refusing_ip(args: Any) -> str:
        if list(args[:2]) == ["netns", "add"]:
            raise NetnsCommandError(["ip", *args], 1, "mount --make-shared: Permission denied")
        return real_ip(args)

    monkeypatch.setattr(netns, "_ip", refusing_ip)
    assert netns_problem() == "`ip netns add` failed: mount --make-shared: Permission denied"
    prefix = _prefix()
    with pytest.raises(NetnsUnavailable) as caught:
        NetnsTopology(prefix, ["a"], [])
    message = str(caught.value)
    assert f"ip netns add {prefix}-a" in message and "Permission denied" in message
    assert "loopback-only mode" in message
    assert _leftovers(prefix) == ([], [])
