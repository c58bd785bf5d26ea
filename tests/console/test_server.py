"""The console's listener over real bus pieces and real TLS: who gets what, which requests
may act, and that telemetry reaches both the history and the live stream."""

from __future__ import annotations

import asyncio
import re
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from qkdnode.console.access import TOKEN_HEADER
from qkdnode.delivery.pki import init_ca, issue_cert
from qkdnode.delivery.tls import client_context
from tests.console.conftest import console_env, wait_for


async def _token(session: aiohttp.ClientSession, url: str, **kw: Any) -> str:
    async with session.get(url + "/", **kw) as r:
        assert r.status == 200
        page = await r.text()
    found = re.search(r'name="console-token" content="([^"]+)"', page)
    assert found is not None
    return found.group(1)


def test_a_local_console_is_read_only_by_default(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with console_env(tmp_path) as (svc, links), aiohttp.ClientSession() as s:
            assert svc.url is not None and svc.url.startswith("http://127.0.0.1:")
            async with s.get(svc.url + "/api/overview") as r:
                assert r.status == 200
                ov = await r.json()
            assert ov["role"] == "monitor"
            assert [x["link"] for x in ov["links"]] == ["alice-bob", "alice-carol"]
            assert ov["links"][0]["key_rate_bps"] == 1234.5
            assert ov["links"][0]["state"] == "EXCHANGING"
            token = await _token(s, svc.url)
            async with s.post(
                svc.url + "/api/links/alice-bob/actions/stop",
                json={},
                headers={TOKEN_HEADER: token},
            ) as r:
                assert r.status == 403
                assert "operator role" in (await r.json())["message"]
            assert links[0].actions == []
            async with s.get(svc.url + "/links/nowhere") as r:
                assert r.status == 404
                assert "default-src 'self'" in r.headers["Content-Security-Policy"]

    asyncio.run(scenario())


def test_an_action_needs_the_page_token_the_origin_and_a_json_body(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with (
            console_env(tmp_path, local_role="operator") as (svc, links),
            aiohttp.ClientSession() as s,
        ):
            assert svc.url is not None
            url = svc.url + "/api/links/alice-bob/actions/stop"
            token = await _token(s, svc.url)
            forged: list[dict[str, Any]] = [
                {"json": {}},  # a form a foreign page could post: no token
                {"json": {}, "headers": {TOKEN_HEADER: "guess"}},
                {"json": {}, "headers": {TOKEN_HEADER: token, "Origin": "http://evil.test"}},
                {"json": {}, "headers": {TOKEN_HEADER: token, "Sec-Fetch-Site": "cross-site"}},
                {"data": "{}", "headers": {TOKEN_HEADER: token, "Content-Type": "text/plain"}},
            ]
            for kw in forged:
                async with s.post(url, **kw) as r:
                    assert r.status == 403, kw
            assert links[0].actions == []
            async with s.post(url, json={}, headers={TOKEN_HEADER: token}) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["ok"] is True
            assert links[0].actions == [("stop", "console:local")]
            # the link's own rules still apply: start only from IDLE
            start = svc.url + "/api/links/alice-bob/actions/start"
            async with s.post(start, json={}, headers={TOKEN_HEADER: token}) as r:
                assert r.status == 409
                assert (await r.json())["code"] == "not_allowed_in_state"
            calibrate = svc.url + "/api/links/alice-bob/actions/calibrate"
            async with s.post(calibrate, json={}, headers={TOKEN_HEADER: token}) as r:
                assert r.status == 409  # not a command of this link
            async with s.post(
                svc.url + "/api/links/alice-bob/actions/keys.get",
                json={},
                headers={TOKEN_HEADER: token},
            ) as r:
                assert r.status == 404  # never reachable from the console

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_ca(d)
    issue_cert(d, "console", server=True, sans=["127.0.0.1", "localhost"])
    for cn in ("op", "mon", "stranger"):
        issue_cert(d, cn)
    return d


def _client(pki: Path, cn: str | None) -> ssl.SSLContext:
    if cn is None:
        return client_context(pki / "ca.crt")
    return client_context(pki / "ca.crt", pki / f"{cn}.crt", pki / f"{cn}.key")


def test_mutual_tls_roles_and_no_page_without_a_listed_certificate(
    tmp_path: Path, pki: Path
) -> None:
    async def scenario() -> None:
        tls = {
            "tls_cert_file": str(pki / "console.crt"),
            "tls_key_file": str(pki / "console.key"),
            "client_ca_file": str(pki / "ca.crt"),
            "operators": ["op"],
            "monitors": ["mon"],
        }
        async with console_env(tmp_path, **tls) as (svc, links), aiohttp.ClientSession() as s:
            assert svc.url is not None and svc.url.startswith("https://")
            # no certificate: the handshake fails, not even an HTTP status comes back
            with pytest.raises(aiohttp.ClientError):
                async with s.get(svc.url + "/", ssl=_client(pki, None)) as r:
                    await r.read()
            # a certificate of the CA that is not listed: 403, empty
            async with s.get(svc.url + "/api/overview", ssl=_client(pki, "stranger")) as r:
                assert r.status == 403
                assert await r.read() == b""
            mon = _client(pki, "mon")
            async with s.get(svc.url + "/api/overview", ssl=mon) as r:
                assert (await r.json())["role"] == "monitor"
            token = await _token(s, svc.url, ssl=mon)
            url = svc.url + "/api/links/alice-bob/actions/stop"
            async with s.post(url, json={}, headers={TOKEN_HEADER: token}, ssl=mon) as r:
                assert r.status == 403
            assert links[0].actions == []
            op = _client(pki, "op")
            token = await _token(s, svc.url, ssl=op)
            async with s.post(url, json={}, headers={TOKEN_HEADER: token}, ssl=op) as r:
                assert r.status == 200
            assert links[0].actions == [("stop", "console:op")]

    asyncio.run(scenario())


def test_telemetry_reaches_the_live_stream_and_the_history(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with console_env(tmp_path) as (svc, links), aiohttp.ClientSession() as s:
            assert svc.url is not None and svc.history is not None
            async with s.get(svc.url + "/api/events") as stream:
                assert stream.headers["Content-Type"] == "text/event-stream"
                first = await stream.content.readuntil(b"\n\n")
                assert b"event: overview" in first
                links[1].telemetry.publish(
                    "alarm",
                    {
                        "event": "raise",
                        "name": "no_light",
                        "severity": "major",
                        "since": 1.0,
                        "cause": "count rate collapsed",
                    },
                )
                links[0].telemetry.publish(
                    "block",
                    {
                        "block_id": 8,
                        "ok": True,
                        "qber_z": 0.012,
                        "final_key_bits": 4096,
                        "seconds_pa": 0.5,
                        "seconds_ec": 1.0,
                    },
                )
                seen: list[bytes] = []
                async with asyncio.timeout(5):
                    while not any(b"event: block" in f for f in seen):
                        seen.append(await stream.content.readuntil(b"\n\n"))
                alarm = next(f for f in seen if f.startswith(b"event: alarm"))
                assert b'"link":"alice-carol"' in alarm and b'"no_light"' in alarm
            history = svc.history
            await wait_for(lambda: bool(history.blocks("alice-bob")))
            block = history.blocks("alice-bob")[0]
            assert (block.block_id, block.final_key_bits, block.block_seconds) == (8, 4096, 1.5)
            assert [a.name for a in history.alarms()] == ["no_light"]
            await wait_for(lambda: len(history.series("alice-bob", 0, 2e10).ts_s) >= 2)
            async with s.get(svc.url + "/api/links/alice-bob/export.csv?table=blocks&hours=1") as r:
                assert r.headers["Content-Type"].startswith("text/csv")
                lines = (await r.text()).splitlines()
            assert lines[0].startswith("link,ts,block_id,ok,qber_z")
            assert lines[1].startswith("alice-bob,")
            async with s.get(svc.url + "/api/links/alice-bob/series?hours=abc") as r:
                assert r.status == 400

    asyncio.run(scenario())


def test_the_history_survives_a_console_restart(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with console_env(tmp_path) as (svc, links):
            links[0].telemetry.publish("block", {"block_id": 1, "ok": True})
            assert svc.history is not None
            history = svc.history
            await wait_for(lambda: bool(history.blocks("alice-bob")))
        async with console_env(tmp_path) as (svc, links), aiohttp.ClientSession() as s:
            assert svc.url is not None
            async with s.get(svc.url + "/api/links/alice-bob/blocks") as r:
                blocks = (await r.json())["blocks"]
            assert [b["block_id"] for b in blocks] == [1]

    asyncio.run(scenario())


def test_saved_calibration_plots_are_served_and_nothing_else(tmp_path: Path) -> None:
    plots = tmp_path / "state" / "calibration"
    plots.mkdir(parents=True)
    png = b"\x89PNG\r\n\x1a\n" + b"0" * 64
    (plots / "modulator.png").write_bytes(png)
    (plots / "modulator.json").write_text("{}")
    (tmp_path / "secret.png").write_bytes(b"not for the console")

    async def scenario() -> None:
        async with console_env(tmp_path) as (svc, links), aiohttp.ClientSession() as s:
            assert svc.url is not None
            links[0].plots = plots
            base = svc.url + "/api/links/alice-bob/plots"
            async with s.get(base) as r:
                assert [p["procedure"] for p in (await r.json())["plots"]] == ["modulator"]
            async with s.get(base + "/modulator.png") as r:
                assert r.status == 200 and r.content_type == "image/png"
                assert await r.read() == png
            for name in ("..%2Fsecret", "..%2F..%2Fsecret", "Modulator", "modulator.json"):
                async with s.get(f"{base}/{name}.png") as r:
                    assert r.status == 404, name
            async with s.get(svc.url + "/api/links/alice-carol/plots") as r:
                assert (await r.json())["plots"] == []  # no calibration folder

    asyncio.run(scenario())
