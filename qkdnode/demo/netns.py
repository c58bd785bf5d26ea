"""A network of Linux network namespaces for multi-site tests and demos.

Each site gets its own network namespace, so each site's daemon has its own interfaces,
routing table and port space, and traffic between two sites crosses a real veth pair
instead of the shared loopback. Built with ``ip`` (iproute2) in subprocesses; needs root
(CAP_SYS_ADMIN and CAP_NET_ADMIN). Where that is missing, :func:`netns_problem` says why
and the sites can run in loopback-only mode instead (every daemon in the root namespace
on 127.0.0.1, as ``qkdnode demo`` does).

Layout of ``NetnsTopology("qk1", ["alpha", "bravo", "charlie"], [SiteLink("alpha",
"bravo"), SiteLink("bravo", "charlie")])`` (management block ``B``, see below)::

                          root namespace (the test process)
     qk1m0 198.19.B.1/30        qk1m1 198.19.B.5/30        qk1m2 198.19.B.9/30
            |  veth                    |  veth                    |  veth
     mgmt 198.19.B.2/30         mgmt 198.19.B.6/30         mgmt 198.19.B.10/30
    +-----------------+        +-----------------+        +-----------------+
    | netns qk1-alpha |  veth  | netns qk1-bravo |  veth  |netns qk1-charlie|
    |  lo (up)        |        |  lo (up)        |        |  lo (up)        |
    |  l0a 198.18.0.1 +--------+ l0b 198.18.0.2  |        |                 |
    |                 |        |  l1a 198.18.0.5 +--------+ l1b 198.18.0.6  |
    +-----------------+        +-----------------+        +-----------------+

Address plan (only inside 198.18.0.0/15, the range reserved for benchmarking, RFC 2544):

- **Links**, 198.18.0.0/16: link ``i`` (its position in ``links``) is the /30 starting at
  198.18.0.0 + 4*i, that is ``198.18.(i // 64).(4 * (i % 64))/30``; side ``a`` of the
  link has host .1 of it, side ``b`` host .2. The interfaces are ``l{i}a`` in ``a``'s
  namespace and ``l{i}b`` in ``b``'s (names only need to be unique inside a namespace).
  Up to 16384 links. Each /30 exists only inside the two namespaces of its link, so two
  topologies never clash on link addresses.
- **Management**, 198.19.0.0/16, cut into 256 blocks of a /24: a topology takes the
  lowest block ``B`` that no address or route of the root namespace touches (chosen under
  a host-wide lock file, so topologies built in parallel get different blocks); site
  ``j`` (its position in ``sites``) gets the /30 ``198.19.B.(4*j)/30``, the root side
  ``{prefix}m{j}`` host .1 and the namespace side ``mgmt`` host .2 (returned by
  :meth:`NetnsTopology.mgmt_address`). Up to 64 sites per topology with management.

Only connected routes exist: no default route, no forwarding. A site reaches its direct
neighbours on their link addresses and nothing else; the root namespace reaches every site
at its management address; a site does not reach another site's management address. A
multi-hop path therefore has to be relayed by the daemons themselves, as trusted nodes do.

Everything this module creates carries the prefix: namespaces ``{prefix}-{site}`` and root
veths ``{prefix}m{j}``. It never touches any other interface or namespace. Stale objects
of the same prefix (from a crashed earlier run) are removed before building; a process
still running in a stale namespace keeps that namespace alive without a name, harmless
to the new topology. The only other trace is the empty lock file ``qkdnode-netns.lock``
(under /run/lock when writable).

Use::

    with NetnsTopology("qk1", ["alpha", "bravo"], [SiteLink("alpha", "bravo")]) as net:
        bravo = net.popen("bravo", ["qkdnode", "run", "--config", "bravo.toml"])
        # the config binds the link's side to net.address("bravo", "alpha"); the test
        # reaches bravo's ETSI server and control bus at net.mgmt_address("bravo")
        net.link_down("alpha", "bravo")  # cut the fibre and the classical channel
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "LINK_NET",
    "MGMT_NET",
    "LinkPlan",
    "MgmtPlan",
    "NetnsCommandError",
    "NetnsTopology",
    "NetnsUnavailable",
    "SiteLink",
    "link_network",
    "mgmt_network",
    "netns_problem",
]

#: Where the point-to-point links between sites take their /30s.
LINK_NET = ipaddress.IPv4Network("198.18.0.0/16")
#: Where the root-to-site management links take their /30s (one /24 block per topology).
MGMT_NET = ipaddress.IPv4Network("198.19.0.0/16")
MAX_LINKS = LINK_NET.num_addresses // 4
MAX_MGMT_SITES = 64
MGMT_BLOCKS = 256

#: A prefix: short (root veth names ``{prefix}m{j}`` must fit the kernel's 15 characters)
#: and without ``-`` (so that ``{prefix}-`` never matches another prefix's namespaces).
PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,9}")
#: A site: usable in a namespace name (a file name under the netns run directory).
SITE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: The interface name of a site's management veth, inside the site's namespace.
MGMT_IFNAME = "mgmt"

IP_TIMEOUT_S = 30.0
CHILD_TERMINATE_S = 3.0
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21

_VETH_PEER = ("type", "veth", "peer", "name")
_LOOPBACK_HINT = (
    "run the sites in loopback-only mode instead (every daemon in the root namespace on "
    "127.0.0.1, as `qkdnode demo` does)"
)


class NetnsUnavailable(RuntimeError):
    """This host (or this process) cannot build network namespaces. The message says why
    (not root or no CAP_SYS_ADMIN, ``ip`` missing, ``ip netns add`` failed with its
    stderr) and suggests the loopback-only mode."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"network namespaces are unavailable: {reason}; {_LOOPBACK_HINT}")


class NetnsCommandError(RuntimeError):
    """An ``ip`` command failed; the message has the command line, exit code and stderr."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        status = "timed out" if returncode is None else f"exit {returncode}"
        super().__init__(f"`{' '.join(self.argv)}` failed ({status}): {self.stderr or '-'}")


def _ip(args: Sequence[str]) -> str:
    """Run ``ip *args`` and return its stdout.

    Raises :class:`NetnsUnavailable` when ``ip`` is not installed (or not executable) and
    :class:`NetnsCommandError` when it exits non-zero or takes over ``IP_TIMEOUT_S``."""
    argv = ["ip", *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    except FileNotFoundError as exc:
        raise NetnsUnavailable("the `ip` command (iproute2) is not installed") from exc
    except OSError as exc:
        raise NetnsUnavailable(f"the `ip` command cannot be run: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise NetnsCommandError(argv, None, f"no answer within {IP_TIMEOUT_S:g} s") from exc
    if done.returncode != 0:
        raise NetnsCommandError(argv, done.returncode, done.stderr)
    return done.stdout


def _privilege_problem() -> str | None:
    """Why this process may not create namespaces (``ip`` missing, capabilities), else None.
    Reads the effective capabilities from /proc; when that is unreadable, assumes root is
    enough (creating the namespace will tell)."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        status = ""
    match = re.search(r"^CapEff:\s*([0-9a-fA-F]+)$", status, re.MULTILINE)
    if match is None:
        return None if os.geteuid() == 0 else f"not running as root (euid {os.geteuid()})"
    caps = int(match.group(1), 16)
    missing = [
        name
        for name, bit in (("CAP_SYS_ADMIN", CAP_SYS_ADMIN), ("CAP_NET_ADMIN", CAP_NET_ADMIN))
        if not caps & (1 << bit)
    ]
    if not missing:
        return None
    lacking = " and ".join(missing)
    if os.geteuid() == 0:
        return f"running as root but without {lacking} (an unprivileged container?)"
    return f"not running as root (euid {os.geteuid()}) and without {lacking}"


def netns_problem() -> str | None:
    """None when this host can create namespaces and veth pairs, else the reason in one
    sentence.

    Checks for ``ip`` and the capabilities, then really tries: adds a probe namespace with
    a unique name, a veth pair inside it, runs ``true`` in it with ``ip netns exec`` and
    deletes the namespace again (also when a step fails). Takes some tens of milliseconds.
    Never raises."""
    problem = _privilege_problem()
    if problem is not None:
        return problem
    probe = f"qknetnsprobe-{os.getpid()}-{secrets.token_hex(4)}"
    steps: list[tuple[str, list[str]]] = [
        ("`ip netns add` failed", ["netns", "add", probe]),
        ("creating a veth pair failed", ["-n", probe, "link", "add", "p0", *_VETH_PEER, "p1"]),
        ("`ip netns exec` failed", ["netns", "exec", probe, "true"]),
    ]
    try:
        for what, args in steps:
            try:
                _ip(args)
            except NetnsCommandError as exc:
                return f"{what}: {exc.stderr or f'exit {exc.returncode}'}"
            except NetnsUnavailable as exc:
                return exc.reason
    finally:
        with contextlib.suppress(NetnsCommandError, NetnsUnavailable):
            _ip(["netns", "delete", probe])
    return None


@dataclass(frozen=True)
class SiteLink:
    """One point-to-point link between two sites (an unordered pair, but ``a`` and ``b``
    decide which side takes host .1 and which .2 of the link's /30)."""

    a: str
    b: str


def link_network(index: int) -> ipaddress.IPv4Network:
    """The /30 of link ``index``: ``198.18.(index // 64).(4 * (index % 64))/30``.

    Raises ValueError outside ``0 <= index < MAX_LINKS``."""
    if not 0 <= index < MAX_LINKS:
        raise ValueError(f"link index {index} outside 0..{MAX_LINKS - 1}")
    return ipaddress.IPv4Network((int(LINK_NET.network_address) + 4 * index, 30))


def mgmt_network(block: int, index: int) -> ipaddress.IPv4Network:
    """The management /30 of site ``index`` in block ``block``: ``198.19.block.(4*index)/30``.

    Raises ValueError outside ``0 <= block < 256`` or ``0 <= index < 64``."""
    if not 0 <= block < MGMT_BLOCKS or not 0 <= index < MAX_MGMT_SITES:
        raise ValueError(f"management block {block} / site index {index} out of range")
    base = int(MGMT_NET.network_address) + 256 * block + 4 * index
    return ipaddress.IPv4Network((base, 30))


@dataclass(frozen=True)
class LinkPlan:
    """Where link ``index`` lives: its /30, and each side's namespace, interface, address."""

    index: int
    a: str
    b: str
    network: ipaddress.IPv4Network
    a_ns: str
    b_ns: str

    @property
    def a_if(self) -> str:
        """Side ``a``'s interface name (inside ``a_ns``)."""
        return f"l{self.index}a"

    @property
    def b_if(self) -> str:
        """Side ``b``'s interface name (inside ``b_ns``)."""
        return f"l{self.index}b"

    @property
    def a_address(self) -> ipaddress.IPv4Address:
        """Side ``a``'s address: host .1 of the /30."""
        return self.network.network_address + 1

    @property
    def b_address(self) -> ipaddress.IPv4Address:
        """Side ``b``'s address: host .2 of the /30."""
        return self.network.network_address + 2

    def ends(self) -> tuple[tuple[str, str, ipaddress.IPv4Address], ...]:
        """(namespace, interface, address) of side ``a`` and of side ``b``."""
        return (
            (self.a_ns, self.a_if, self.a_address),
            (self.b_ns, self.b_if, self.b_address),
        )


@dataclass(frozen=True)
class MgmtPlan:
    """A site's management veth: root side ``root_if`` (.1), ``mgmt`` in the site (.2)."""

    site: str
    index: int
    network: ipaddress.IPv4Network
    root_if: str
    site_ns: str

    @property
    def root_address(self) -> ipaddress.IPv4Address:
        """The root namespace's address on this management link (host .1)."""
        return self.network.network_address + 1

    @property
    def site_address(self) -> ipaddress.IPv4Address:
        """The site's address on this management link (host .2)."""
        return self.network.network_address + 2


def _validate(
    prefix: str, sites: Sequence[str], links: Sequence[SiteLink], management: bool
) -> None:
    """Raises ValueError naming the first thing wrong with the arguments."""
    if not PREFIX_RE.fullmatch(prefix):
        raise ValueError(
            f"prefix {prefix!r} must be 1-10 characters of a-z and 0-9 starting with a letter "
            "(root veth names must fit in 15 characters; '-' separates prefix and site)"
        )
    if not sites:
        raise ValueError("at least one site is needed")
    for site in sites:
        if not SITE_RE.fullmatch(site):
            raise ValueError(
                f"site {site!r} must be 1-64 characters of letters, digits, '_', '.', '-', "
                "starting with a letter or digit"
            )
    if len(set(sites)) != len(sites):
        raise ValueError(f"sites repeat: {list(sites)}")
    if management and len(sites) > MAX_MGMT_SITES:
        raise ValueError(f"{len(sites)} sites: management supports at most {MAX_MGMT_SITES}")
    if len(links) > MAX_LINKS:
        raise ValueError(f"{len(links)} links: at most {MAX_LINKS}")
    seen: set[frozenset[str]] = set()
    for link in links:
        for end in (link.a, link.b):
            if end not in sites:
                raise ValueError(f"link {link.a}-{link.b}: unknown site {end!r}")
        if link.a == link.b:
            raise ValueError(f"link {link.a}-{link.b} joins a site to itself")
        pair = frozenset((link.a, link.b))
        if pair in seen:
            raise ValueError(f"link {link.a}-{link.b} given twice")
        seen.add(pair)


def _lock_dir() -> Path:
    for candidate in (Path("/run/lock"), Path("/run")):
        if candidate.is_dir() and os.access(candidate, os.W_OK):
            return candidate
    return Path(tempfile.gettempdir())


@contextlib.contextmanager
def _host_lock() -> Iterator[None]:
    """An exclusive lock shared by every topology on this host (a lock file), held while
    a topology picks and configures its management block."""
    fd = os.open(_lock_dir() / "qkdnode-netns.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # also releases the lock


_ROUTE_TYPES = {"unicast", "local", "broadcast", "multicast", "anycast", "blackhole"}
_ROUTE_TYPES |= {"unreachable", "prohibit", "throw", "nat"}


def _root_networks_in_mgmt() -> list[ipaddress.IPv4Network]:
    """Every network in 198.19.0.0/16 that an address or a route of the root namespace
    uses (a /30 of another topology's management veth, for instance)."""
    found: list[ipaddress.IPv4Network] = []
    for line in _ip(["-o", "-4", "addr", "show"]).splitlines():
        match = re.search(r"\binet (\S+)", line)
        if match:
            found.append(ipaddress.IPv4Interface(match.group(1)).network)
    for line in _ip(["-4", "route", "show", "table", "all"]).splitlines():
        words = line.split()
        if words and words[0] in _ROUTE_TYPES:
            words = words[1:]
        if not words or words[0] == "default":
            continue
        with contextlib.suppress(ValueError):
            found.append(ipaddress.IPv4Network(words[0], strict=False))
    return [net for net in found if net.subnet_of(MGMT_NET)]


def _free_mgmt_block() -> int:
    """The lowest /24 block of 198.19.0.0/16 that the root namespace does not use.
    Raises RuntimeError when all 256 are taken."""
    used = _root_networks_in_mgmt()
    for block in range(MGMT_BLOCKS):
        net = ipaddress.IPv4Network((int(MGMT_NET.network_address) + 256 * block, 24))
        if not any(net.overlaps(u) for u in used):
            return block
    raise RuntimeError(f"no free /24 left in {MGMT_NET} for management veths")


def _namespaces_with(prefix: str) -> list[str]:
    """The namespaces named ``{prefix}-*`` (and only those)."""
    names = [line.split()[0] for line in _ip(["netns", "list"]).splitlines() if line.strip()]
    return [name for name in names if name.startswith(f"{prefix}-")]


def _root_veths_with(prefix: str) -> list[str]:
    """The veths of the root namespace named ``{prefix}m<digits>`` (and only those)."""
    pattern = re.compile(rf"{re.escape(prefix)}m\d+")
    found = []
    for line in _ip(["-o", "link", "show", "type", "veth"]).splitlines():
        fields = line.split(":", 2)
        if len(fields) >= 2:
            name = fields[1].strip().split("@", 1)[0]
            if pattern.fullmatch(name):
                found.append(name)
    return found


class NetnsTopology:
    """A network of namespaces, one per site, joined by veth pairs (see the module doc).

    ``NetnsTopology(prefix, sites, links, *, management=True)`` builds everything at once
    (first removing what an earlier run with the same ``prefix`` left behind) and is a
    context manager whose exit calls :meth:`close`. A ``prefix`` must be unique among the
    topologies alive on the host (use a random one in tests); a new topology deletes
    whatever carries its prefix.

    Raises ValueError for bad arguments (checked before any ``ip`` command),
    :class:`NetnsUnavailable` when the host cannot create namespaces (with the reason),
    :class:`NetnsCommandError` (a RuntimeError) when any other ``ip`` command fails, with
    the command and its stderr. On any failure during construction, whatever was already
    created is removed before the exception propagates."""

    def __init__(
        self,
        prefix: str,
        sites: Sequence[str],
        links: Iterable[SiteLink],
        *,
        management: bool = True,
    ) -> None:
        links = list(links)
        sites = list(sites)
        _validate(prefix, sites, links, management)
        self.prefix = prefix
        self.sites: tuple[str, ...] = tuple(sites)
        self.management = management
        self.links: tuple[LinkPlan, ...] = tuple(
            LinkPlan(i, link.a, link.b, link_network(i), self._ns(link.a), self._ns(link.b))
            for i, link in enumerate(links)
        )
        self.mgmt: dict[str, MgmtPlan] = {}
        self.mgmt_block: int | None = None
        #: What :meth:`close` could not remove (each entry: the failed command and why).
        self.cleanup_errors: list[str] = []
        self._children: list[subprocess.Popen[Any]] = []
        self._made_namespaces: list[str] = []
        self._made_root_veths: list[str] = []
        self._closed = False

        problem = _privilege_problem()
        if problem is not None:
            raise NetnsUnavailable(problem)
        try:
            self._remove_stale()
            self._build()
        except BaseException:
            self.close()
            raise

    # -- building -------------------------------------------------------------------------

    def _ns(self, site: str) -> str:
        return f"{self.prefix}-{site}"

    def _remove_stale(self) -> None:
        """Delete root veths and namespaces of this prefix left by an earlier run."""
        for name in _root_veths_with(self.prefix):
            _ip(["link", "delete", name])
        for ns in _namespaces_with(self.prefix):
            _ip(["netns", "delete", ns])

    def _build(self) -> None:
        for site in self.sites:
            ns = self._ns(site)
            try:
                _ip(["netns", "add", ns])
            except NetnsCommandError as exc:
                raise NetnsUnavailable(
                    f"`{' '.join(exc.argv)}` failed: {exc.stderr or f'exit {exc.returncode}'}"
                ) from exc
            self._made_namespaces.append(ns)
            _ip(["-n", ns, "link", "set", "dev", "lo", "up"])
        for link in self.links:
            # Created directly in both namespaces: the names never exist in the root one.
            a_end = [link.a_if, "netns", link.a_ns]
            _ip(["link", "add", *a_end, *_VETH_PEER, link.b_if, "netns", link.b_ns])
            for ns, ifname, addr in link.ends():
                _ip(["-n", ns, "addr", "add", f"{addr}/30", "dev", ifname])
                _ip(["-n", ns, "link", "set", "dev", ifname, "up"])
        if self.management:
            with _host_lock():
                self.mgmt_block = _free_mgmt_block()
                for j, site in enumerate(self.sites):
                    self._add_mgmt(j, site, self.mgmt_block)

    def _add_mgmt(self, index: int, site: str, block: int) -> None:
        plan = MgmtPlan(
            site, index, mgmt_network(block, index), f"{self.prefix}m{index}", self._ns(site)
        )
        _ip(["link", "add", plan.root_if, *_VETH_PEER, MGMT_IFNAME, "netns", plan.site_ns])
        self._made_root_veths.append(plan.root_if)
        _ip(["addr", "add", f"{plan.root_address}/30", "dev", plan.root_if])
        _ip(["-n", plan.site_ns, "addr", "add", f"{plan.site_address}/30", "dev", MGMT_IFNAME])
        _ip(["link", "set", "dev", plan.root_if, "up"])
        _ip(["-n", plan.site_ns, "link", "set", "dev", MGMT_IFNAME, "up"])
        self.mgmt[site] = plan

    # -- lookups ----------------------------------------------------------------------------

    def _check_site(self, site: str) -> None:
        if site not in self.sites:
            raise KeyError(f"unknown site {site!r} (sites: {', '.join(self.sites)})")

    def link(self, site: str, peer: str) -> LinkPlan:
        """The link between ``site`` and ``peer`` (either order).
        Raises KeyError naming both when there is none."""
        for link in self.links:
            if {link.a, link.b} == {site, peer} and site != peer:
                return link
        raise KeyError(f"no link between {site!r} and {peer!r}")

    def address(self, site: str, peer: str) -> str:
        """``site``'s IPv4 address on its link to ``peer``.
        Raises KeyError naming both when the two sites share no link."""
        link = self.link(site, peer)
        return str(link.a_address if site == link.a else link.b_address)

    def interface(self, site: str, peer: str) -> str:
        """The name (inside ``site``'s namespace) of ``site``'s interface towards ``peer``.
        Raises KeyError naming both when the two sites share no link."""
        link = self.link(site, peer)
        return link.a_if if site == link.a else link.b_if

    def mgmt_address(self, site: str) -> str:
        """The address at which the root namespace reaches ``site``'s services.
        Raises KeyError for an unknown site and RuntimeError when built with
        ``management=False``."""
        self._check_site(site)
        if not self.management:
            raise RuntimeError("this topology was built with management=False")
        return str(self.mgmt[site].site_address)

    def namespace(self, site: str) -> str:
        """The network namespace name of ``site``. Raises KeyError for an unknown site."""
        self._check_site(site)
        return self._ns(site)

    # -- running in a site ------------------------------------------------------------------

    def wrap(self, site: str, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside ``site``'s namespace (``ip netns exec``).
        Raises KeyError for an unknown site."""
        return ["ip", "netns", "exec", self.namespace(site), *argv]

    def popen(self, site: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``site``'s namespace (``kwargs`` go to Popen). The process
        is remembered: :meth:`close` stops it if it is still running then. Raises KeyError
        for an unknown site, RuntimeError after :meth:`close`, and what Popen raises."""
        self._check_open()
        proc: subprocess.Popen[Any] = subprocess.Popen(self.wrap(site, argv), **kwargs)
        self._children.append(proc)
        return proc

    def run(
        self, site: str, argv: Sequence[str], **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` to completion inside ``site``'s namespace (``kwargs`` go to
        subprocess.run). Raises KeyError for an unknown site, RuntimeError after
        :meth:`close`, and what subprocess.run raises."""
        self._check_open()
        return subprocess.run(self.wrap(site, argv), **kwargs)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"topology {self.prefix!r} is closed")

    # -- faults -----------------------------------------------------------------------------

    def link_down(self, a: str, b: str) -> None:
        """Set both ends of the ``a``-``b`` link down (a cut fibre or classical channel).
        The routes over it disappear with it, so a connect across it fails at once with
        "Network is unreachable" rather than timing out. Raises KeyError naming both when
        there is no such link, NetnsCommandError when ``ip`` fails."""
        self._set_link(a, b, "down")

    def link_up(self, a: str, b: str) -> None:
        """Set both ends of the ``a``-``b`` link up again (addresses and routes return).
        Raises KeyError naming both when there is no such link, NetnsCommandError when
        ``ip`` fails."""
        self._set_link(a, b, "up")

    def _set_link(self, a: str, b: str, state: str) -> None:
        for ns, ifname, _addr in self.link(a, b).ends():
            _ip(["-n", ns, "link", "set", "dev", ifname, state])

    # -- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the processes started by :meth:`popen` that still run (SIGTERM, then
        SIGKILL after ``CHILD_TERMINATE_S``), delete every root veth and namespace this
        topology made and then anything else carrying its prefix (which also covers objects
        of a half-finished construction). Idempotent; never raises: what could not be
        removed is appended to :attr:`cleanup_errors`."""
        self._closed = True
        children, self._children = self._children, []
        for proc in children:
            self._stop(proc)
        for name in self._made_root_veths:
            self._quietly(["link", "delete", name])
        self._made_root_veths = []
        for ns in self._made_namespaces:
            self._quietly(["netns", "delete", ns])
        self._made_namespaces = []
        try:
            for name in _root_veths_with(self.prefix):
                self._quietly(["link", "delete", name])
            for ns in _namespaces_with(self.prefix):
                self._quietly(["netns", "delete", ns])
        except Exception as exc:
            self.cleanup_errors.append(str(exc))

    def _quietly(self, args: list[str]) -> None:
        try:
            _ip(args)
        except Exception as exc:
            self.cleanup_errors.append(str(exc))

    def _stop(self, proc: subprocess.Popen[Any]) -> None:
        try:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(CHILD_TERMINATE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(CHILD_TERMINATE_S)
        except Exception as exc:
            self.cleanup_errors.append(f"stopping pid {proc.pid}: {exc}")

    def __enter__(self) -> NetnsTopology:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        sites = list(self.sites)
        return f"NetnsTopology({self.prefix!r}, sites={sites}, links={len(self.links)}, {state})"
