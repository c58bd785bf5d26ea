"""Compiled kernels where the platform allows them, their numpy twins where it does not.

numba compiles at run time into writable+executable memory. The systemd unit forbids that
(``MemoryDenyWriteExecute=yes``, docs/operations.md): there llvmlite refuses at import with
a PermissionError. Each compiled kernel of the node (Cascade, pass permutations, slot
tracking) therefore has a numpy twin with the same results; :data:`JIT` says which run.
``QKDNODE_NO_JIT=1`` in the environment selects the numpy twins on purpose (tests, or a
node that must not load a compiler). The simulated link (``drivers.simlink``) needs numba.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar, cast

_F = TypeVar("_F", bound=Callable[..., Any])

JIT: bool
WHY_NOT: str | None = None
if os.environ.get("QKDNODE_NO_JIT", "") not in ("", "0"):
    JIT, WHY_NOT = False, "QKDNODE_NO_JIT is set"
else:
    try:
        import numba

        JIT = True
    except (ImportError, OSError) as exc:  # OSError: no W+X memory (MemoryDenyWriteExecute)
        JIT, WHY_NOT = False, f"{type(exc).__name__}: {exc}"


def njit(fn: _F) -> _F:
    """``numba.njit(cache=True, nogil=True)`` when :data:`JIT`, else ``fn`` unchanged (the
    caller then runs its numpy twin instead: the plain-Python loop would be far too slow)."""
    if not JIT:
        return fn
    return cast(_F, numba.njit(cache=True, nogil=True)(fn))
