"""Which compiled kernels run: numba's, the ahead-of-time ones, or their numpy twins.

Each compiled kernel of the node (Cascade, pass permutations, slot tracking) is a function
decorated with :func:`njit` and exists three ways, with the same results:

- **numba**: compiled at run time (cached on disk) into writable+executable memory;
- **native**: its Cython translation in :mod:`qkdnode.native`, compiled by the C compiler
  at install (``setup.py``; optional: absent where no compiler was found). Nothing is
  generated at run time, so it runs under the hardened systemd unit
  (``MemoryDenyWriteExecute=yes``, docs/operations.md), where llvmlite refuses at import;
- **numpy**: the numpy twin the calling module keeps beside the kernel (several times
  slower; the fallback when neither of the others can run).

Selection, once at import (:data:`BACKEND`):

- ``QKDNODE_KERNELS=numba|native|numpy`` asks for one (benchmarks and tests); if it cannot
  run, the next one down the list numba, native, numpy runs and :data:`WHY_NOT` says why;
- else ``QKDNODE_NO_JIT=1`` (what the unit's production configuration means): native when
  built, else numpy; numba is not even imported;
- else native when built, else numba when it loads, else numpy.

"Built" means every module of :data:`NATIVE_SOURCES` imports and holds all the ``@njit``
kernels of its Python module's source (a build from older sources is passed over, and
:data:`WHY_NOT` names what it lacks). The native kernels run
  as fast as numba's or faster and load in milliseconds, where numba's take about a second
  from its cache and half a minute to compile on the first start after an install
  (docs/performance.md), so they are preferred wherever they are built.

:data:`JIT` is true when a compiled backend (numba or native) runs: the calling modules
then call the decorated names, which :func:`njit` has made numba's or the native module's
function of the same name; otherwise they run their numpy twins.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, TypeVar, cast

_F = TypeVar("_F", bound=Callable[..., Any])

Backend = Literal["numba", "native", "numpy"]
BACKENDS: tuple[Backend, ...] = ("numba", "native", "numpy")
#: The extension modules of :mod:`qkdnode.native`, one per module with ``@njit`` kernels
#: (named after it, path of that module under qkdnode/); native runs only when all of
#: them import and hold every kernel of their module.
NATIVE_SOURCES: dict[str, str] = {
    "cascade_kernels": "postproc/cascade_kernels.py",
    "shuffle": "postproc/shuffle.py",
    "track_kernel": "procedures/track_kernel.py",
}
NATIVE_MODULES: tuple[str, ...] = tuple(NATIVE_SOURCES)
_KERNEL_DEF = re.compile(r"^@njit\s*\n(?:@.*\n)*def\s+(\w+)", re.MULTILINE)


def kernel_names(stem: str) -> list[str]:
    """Names of the ``@njit`` functions in the source of the module of native module
    ``stem`` (read, not imported; [] when the source is not installed)."""
    try:
        text = (Path(__file__).parent / NATIVE_SOURCES[stem]).read_text("utf-8")
    except OSError:
        return []
    return _KERNEL_DEF.findall(text)


class NativeKernelMissing(RuntimeError):
    """A ``@njit`` kernel has no function of its name in its :mod:`qkdnode.native` module
    (extensions built from older sources: rebuild them, or set ``QKDNODE_KERNELS=numpy``)."""


def _load_native() -> tuple[dict[str, ModuleType], str | None]:
    """The native modules by name, or ({}, why they are not usable)."""
    mods: dict[str, ModuleType] = {}
    for name in NATIVE_MODULES:
        try:
            mods[name] = importlib.import_module(f"qkdnode.native.{name}")
        except ImportError as exc:
            return {}, f"qkdnode.native.{name} not built ({exc})"
        missing = [k for k in kernel_names(name) if not hasattr(mods[name], k)]
        if missing:  # built from older sources than the Python kernels
            return {}, f"qkdnode.native.{name} lacks {', '.join(missing)} (rebuild it)"
    return mods, None


def _load_numba() -> tuple[ModuleType | None, str | None]:
    try:
        import numba
    except (ImportError, OSError) as exc:  # OSError: no W+X memory (MemoryDenyWriteExecute)
        return None, f"numba: {type(exc).__name__}: {exc}"
    return numba, None


def _select() -> tuple[Backend, str | None, ModuleType | None, dict[str, ModuleType]]:
    """(backend, why a preferred one does not run, numba, native modules)."""
    asked = os.environ.get("QKDNODE_KERNELS", "").strip().lower()
    why: list[str] = []
    if asked:
        if asked not in BACKENDS:
            raise ValueError(f"QKDNODE_KERNELS={asked!r}: expected one of {', '.join(BACKENDS)}")
        order = list(BACKENDS[BACKENDS.index(asked) :])
        if asked != "numba":
            why.append(f"QKDNODE_KERNELS={asked}")
    elif os.environ.get("QKDNODE_NO_JIT", "") not in ("", "0"):
        order = ["native", "numpy"]
        why.append("QKDNODE_NO_JIT is set")
    else:
        order = ["native", "numba", "numpy"]
    for backend in order:
        if backend == "numba":
            nb, reason = _load_numba()
            if nb is not None:
                return "numba", None, nb, {}
            why.append(cast(str, reason))
        elif backend == "native":
            mods, reason = _load_native()
            if mods:
                return "native", "; ".join(why) or None, None, mods
            why.append(cast(str, reason))
    return "numpy", "; ".join(why) or None, None, {}


BACKEND: Backend
#: why a backend before :data:`BACKEND` in the order of preference does not run (None:
#: the first choice runs)
WHY_NOT: str | None
BACKEND, WHY_NOT, _numba, _native = _select()
#: a compiled backend (numba or native) runs the kernels
JIT: bool = BACKEND != "numpy"
#: every ``@njit`` kernel decorated so far, ``"module.name"`` -> its Python source
KERNELS: dict[str, Callable[..., Any]] = {}


def native_module_of(module: str) -> str:
    """The :mod:`qkdnode.native` module holding the kernels of ``module``
    (``qkdnode.postproc.shuffle`` -> ``qkdnode.native.shuffle``)."""
    return f"qkdnode.native.{module.rsplit('.', 1)[-1]}"


def njit(fn: _F) -> _F:
    """The kernel ``fn`` as :data:`BACKEND` runs it: ``numba.njit(cache=True, nogil=True)``
    of it, the native function of the same name, or ``fn`` unchanged (the caller then runs
    its numpy twin instead: the plain-Python loop would be far too slow).

    Raises :class:`NativeKernelMissing` when the native module lacks ``fn``.
    """
    KERNELS[f"{fn.__module__}.{fn.__name__}"] = fn
    if BACKEND == "numba":
        return cast(_F, cast(Any, _numba).njit(cache=True, nogil=True)(fn))
    if BACKEND == "native":
        stem = native_module_of(fn.__module__).rsplit(".", 1)[-1]
        mod = _native.get(stem)
        native = getattr(mod, fn.__name__, None) if mod is not None else None
        if native is None:
            raise NativeKernelMissing(
                f"{native_module_of(fn.__module__)} has no kernel {fn.__name__} (extensions "
                "built from older sources: reinstall, or set QKDNODE_KERNELS=numpy)"
            )
        return cast(_F, native)
    return fn


def describe() -> str:
    """One line for logs, ``status`` and benchmark reports: the backend and why not numba."""
    return BACKEND if not WHY_NOT else f"{BACKEND} ({WHY_NOT})"
