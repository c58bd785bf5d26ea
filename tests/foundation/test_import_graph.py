"""The package's import graph has no circle.

Every import counts: module level, inside functions (a deferred import is still a
dependency) and under ``TYPE_CHECKING`` (a type the module needs is a dependency too).
``from pkg import name`` counts as an import of ``pkg.name`` when that is a module, else
of ``pkg``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import qkdnode
from tests.source_trees import parse_file

ROOT = Path(qkdnode.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(parse_file(path)):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for t in targets:
                while t and t not in modules:  # a name inside a module: the module
                    t = t.rpartition(".")[0]
                if t and t != mod and t != "qkdnode":
                    graph[mod].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_in_the_package() -> None:
    graph = _graph()
    assert len(graph) > 50 and graph["qkdnode.node"], "the graph was not read"
    cycles = _cycles(graph)
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_check_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


#: modules of qkdnode/ that may use the simulated link's internals: the demo (it builds
#: both sides' configs), the benchmarks, and the procedures' in-process harness that the
#: benchmarks and the procedure tests run on, and the calibration truth check (it draws
#: the simulated boxes' truths to judge the procedures against them)
SIMLINK_ALLOWED = (
    "qkdnode.demo",
    "qkdnode.benchmarks",
    "qkdnode.procedures.simharness",
    "qkdnode.procedures.truth_check",
)


def test_the_runtime_reaches_the_simulator_only_through_its_public_face() -> None:
    offenders = []
    for path in ROOT.rglob("*.py"):
        mod = _module_name(path)
        if mod.startswith(SIMLINK_ALLOWED) or mod.endswith(".bench"):
            continue
        for node in ast.walk(parse_file(path)):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{mod}: {n}" for n in names if n.startswith("drivers.simlink")]
    assert not offenders, offenders
