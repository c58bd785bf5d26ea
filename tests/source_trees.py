"""Syntax trees of source files, parsed in a child interpreter.

CPython 3.11 keeps the AST constructor's recursion counter per interpreter, shared by
its threads: ``ast.parse`` while another thread of the test process is inside the AST
constructor (a daemon thread left by an earlier test, a library parsing lazily) can fail
with ``SystemError: AST constructor recursion depth mismatch`` (CPython gh-106905, fixed
in later releases). A test that reads our sources as trees gets them from a
single-threaded child process instead, so that its verdict never depends on what else
runs in the test process. Trees are cached per file path and modification time.
"""

from __future__ import annotations

import ast
import pickle
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

_CHILD = (
    "import ast, pickle, sys\n"
    "paths = sys.stdin.read().splitlines()\n"
    "trees = [ast.parse(open(p, encoding='utf-8').read(), p) for p in paths]\n"
    "sys.stdout.buffer.write(pickle.dumps(trees))\n"
)

_cache: dict[tuple[str, int], ast.Module] = {}


def parse_files(paths: Iterable[Path]) -> dict[Path, ast.Module]:
    """``path -> module tree`` for every path (UTF-8 Python source). A file that does not
    parse raises ``SyntaxError`` naming it (the child's error, re-raised here)."""
    wanted = [Path(p) for p in paths]
    keys = {p: (str(p.resolve()), p.stat().st_mtime_ns) for p in wanted}
    missing = sorted({keys[p] for p in wanted if keys[p] not in _cache})
    if missing:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD],
            input="\n".join(k[0] for k in missing).encode(),
            capture_output=True,
            check=False,
            timeout=120,
        )
        if proc.returncode != 0:
            raise SyntaxError(proc.stderr.decode(errors="replace").strip().splitlines()[-1])
        for key, tree in zip(missing, pickle.loads(proc.stdout), strict=True):
            _cache[key] = tree
    return {p: _cache[keys[p]] for p in wanted}


def parse_file(path: Path) -> ast.Module:
    """The tree of one file (see :func:`parse_files`). A miss parses the whole package
    the file belongs to (its outermost directory with an ``__init__.py``) in one child,
    so that a loop over a package's files starts one child process, not one per file."""
    path = Path(path)
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    if key not in _cache:
        root = path.resolve().parent
        while (root.parent / "__init__.py").exists():
            root = root.parent
        batch = sorted(root.rglob("*.py")) if (root / "__init__.py").exists() else []
        parse_files([*batch, path])
    return _cache[key]
