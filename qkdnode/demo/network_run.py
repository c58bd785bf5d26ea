"""``qkdnode demo --network FILE``: a trusted-node network of several sites, end to end.

Flow: pick the mode (network namespaces when the host allows it, else loopback; the
spec's ``run.mode`` may insist on one), build the namespaces (one per site, a veth pair
per link, a management veth per site), write every site's config, start one daemon per
site (inside its namespace), wait until every link exchanges key and the key managers
see every link up, then act as the SAEs: every ``request_interval_s`` the origin SAE asks
its site's KME for keys for the destination SAE (ETSI enc_keys), the destination SAE
fetches them at its own site (dec_keys) and the bytes are compared. Mid-run the link
``run.cut`` is cut (its veth pair goes down; on loopback the two sites' key managers
take it out and its photons stop) and the SAEs go on: the summary says how long until the
first key arrived over another path. At the end each site's key manager reports the key
it drew and erased per link, which the summary sets against the relayed key bits.

The daemons are stopped on every exit path (SIGTERM, then SIGKILL), the namespaces
deleted. The last line of ``--json`` output is the summary.
"""

from __future__ import annotations

import contextlib
import functools
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qkdnode.delivery.sae_client import EtsiClient, EtsiClientError
from qkdnode.demo.line import Site, stop_sites
from qkdnode.demo.network_configs import Addressing, NetworkFiles, write_network_configs
from qkdnode.demo.network_spec import NetworkDemoSpec
from qkdnode.demo.runner import DemoError, Reporter

POLL_S = 1.0


@dataclass
class LinkAccounting:
    """Key one link gave the key managers (bits): drawn by its sending ends, erased by its
    receiving ends, and the end-to-end key whose path crossed it."""

    relay_drawn_bits: int = 0
    relay_erased_bits: int = 0
    auth_drawn_bits: int = 0
    auth_erased_bits: int = 0
    relayed_key_bits: int = 0


@dataclass
class NetworkSummary:
    ok: bool = False
    failure: str | None = None
    mode: str = ""
    netns_problem: str | None = None
    sites: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    seconds_to_exchange: float | None = None
    requests: int = 0
    requests_ok: int = 0
    requests_refused: int = 0
    relayed_keys: int = 0
    relayed_key_bits: int = 0
    keys_identical: bool = False
    mismatches: int = 0
    cut: str | None = None
    requests_ok_after_cut: int = 0
    reroute_s: float | None = None
    median_enc_keys_ms: float | None = None
    median_dec_keys_ms: float | None = None
    accounting: dict[str, LinkAccounting] = field(default_factory=dict)
    accounting_ok: bool = False
    refusals: list[str] = field(default_factory=list)
    exit_codes: dict[str, int | None] = field(default_factory=dict)

    def to_json_line(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class NetworkDemo:
    def __init__(
        self, spec: NetworkDemoSpec, out_dir: Path, report: Reporter, mode: str | None = None
    ) -> None:
        self.spec = spec
        self.out = out_dir.resolve()
        self.report = report
        self.mode_wanted = mode or spec.run.mode
        self.topology: Any = None
        self.files: NetworkFiles | None = None
        self.sites: dict[str, Site] = {}
        self.clients: dict[str, Any] = {}

    # --- setting up -----------------------------------------------------------------------
    def _choose_mode(self, summary: NetworkSummary) -> str:
        from qkdnode.demo.netns import netns_problem

        problem = netns_problem() if self.mode_wanted in ("auto", "netns") else None
        summary.netns_problem = problem
        if self.mode_wanted == "netns" and problem is not None:
            raise DemoError(
                f"network namespaces are not available here: {problem}; run with "
                "--network-mode loopback (every site on 127.0.0.1)"
            )
        if self.mode_wanted == "loopback" or problem is not None:
            return "loopback"
        return "netns"

    def _setup(self, summary: NetworkSummary) -> None:
        spec = self.spec
        self.out.mkdir(parents=True, exist_ok=True)
        summary.mode = self._choose_mode(summary)
        if summary.mode == "netns":
            from qkdnode.demo.netns import NetnsTopology, SiteLink

            self.topology = NetnsTopology(
                "qkn",
                spec.sites,
                [SiteLink(link.a, link.b) for link in spec.links],
                management=True,
            )
            topo = self.topology
            by_id = {link.id: link for link in spec.links}
            addr = Addressing.namespaces(
                lambda link_id: topo.address(by_id[link_id].a, by_id[link_id].b),
                topo.mgmt_address,
            )
        else:
            addr = Addressing.loopback()
        self.files = write_network_configs(spec, self.out, addr)
        for site in spec.sites:
            wrap = (
                functools.partial(self.topology.wrap, site) if self.topology is not None else None
            )
            self.sites[site] = Site(site, self.files.configs[site], self.out, wrap=wrap)

    # --- looking --------------------------------------------------------------------------
    def _client(self, site: str, endpoint: str) -> Any:
        from qkdnode.client import Client

        files = self.files
        assert files is not None
        client = self.clients.get(endpoint)
        if client is None:
            if files.client_keys is not None:
                client = Client(
                    endpoint,
                    files.server_public[site],
                    files.client_keys[1],
                    timeout_s=5.0,
                )
            else:
                client = Client(endpoint, timeout_s=5.0)
            self.clients[endpoint] = client
        return client

    def call(self, site: str, command: str, **content: Any) -> dict[str, Any] | None:
        """``command`` at ``site`` (on its first link's control endpoint); None if no
        answer."""
        from qkdnode.client import BusError

        assert self.files is not None
        endpoint = next(
            ends.tx[1] if ends.tx[0] == site else ends.rx[1]
            for ends in self.files.links.values()
            if site in (ends.tx[0], ends.rx[0])
        )
        try:
            reply: dict[str, Any] = self._client(site, endpoint).call(command, **content)
            return reply
        except BusError:
            client = self.clients.pop(endpoint, None)
            if client is not None:
                client.close()
            return None

    def _view(self, site: str) -> dict[str, Any] | None:
        return self.call(site, "network")

    def _ready(self) -> tuple[bool, str]:
        view = self._view(self.spec.sites[0])
        if view is None:
            return False, "no answer yet"
        parts = []
        ready = True
        for link in view["links"]:
            a, b = link["a"], link["b"]
            levels = f"{a['level_bits'] // 1000}k/{b['level_bits'] // 1000}k"
            up = link["usable"] and min(a["level_bits"], b["level_bits"]) >= 4096
            ready = ready and up
            parts.append(f"{link['link_id']} {'up' if link['usable'] else 'down'} {levels}")
        return ready, "  ".join(parts)

    def _wait(self, what: str, timeout_s: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            for site in self.sites.values():
                site.check_alive()
            ready, line = self._ready()
            self.report.live(f"[{time.monotonic() - t0:5.0f} s] {line}")
            if ready:
                self.report.end_live()
                return time.monotonic() - t0
            time.sleep(POLL_S)
        self.report.end_live()
        raise DemoError(f"timed out after {timeout_s:g} s waiting for {what}")

    # --- the SAEs ---------------------------------------------------------------------------
    def _sae(self, sae_id: str) -> EtsiClient:
        files = self.files
        assert files is not None
        ca, cert, key = files.sae_files(sae_id)
        return EtsiClient(files.etsi_urls[self.spec.site_of(sae_id)], ca, cert, key)

    def _traffic(
        self, summary: NetworkSummary, seconds: float, enc_ms: list[float], dec_ms: list[float]
    ) -> tuple[int, float | None]:
        """SAE requests for ``seconds``; returns (successes, time of the first success)."""
        run = self.spec.run
        origin, dest = self._sae(run.origin_sae), self._sae(run.destination_sae)
        end = time.monotonic() + seconds
        ok = 0
        first: float | None = None
        while time.monotonic() < end:
            t0 = time.monotonic()
            summary.requests += 1
            try:
                keys = origin.enc_keys(run.destination_sae, run.keys_per_request, run.key_size_bits)
                t1 = time.monotonic()
                got = dest.dec_keys(run.origin_sae, [k.key_id for k in keys])
                t2 = time.monotonic()
            except EtsiClientError as exc:
                summary.requests_refused += 1
                if len(summary.refusals) < 10:
                    summary.refusals.append(str(exc)[:200])
                self.report.live(f"request {summary.requests}: {exc}"[:160])
            else:
                enc_ms.append(1000 * (t1 - t0))
                dec_ms.append(1000 * (t2 - t1))
                same = [g.key for g in got] == [k.key for k in keys]
                if same:
                    ok += 1
                    first = first if first is not None else t2
                    summary.requests_ok += 1
                    summary.relayed_keys += len(keys)
                    summary.relayed_key_bits += sum(8 * len(k.key) for k in keys)
                else:
                    summary.mismatches += 1
                self.report.live(
                    f"request {summary.requests}: {len(keys)} keys, "
                    f"{'identical' if same else 'DIFFERENT'} at both ends; "
                    f"{summary.relayed_keys} keys so far"
                )
            time.sleep(max(0.0, run.request_interval_s - (time.monotonic() - t0)))
        self.report.end_live()
        return ok, first

    def _cut(self, link_id: str) -> None:
        link = next(lk for lk in self.spec.links if lk.id == link_id)
        if self.topology is not None:
            self.topology.link_down(link.a, link.b)
            return
        # loopback: no interface to take down; the two key managers take the link out and
        # its light stops (the transmitter's simulated fibre is cut)
        for site in (link.a, link.b):
            self.call(site, "network.link", link_id=link_id, enabled=False)
        assert self.files is not None
        tx_site, tx_endpoint = self.files.links[link_id].tx
        with contextlib.suppress(Exception):
            self._client(tx_site, tx_endpoint).call("sim.inject", fault="fiber_cut")

    def _accounting(self, summary: NetworkSummary) -> None:
        views = {site: self._view(site) for site in self.spec.sites}
        acc = {link.id: LinkAccounting() for link in self.spec.links}
        origin = self.spec.site_of(self.spec.run.origin_sae)
        for site, view in views.items():
            if view is None:
                raise DemoError(f"site {site} did not report its key manager's accounting")
            for local in view["local_links"]:
                a = acc[local["link_id"]]
                a.relay_drawn_bits += local["relay_out_bits"]
                a.relay_erased_bits += local["relay_in_bits"]
                a.auth_drawn_bits += local["auth_out_bits"]
                a.auth_erased_bits += local["auth_in_bits"]
            if site == origin:
                for link_id, bits in view["relays"]["bits_by_link"].items():
                    acc[link_id].relayed_key_bits += bits
        summary.accounting = acc
        summary.accounting_ok = all(
            a.relay_erased_bits <= a.relay_drawn_bits
            and a.relayed_key_bits <= a.relay_drawn_bits
            and a.auth_erased_bits <= a.auth_drawn_bits
            for a in acc.values()
        )

    # --- the run ----------------------------------------------------------------------------
    def run(self) -> NetworkSummary:
        summary = NetworkSummary(
            sites=list(self.spec.sites),
            links=[link.id for link in self.spec.links],
            cut=self.spec.run.cut,
        )
        try:
            self._setup(summary)
            self._run(summary)
            summary.ok = (
                summary.requests_ok > 0
                and summary.mismatches == 0
                and summary.accounting_ok
                and (summary.cut is None or summary.requests_ok_after_cut > 0)
            )
            if not summary.ok and summary.failure is None:
                summary.failure = "no end-to-end key after the cut, a mismatch, or bad accounting"
        except DemoError as exc:
            summary.failure = str(exc)
            self.report.step(f"FAILED: {exc}")
        finally:
            summary.exit_codes = stop_sites(self.sites, self.clients)
            if self.topology is not None:
                self.topology.close()
            if any(code not in (0, None) for code in summary.exit_codes.values()):
                summary.ok = False
        return summary

    def _run(self, summary: NetworkSummary) -> None:
        r = self.report.step
        spec = self.spec
        run = spec.run
        r(
            f"network of {len(spec.sites)} sites ({', '.join(spec.sites)}) and "
            f"{len(spec.links)} links, mode {summary.mode}; configs, state, logs in {self.out}"
        )
        if summary.netns_problem is not None:
            r(f"(no network namespaces here: {summary.netns_problem})")
        for site in self.sites.values():
            site.start()
        r("started one daemon per site; waiting for every link to exchange key")
        summary.seconds_to_exchange = round(
            self._wait("every link up with key", run.warmup_timeout_s), 1
        )
        r(f"every link up with key after {summary.seconds_to_exchange} s")
        enc_ms: list[float] = []
        dec_ms: list[float] = []
        origin, dest = spec.site_of(run.origin_sae), spec.site_of(run.destination_sae)
        r(f"{run.origin_sae} at {origin} asks for keys for {run.destination_sae} at {dest}")
        self._traffic(summary, run.relay_s, enc_ms, dec_ms)
        r(f"{summary.requests_ok} of {summary.requests} requests delivered identical keys")
        if run.cut is not None:
            r(f"cutting link {run.cut}")
            t_cut = time.monotonic()
            self._cut(run.cut)
            ok, first = self._traffic(summary, run.after_cut_s, enc_ms, dec_ms)
            summary.requests_ok_after_cut = ok
            if first is not None:
                summary.reroute_s = round(first - t_cut, 2)
            r(
                f"after the cut: {ok} requests delivered"
                + (f", the first {summary.reroute_s} s after the cut" if first else "")
            )
        summary.keys_identical = summary.requests_ok > 0 and summary.mismatches == 0
        if enc_ms:
            summary.median_enc_keys_ms = round(statistics.median(enc_ms), 1)
            summary.median_dec_keys_ms = round(statistics.median(dec_ms), 1)
        self._accounting(summary)
        for link_id, a in summary.accounting.items():
            r(
                f"{link_id}: relay drew {a.relay_drawn_bits} bits, erased "
                f"{a.relay_erased_bits}; end-to-end keys over it {a.relayed_key_bits} bits; "
                f"tags {a.auth_drawn_bits}/{a.auth_erased_bits}"
            )


def run_network(
    spec: NetworkDemoSpec, out_dir: Path, report: Reporter, mode: str | None = None
) -> NetworkSummary:
    return NetworkDemo(spec, out_dir, report, mode).run()
