"""Tests of numba's own behaviour (what its warm-up compiles) where this process runs
other kernels (qkdnode.jit prefers the native ones): the test runs again in a pytest
child with ``QKDNODE_KERNELS=numba``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qkdnode import jit


def run_under_numba(path: str, test: str) -> bool:
    """True when this process already runs numba (the caller goes on); otherwise runs
    ``path::test`` in a child that does, fails if it fails, and returns False."""
    if jit.BACKEND == "numba":
        return True
    try:
        import numba  # noqa: F401
    except (ImportError, OSError) as exc:
        pytest.skip(f"numba cannot load: {exc}")
    env = {**os.environ, "QKDNODE_KERNELS": "numba"}
    env.pop("QKDNODE_NO_JIT", None)
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{path}::{test}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]
    return False
