"""Test-suite wide hooks: which scenarios `make test` leaves to `make test-system`."""

from __future__ import annotations

import os

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long multi-daemon scenarios (everything under tests/system, and tests marked
    ``system`` elsewhere) would take `make test` over its 10-minute budget on a 2-core
    machine: they run with QKDNODE_SYSTEM_TESTS=1 (`make test-system`), not by default."""
    for item in items:
        if "tests/system/" in str(item.fspath):
            item.add_marker(pytest.mark.system)
    if os.environ.get("QKDNODE_SYSTEM_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="long multi-daemon scenario: run with `make test-system`")
    for item in items:
        if item.get_closest_marker("system") is not None:
            item.add_marker(skip)
