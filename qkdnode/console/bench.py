"""Benchmarks of the web console: page load with 24 h of history (medians).

Run: ``python -c "from qkdnode.console.bench import run_benchmarks as r; print(r())"`` (or
``qkdnode bench --only qkdnode.console.bench``). A history file is filled with 24 h of one
link at the default sampling interval (10 s: 8640 samples with 4 detector rates each) and
a block every 3 s (28 800 blocks); a console serves it on loopback, in this process. The
link answering the console is a fixed status (the bench measures the console, not a
node). Rows:

* the history query of the link page (``/api/links/L/series?hours=24``, 2000 points);
* page load in headless Chromium, from navigation to the page drawn (overview; link
  page with its five charts and the block table), when Debian's chromium and selenium
  are installed (``qkdnode.console.browser``); skipped with a note otherwise.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qkdnode.bus.commands import CallerInfo
from qkdnode.bus.telemetry import TelemetryListener
from qkdnode.config.console import ConsoleSection
from qkdnode.console.history import HistoryStore
from qkdnode.console.models import BlockRecord, Sample
from qkdnode.log import quiet_logs

LINK = "alpha-bravo"
DAY_S = 86400.0
SAMPLE_S = 10.0
BLOCK_S = 3.0
PAGE_TARGET = "<= 1 s (overview or link page, 24 h of history)"


class _FixedLink:
    """A link whose status never changes."""

    link_id = LINK
    name = LINK
    peer_site = "bravo"
    role = "transmitter"

    async def call(self, command: str, caller: CallerInfo) -> dict[str, Any]:
        return {
            "state": "EXCHANGING",
            "role": "transmitter",
            "peer_id": "bravo",
            "healthy": True,
            "peer_connected": True,
            "stats": {
                "secret_key_rate_bps": 2.2e5,
                "qber": 0.0135,
                "secret_bits": 10**9,
                "auth_key_balance_bits": 320_000,
                "last_block": {"block_id": 28_799},
            },
            "keystore": {"available": 80_000},
            "state_since": time.time() - DAY_S,
            "seconds_since_last_block": 1.0,
            "keystore_fill_ratio": 0.8,
            "alarms": [],
        }

    def calibration_dir(self) -> Path | None:
        return None

    def listen(self, listener: TelemetryListener) -> Callable[[], None]:
        return lambda: None


def fill_day(path: Path, now_s: float) -> None:
    """24 h of one link's history ending at ``now_s``."""
    store = HistoryStore(path, retention_s=7 * DAY_S)
    t0 = now_s - DAY_S
    n = int(DAY_S / SAMPLE_S)
    store.add_samples(
        Sample(
            link=LINK,
            ts_s=t0 + i * SAMPLE_S,
            state="EXCHANGING",
            key_rate_bps=2.2e5 + 1e4 * ((i % 60) / 60),
            qber=0.0135,
            keys_available=80_000,
            fill_ratio=0.8,
            auth_balance_bits=320_000,
            secret_bits=i * 2_200_000,
            detector_rates_hz=(3.1e5, 3.0e5, 2.9e5, 3.05e5),
        )
        for i in range(n)
    )
    store.add_blocks(
        BlockRecord(
            link=LINK,
            ts_s=t0 + j * BLOCK_S,
            block_id=j,
            ok=True,
            qber_z=0.0134,
            qber_x=0.025,
            detections=3_950_000,
            sifted_z=2_550_000,
            ec_disclosed_bits=290_000,
            final_key_bits=850_000,
            block_seconds=1.7,
            stats={"ec_efficiency": 1.12, "leak_total_bits": 300_000},
        )
        for j in range(int(DAY_S / BLOCK_S))
    )
    store.close()


class _Served:
    """A console on a free loopback port, its loop in a thread."""

    def __init__(self, state_dir: Path) -> None:
        from qkdnode.console.service import ConsoleService

        cfg = ConsoleSection(listen_host="127.0.0.1", listen_port=0)
        self.service = ConsoleService("alpha", cfg, state_dir, lambda: [_FixedLink()])
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.service.start(), self.loop).result(60)
        assert self.service.url is not None
        self.url: str = self.service.url

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.service.stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def _series_ms(url: str, repeats: int) -> list[float]:
    import urllib.request

    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        with urllib.request.urlopen(  # noqa: S310 (loopback URL built above)
            f"{url}/api/links/{LINK}/series?hours=24", timeout=30
        ) as r:
            r.read()
        times.append(time.perf_counter() - t)
    return times


def _page_s(url: str, path: str, repeats: int) -> list[float]:
    from qkdnode.console.browser import chromium

    times = []
    with chromium() as driver:
        for i in range(repeats + 1):
            t = time.perf_counter()
            driver.get(url + path)
            deadline = t + 30
            while driver.execute_script("return document.body.dataset.ready") != "1":
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"{path}: not drawn in 30 s")
                time.sleep(0.005)
            if i:  # the first load warms the browser's cache of the static files
                times.append(time.perf_counter() - t)
    return times


def run_benchmarks(quick: bool = False) -> list[dict[str, Any]]:
    from qkdnode.console.browser import browser_missing

    repeats = 3 if quick else 7
    rows: list[dict[str, Any]] = []
    with quiet_logs(), tempfile.TemporaryDirectory(prefix="qkdnode-console-bench-") as tmp:
        state = Path(tmp)
        fill_day(state / "console-history.sqlite", time.time())
        served = _Served(state)
        try:
            series = _series_ms(served.url, repeats)
            rows.append(
                {
                    "name": "console history query (24 h, 2000 points)",
                    "value": statistics.median(series),
                    "unit": "s",
                    "target": "<= 0.5 s",
                    "note": f"8640 samples x 4 detectors and 28800 blocks; median of {repeats}",
                }
            )
            missing = browser_missing()
            for page, path in (("overview", "/"), ("link page", f"/links/{LINK}")):
                if missing is not None:
                    rows.append(
                        {
                            "name": f"console page load, {page}",
                            "value": float("nan"),
                            "unit": "s",
                            "target": PAGE_TARGET,
                            "note": f"skipped: {missing}",
                        }
                    )
                    continue
                times = _page_s(served.url, path, repeats)
                rows.append(
                    {
                        "name": f"console page load, {page} (headless Chromium)",
                        "value": statistics.median(times),
                        "unit": "s",
                        "target": PAGE_TARGET,
                        "note": f"navigation to drawn page; median of {repeats}",
                    }
                )
        finally:
            served.close()
    return rows
