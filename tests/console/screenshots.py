"""Regenerate the console's screenshots in docs/img (``make console-screenshots``).

Runs the five-site network of configs/network.toml on loopback (as ``qkdnode demo
--network`` does), with a console on site B (three links: A-B, B-C, B-D), waits until
every link holds key, then photographs B's overview, a link page, the network map and the
alarm list in headless Chromium at 1280x800, and the overview at phone size (390x844).
Takes a few minutes (five daemons calibrate on the machine's cores).

    python -m tests.console.screenshots [OUT_DIR]     # default docs/img
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qkdnode.console.browser import browser_missing, chromium
from qkdnode.demo.network_run import NetworkDemo, NetworkSummary
from qkdnode.demo.network_spec import load_network_spec
from qkdnode.demo.runner import Reporter
from tests.daemon.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
SITE = "B"
LINK = "B-C"
WARMUP_S = 900.0
#: history the link page shows before the shot (samples every 2 s)
HISTORY_S = 90.0


def _console_toml(port: int) -> str:
    return (
        f'\n[console]\nlisten_host = "127.0.0.1"\nlisten_port = {port}\n'
        'local_role = "operator"\nsample_interval_s = 2\n'
    )


def ready(driver: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while driver.execute_script("return document.body.dataset.ready") != "1":
        if time.monotonic() > deadline:
            raise TimeoutError(f"{driver.current_url}: page not drawn")
        time.sleep(0.1)


@contextlib.contextmanager
def network_console() -> Iterator[tuple[NetworkDemo, str]]:
    """The five-site network on loopback with a console on site B, every link holding
    key; yields the demo and the console's URL. Stops every site at exit."""
    spec = load_network_spec(ROOT / "configs" / "network.toml")
    with tempfile.TemporaryDirectory(prefix="qkdnode-console-net-") as tmp:
        demo = NetworkDemo(spec, Path(tmp), Reporter(), mode="loopback")
        try:
            demo._setup(NetworkSummary())
            assert demo.files is not None
            port = free_port()
            config = demo.files.configs[SITE]
            config.write_text(config.read_text() + _console_toml(port))
            for site in demo.sites.values():
                site.start()
            demo._wait("every link up with key", WARMUP_S)
            yield demo, f"http://127.0.0.1:{port}"
        finally:
            for client in demo.clients.values():
                client.close()
            for site in demo.sites.values():
                site.terminate()


def shoot(out: Path) -> list[Path]:
    missing = browser_missing()
    if missing is not None:
        raise SystemExit(f"console screenshots: {missing}")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with network_console() as (_demo, url):
        time.sleep(HISTORY_S)
        pages = [
            ("console-overview.png", "/", (1280, 800)),
            ("console-link.png", f"/links/{LINK}", (1280, 1400)),
            ("console-network.png", "/network", (1280, 900)),
            ("console-alarms.png", "/alarms", (1280, 800)),
            ("console-phone.png", "/", (390, 844)),
        ]
        for name, path, (w, h) in pages:
            with chromium(w, h) as driver:
                driver.get(url + path)
                ready(driver)
                time.sleep(3.0)  # one live update drawn
                driver.save_screenshot(str(out / name))
                written.append(out / name)
                print(f"wrote {out / name}", flush=True)
    return written


if __name__ == "__main__":
    shoot(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "img")
