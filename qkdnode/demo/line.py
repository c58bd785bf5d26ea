"""``qkdnode demo --topology line``: three sites, two links, one node in the middle.

alpha - bravo - charlie as three daemons from ``configs/line/*.toml`` (bravo is one daemon
with two links: the receiver of alpha-bravo and the transmitter of bravo-charlie). Flow:
copy the configs into the output directory on free loopback ports (state and logs there
too), start charlie, bravo, alpha, wait until both links exchange with identical key
stores, run ``duration_s``, then (unless ``fault`` is off) SIGKILL alpha, show that
bravo-charlie keeps committing while alpha-bravo is down, restart alpha and wait until
alpha-bravo commits again without an operator. The daemons are always stopped (SIGTERM,
then SIGKILL) on every exit path.

Key stores are compared by ``keys.digest`` (a hash: no key leaves a node).
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from qkdnode.demo.nodeconfig import free_tcp_ports
from qkdnode.demo.runner import DemoError, Reporter, _stop_with_parent

SITES = ("alpha", "bravo", "charlie")
#: (link, transmitter site, receiver site) in the order of the configs' control endpoints
LINKS = (("alpha-bravo", "alpha", "bravo"), ("bravo-charlie", "bravo", "charlie"))
POLL_S = 1.0
#: How long each phase may take on a loaded 2-core machine (s)
PHASE_TIMEOUT_S = 420.0
TERMINATE_TIMEOUT_S = 30.0


def rewrite_for_run(text: str, ports: dict[int, int], state_dir: Path) -> str:
    """A line config with every loopback port replaced by a free one (the same new port
    wherever the configs share one: ``ports`` maps old to new across the three files) and
    its state under ``state_dir``. One pass over whole port numbers."""

    def swap(m: re.Match[str]) -> str:
        old = int(m.group(1))
        if old not in ports:
            taken = set(ports.values())
            ports[old] = next(p for p in free_tcp_ports(8) if p not in taken)
        return f"tcp://127.0.0.1:{ports[old]}"

    text = re.sub(r"tcp://127\.0\.0\.1:(\d+)\b", swap, text)
    text, n = re.subn(r'^state_dir = "[^"]*"', f'state_dir = "{state_dir}"', text, flags=re.M)
    if n != 1:
        raise DemoError("a line config must have exactly one [node] state_dir")
    return text


def control_endpoints(config: Path) -> list[str]:
    """The control endpoints of a config, in file order (one per link)."""
    return re.findall(r'^control_endpoint = "([^"]+)"', config.read_text(), flags=re.M)


@dataclass
class Site:
    """One site's daemon (``qkdnode run --config``), restartable; each start logs to its
    own file. ``wrap`` turns the command line into the one to run (inside a network
    namespace, say)."""

    name: str
    config: Path
    log_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _log: IO[bytes] | None = None
    wrap: Callable[[list[str]], list[str]] | None = None

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        self._log = self.log_path.open("wb")
        argv = [sys.executable, "-m", "qkdnode", "run", "--config", str(self.config)]
        self.proc = subprocess.Popen(
            self.wrap(argv) if self.wrap is not None else argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_stop_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
        )

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise DemoError(
                f"site {self.name} exited with code {self.proc.returncode} (see {self.log_path})"
            )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TERMINATE_TIMEOUT_S)

    def terminate(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(TERMINATE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
        return self.proc.returncode


def stop_sites(sites: dict[str, Site], clients: dict[str, Any]) -> dict[str, int | None]:
    """Close the control clients, stop every site (SIGTERM, then SIGKILL); exit codes."""
    for client in clients.values():
        with contextlib.suppress(Exception):
            client.close()
    return {name: site.terminate() for name, site in sites.items()}


@dataclass
class LinkView:
    """What both ends of a link say: states and committed keys (count, digest)."""

    name: str
    states: tuple[str, str] = ("?", "?")
    counts: tuple[int, int] = (-1, -1)
    identical: bool = False

    @property
    def exchanging(self) -> bool:
        return self.states == ("EXCHANGING", "EXCHANGING")

    def line(self) -> str:
        same = "identical" if self.identical else "differ" if min(self.counts) >= 0 else "?"
        return f"{self.name}: {self.states[0]}/{self.states[1]} keys {self.counts[0]} ({same})"


@dataclass
class LineSummary:
    ok: bool = False
    failure: str | None = None
    links: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: seconds: both links exchanging after start; bravo-charlie's commits while alpha was
    #: down; alpha-bravo committing again after alpha's restart
    seconds_to_exchange: float | None = None
    keys_committed_while_alpha_down: int | None = None
    seconds_to_recover: float | None = None
    exit_codes: dict[str, int | None] = field(default_factory=dict)

    def to_json_line(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class LineDemo:
    def __init__(
        self, config_dir: Path, out_dir: Path, duration_s: float, fault: bool, report: Reporter
    ) -> None:
        self.out = out_dir.resolve()
        self.duration_s = duration_s
        self.fault = fault
        self.report = report
        self.out.mkdir(parents=True, exist_ok=True)
        ports: dict[int, int] = {}
        self.sites: dict[str, Site] = {}
        for name in SITES:
            src = config_dir / f"{name}.toml"
            try:
                text = src.read_text()
            except OSError as exc:
                raise DemoError(f"cannot read {src}: {exc.strerror or exc}") from None
            path = self.out / f"{name}.toml"
            path.write_text(rewrite_for_run(text, ports, self.out / "state" / name))
            self.sites[name] = Site(name, path, self.out)
        self.clients: dict[str, Any] = {}
        ends = {
            "alpha": control_endpoints(self.sites["alpha"].config),
            "bravo": control_endpoints(self.sites["bravo"].config),
            "charlie": control_endpoints(self.sites["charlie"].config),
        }
        #: link -> ((site, endpoint) of the transmitter, (site, endpoint) of the receiver)
        self.ends = {
            "alpha-bravo": (("alpha", ends["alpha"][0]), ("bravo", ends["bravo"][0])),
            "bravo-charlie": (("bravo", ends["bravo"][1]), ("charlie", ends["charlie"][0])),
        }

    # --- looking ----------------------------------------------------------------------
    def _call(self, endpoint: str, command: str) -> dict[str, Any] | None:
        from qkdnode.client import BusError, Client

        client = self.clients.get(endpoint)
        if client is None:
            client = self.clients[endpoint] = Client(endpoint, timeout_s=5.0)
        try:
            reply: dict[str, Any] = client.call(command)
            return reply
        except BusError:
            client.close()
            del self.clients[endpoint]
            return None

    def view(self, link: str) -> LinkView:
        states: list[str] = []
        digests: list[dict[str, Any] | None] = []
        for site, endpoint in self.ends[link]:
            proc = self.sites[site].proc
            alive = proc is not None and proc.poll() is None
            st = self._call(endpoint, "status") if alive else None
            states.append(str(st["state"]) if st else "down")
            digests.append(self._call(endpoint, "keys.digest") if alive else None)
        counts = tuple(int(d["count"]) if d else -1 for d in digests)
        identical = digests[0] is not None and digests[0] == digests[1]
        return LinkView(link, (states[0], states[1]), (counts[0], counts[1]), identical)

    def _wait(self, what: str, done: Callable[[dict[str, LinkView]], bool]) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < PHASE_TIMEOUT_S:
            for name, site in self.sites.items():
                if name != "alpha" or not self._alpha_down:
                    site.check_alive()
            views = {link: self.view(link) for link, _, _ in LINKS}
            self.report.live("  ".join(v.line() for v in views.values()))
            if done(views):
                self.report.end_live()
                return time.monotonic() - t0
            time.sleep(POLL_S)
        self.report.end_live()
        raise DemoError(f"timed out after {PHASE_TIMEOUT_S:g} s waiting for {what}")

    _alpha_down = False

    # --- the run ----------------------------------------------------------------------
    def run(self) -> LineSummary:
        summary = LineSummary()
        try:
            self._run(summary)
            summary.ok = True
        except DemoError as exc:
            summary.failure = str(exc)
            self.report.step(f"FAILED: {exc}")
        finally:
            summary.exit_codes = stop_sites(self.sites, self.clients)
            if any(code not in (0, None) for code in summary.exit_codes.values()):
                summary.ok = False
        return summary

    def _run(self, summary: LineSummary) -> None:
        r = self.report.step
        r(f"line alpha - bravo - charlie; configs, state and logs in {self.out}")
        for name in ("charlie", "bravo", "alpha"):
            self.sites[name].start()
        r(
            "started charlie, bravo (two links: receiver of alpha-bravo, transmitter of "
            "bravo-charlie) and alpha; waiting for both links to exchange key"
        )

        def both_in_step(views: dict[str, LinkView]) -> bool:
            return all(v.exchanging and v.identical and v.counts[0] > 0 for v in views.values())

        summary.seconds_to_exchange = round(self._wait("both links exchanging", both_in_step), 1)
        r(f"both links exchanging, identical keys after {summary.seconds_to_exchange} s")
        end = time.monotonic() + self.duration_s
        self._wait("the run's duration", lambda _v: time.monotonic() >= end)
        if self.fault:
            self._fault(summary)
        self._wait("both links in step at the end", both_in_step)
        for link, _, _ in LINKS:
            v = self.view(link)
            summary.links[link] = {
                "states": list(v.states),
                "keys": v.counts[0],
                "identical": v.identical,
            }
            r(f"{v.line()}")

    def _fault(self, summary: LineSummary) -> None:
        r = self.report.step
        r("SIGKILL alpha: alpha-bravo goes down; bravo-charlie must go on")
        self._alpha_down = True
        self.sites["alpha"].kill()
        before = self.view("bravo-charlie").counts[0]
        at_kill = self.view("alpha-bravo").counts[1]

        def bc_commits(views: dict[str, LinkView]) -> bool:
            v = views["bravo-charlie"]
            return v.exchanging and v.identical and v.counts[0] > before

        self._wait("bravo-charlie to commit with alpha down", bc_commits)
        after = self.view("bravo-charlie").counts[0]
        summary.keys_committed_while_alpha_down = after - before
        r(f"bravo-charlie committed {after - before} keys while alpha was down")
        r("restarting alpha (no operator command: alpha has autostart)")
        self._alpha_down = False
        self.sites["alpha"].start()

        def ab_back(views: dict[str, LinkView]) -> bool:
            v = views["alpha-bravo"]
            return v.exchanging and v.identical and v.counts[0] > at_kill

        summary.seconds_to_recover = round(self._wait("alpha-bravo to recover", ab_back), 1)
        r(f"alpha-bravo committing again {summary.seconds_to_recover} s after alpha's restart")


def run_line(
    config_dir: Path, out_dir: Path, duration_s: float, fault: bool, report: Reporter
) -> LineSummary:
    return LineDemo(config_dir, out_dir, duration_s, fault, report).run()
