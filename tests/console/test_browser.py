"""The console in a real headless browser against a running pair of daemons.

The receiver serves a local console (loopback, monitor role) that Chromium drives; the
transmitter serves one over mutual TLS (an operator and a monitor certificate), which
the test's own TLS clients try. A fiber cut is injected over the control bus, as the
fault tests do. Run by `make test-system` (it installs chromium when missing).
"""

from __future__ import annotations

import datetime
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qkdnode.console.access import TOKEN_HEADER
from qkdnode.console.browser import browser_missing, chromium
from qkdnode.delivery.pki import init_ca, issue_cert
from qkdnode.delivery.tls import client_context
from tests.daemon.conftest import free_port
from tests.system.conftest import RECOVER_TIMEOUT_S, START_TIMEOUT_S, Pair, make_pair

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing())),
]

#: the page must show a raised alarm this soon after the node raised it
ALARM_ON_PAGE_S = 5.0
DETECT_TIMEOUT_S = 60.0


@dataclass
class Site:
    pair: Pair
    rx_url: str
    tx_url: str
    pki: Path

    def tls(self, cn: str | None) -> ssl.SSLContext:
        if cn is None:
            return client_context(self.pki / "ca.crt")
        return client_context(self.pki / "ca.crt", self.pki / f"{cn}.crt", self.pki / f"{cn}.key")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("console")
    pki = tmp / "console-pki"
    init_ca(pki)
    issue_cert(pki, "console-alice", server=True, sans=["127.0.0.1", "localhost"])
    for cn in ("noc-operator", "noc-monitor"):
        issue_cert(pki, cn)
    tx_port, rx_port = free_port(), free_port()
    tx = f"""
[console]
listen_host = "127.0.0.1"
listen_port = {tx_port}
tls_cert_file = "{pki / "console-alice.crt"}"
tls_key_file = "{pki / "console-alice.key"}"
client_ca_file = "{pki / "ca.crt"}"
operators = ["noc-operator"]
monitors = ["noc-monitor"]
"""
    rx = f"""
[console]
listen_host = "127.0.0.1"
listen_port = {rx_port}
sample_interval_s = 2
"""
    p = make_pair(tmp / "pair", extra_tx=tx, extra_rx=rx)
    p.start()
    try:
        p.wait_exchanging(START_TIMEOUT_S)
        yield Site(p, f"http://127.0.0.1:{rx_port}", f"https://127.0.0.1:{tx_port}", pki)
    finally:
        p.kill_all()


def wait_until(what: str, check: Callable[[], Any], timeout_s: float, poll_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)


def card(driver: Any, link: str) -> Any:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, f'section.card[data-link="{link}"]')
    return found[0] if found else None


def test_console_shows_the_link_live_and_the_fault_comes_and_goes(site: Site) -> None:
    from selenium.webdriver.common.by import By

    p = site.pair
    rx_status = p.rx.status()
    assert rx_status is not None
    link = f"bob-{rx_status['peer_id']}"
    with chromium() as driver:
        driver.get(site.rx_url + "/")
        wait_until(
            "the page", lambda: driver.execute_script("return document.body.dataset.ready"), 20
        )

        # EXCHANGING, and the key rate of `ctl status` within 5 %
        def exchanging() -> bool:
            c = card(driver, link)
            return (
                c is not None
                and c.find_element(By.CSS_SELECTOR, ".state").get_attribute("data-state")
                == "EXCHANGING"
            )

        wait_until("EXCHANGING on the page", exchanging, RECOVER_TIMEOUT_S)
        # The rate is the session's secret bits over its exchange time: it jumps when a
        # block lands (the page shows the status of up to 2 s ago), less so after a few.
        p.wait_exchanging(min_blocks_after=3)
        seen: list[tuple[float, float]] = []

        def rate_matches() -> bool:
            shown = float(
                card(driver, link)
                .find_element(By.CSS_SELECTOR, ".key-rate")
                .get_attribute("data-value")
            )
            status = p.rx.status()
            if status is None:
                return False
            truth = float(status["stats"]["secret_key_rate_bps"])
            seen.append((shown, truth))
            return truth > 0 and abs(shown - truth) <= 0.05 * truth

        try:
            wait_until("the page's key rate within 5 % of status", rate_matches, 30, poll_s=0.5)
        except AssertionError:
            raise AssertionError(f"(page, status) key rates: {seen[-10:]}") from None
        live = driver.find_element(By.ID, "live").text
        assert "live" in live, live

        # a fiber cut: the receiver's no_light alarm is on the page within 5 s
        mark = len(p.rx.lines())
        p.tx.call("sim.inject", fault="fiber_cut")
        try:
            raised = wait_until(
                "the no_light alarm in the receiver's log",
                lambda: next(
                    (
                        r
                        for r in p.rx.lines()[mark:]
                        if r.get("event") == "alarm" and r.get("alarm") == "no_light"
                    ),
                    None,
                ),
                DETECT_TIMEOUT_S,
                poll_s=0.1,
            )
            on_page = wait_until(
                "no_light on the page",
                lambda: driver.find_elements(By.CSS_SELECTOR, 'li.alarm[data-alarm="no_light"]'),
                ALARM_ON_PAGE_S + 5,
                poll_s=0.1,
            )
            seen_at = time.time()
            raised_at = datetime.datetime.fromisoformat(raised["timestamp"]).timestamp()
            assert on_page and seen_at - raised_at <= ALARM_ON_PAGE_S, seen_at - raised_at
        finally:
            p.tx.call("sim.inject", fault="fiber_cut", clear=True)
        wait_until(
            "no_light cleared on the page",
            lambda: not driver.find_elements(By.CSS_SELECTOR, 'li.alarm[data-alarm="no_light"]'),
            RECOVER_TIMEOUT_S,
            poll_s=0.5,
        )
        wait_until("EXCHANGING again", exchanging, RECOVER_TIMEOUT_S)

        # the alarm list keeps the raise and the clear
        driver.get(site.rx_url + "/alarms")
        wait_until(
            "the alarm page",
            lambda: driver.execute_script("return document.body.dataset.ready"),
            20,
        )
        rows = driver.find_elements(By.CSS_SELECTOR, '#alarm-events tr[data-alarm="no_light"]')
        kinds = {r.get_attribute("class") for r in rows}
        assert {"event-raise", "event-clear"} <= kinds, kinds

        # the link page: history plots with points after two blocks, the block table
        driver.get(site.rx_url + f"/links/{link}")
        wait_until(
            "the link page", lambda: driver.execute_script("return document.body.dataset.ready"), 20
        )
        status = p.rx.status()
        assert status is not None and int(status["stats"]["blocks_ok"]) >= 2
        qber_points = int(driver.find_element(By.ID, "chart-qber").get_attribute("data-points"))
        rate_points = int(driver.find_element(By.ID, "chart-rate").get_attribute("data-points"))
        assert qber_points >= 2 and rate_points >= 2, (qber_points, rate_points)
        assert driver.find_elements(By.CSS_SELECTOR, "#chart-qber canvas")
        assert int(driver.find_element(By.ID, "blocks").get_attribute("data-rows")) >= 2
        # a monitor's page offers no action
        buttons = driver.find_elements(By.CSS_SELECTOR, "button[data-action]")
        assert buttons and all(not b.is_enabled() for b in buttons)
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors


def _request(
    url: str, ctx: ssl.SSLContext, *, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    if method == "POST":
        req.data = b"{}"
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=20) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_a_monitor_certificate_cannot_act_and_no_certificate_gets_nothing(site: Site) -> None:
    p = site.pair
    stop = site.tx_url + "/api/links/alice-bob/actions/stop"
    # no client certificate: the TLS handshake fails, no HTTP answer at all
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        _request(site.tx_url + "/api/overview", site.tls(None))
    monitor = site.tls("noc-monitor")
    code, page = _request(site.tx_url + "/", monitor)
    assert code == 200
    token = page.decode().split('name="console-token" content="', 1)[1].split('"', 1)[0]
    code, body = _request(stop, monitor, method="POST", headers={TOKEN_HEADER: token})
    assert code == 403, body
    assert "operator role" in json.loads(body)["message"]
    time.sleep(1.0)
    status = p.tx.status()
    assert status is not None and status["state"] == "EXCHANGING"
    # the operator's certificate may read; its action needs the page's token
    operator = site.tls("noc-operator")
    code, body = _request(stop, operator, method="POST", headers={TOKEN_HEADER: "x"})
    assert code == 403, body
    code, body = _request(site.tx_url + "/api/overview", operator)
    assert code == 200 and json.loads(body)["role"] == "operator"


@pytest.mark.timeout(1800)
def test_the_network_map_of_a_site_follows_the_network() -> None:
    """Site B of the five-site network: the map draws every site and link, B's own links
    and routes; a link taken out of the network turns on the map without a reload."""
    from selenium.webdriver.common.by import By

    from tests.console.screenshots import network_console, ready

    with network_console() as (demo, url), chromium() as driver:
        driver.get(url + "/network")
        ready(driver)
        lines = driver.find_elements(By.CSS_SELECTOR, "#network-map line.net-link")
        assert sorted(x.get_attribute("data-link") for x in lines) == [
            "A-B",
            "B-C",
            "B-D",
            "C-D",
            "D-E",
        ]
        assert len(driver.find_elements(By.CSS_SELECTOR, "#network-map circle.net-site")) == 5
        rows = driver.find_elements(By.CSS_SELECTOR, "#local-links tr[data-link]")
        assert sorted(r.get_attribute("data-link") for r in rows) == ["A-B", "B-C", "B-D"]
        routes = driver.find_element(By.ID, "routes").text
        for site in ("A", "C", "D", "E"):
            assert f"{site}:" in routes, routes

        def bd_class() -> str:
            found = driver.find_elements(By.CSS_SELECTOR, '#network-map line[data-link="B-D"]')
            return found[0].get_attribute("class") if found else ""

        assert " ok" in bd_class(), bd_class()
        assert demo.call("B", "network.link", link_id="B-D", enabled=False) is not None
        try:
            wait_until("B-D drawn as down", lambda: " bad" in bd_class(), 60, poll_s=0.5)
        finally:
            demo.call("B", "network.link", link_id="B-D", enabled=True)
        wait_until("B-D drawn as up again", lambda: " ok" in bd_class(), 120, poll_s=0.5)
