"""A headless Chromium for the console's browser tests, screenshots and page-load bench.

Debian's ``chromium`` and ``chromium-driver`` packages (``/usr/bin/chromium``,
``/usr/bin/chromedriver``) driven by selenium. The flags keep Chromium off the network
(no background fetches, no component updates: on a closed network it would stall on
them) and in a fresh profile. :func:`browser_missing` says why no browser can run here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def browser_missing() -> str | None:
    """None when a headless browser can run; else what is missing and how to get it."""
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        return (
            f"{CHROMIUM} or {CHROMEDRIVER} missing: apt-get install chromium chromium-driver "
            "(make test-system does it when run as root)"
        )
    if importlib.util.find_spec("selenium") is None:
        return "the selenium package is missing: pip install selenium"
    return None


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 800) -> Iterator[Any]:
    """A selenium WebDriver on a headless Chromium with a fresh profile, quit at exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="qkdnode-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        with contextlib.suppress(Exception):
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
