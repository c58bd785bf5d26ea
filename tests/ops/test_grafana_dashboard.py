"""docs/grafana-dashboard.json: every data source reference names a defined variable."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
VAR_REF = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
BUILTIN = {"__interval", "__rate_interval", "__range", "__from", "__to", "__dashboard"}


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((ROOT / "docs/grafana-dashboard.json").read_text())
    return data


def _datasources(obj: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """Every ``datasource`` value in the dashboard, with where it sits."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            here = f"{where}/{obj.get('title') or obj.get('name') or obj.get('refId') or key}"
            if key == "datasource":
                yield here, value
            else:
                yield from _datasources(value, here)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _datasources(value, f"{where}[{i}]")


def _refs(text: str) -> set[str]:
    return {a or b for a, b in VAR_REF.findall(text)}


def test_every_datasource_names_the_datasource_variable() -> None:
    dash = _dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds_vars = {n for n, v in variables.items() if v.get("type") == "datasource"}
    assert ds_vars, "no data-source variable in templating"
    for name in ds_vars:
        assert variables[name].get("query") == "prometheus", name
    found = list(_datasources(dash))
    panels = [p for p in dash["panels"] if p.get("type") != "row"]
    # every panel, its every target, every query variable and annotation has one
    assert len(found) >= len(panels) + sum(len(p["targets"]) for p in panels)
    for where, ds in found:
        assert isinstance(ds, dict), f"{where}: datasource {ds!r} is not an object"
        assert ds.get("type") == "prometheus", f"{where}: {ds}"
        refs = _refs(str(ds.get("uid", "")))
        assert refs and refs <= ds_vars, f"{where}: uid {ds.get('uid')!r} is not {ds_vars}"
    for panel in panels:
        assert "datasource" in panel, panel["title"]
        for target in panel["targets"]:
            assert "datasource" in target, f"{panel['title']}/{target.get('refId')}"


def test_imports_ask_for_nothing_the_dashboard_does_not_use() -> None:
    """An ``__inputs`` entry is substituted on import as ``${NAME}``; one that nothing
    references asks the operator for a data source that no panel then uses."""
    dash = _dashboard()
    text = json.dumps({k: v for k, v in dash.items() if k != "__inputs"})
    for item in dash.get("__inputs", []):
        assert "${" + item["name"] + "}" in text, f"__inputs {item['name']} is never used"


def test_every_variable_used_in_queries_is_defined() -> None:
    dash = _dashboard()
    defined = {v["name"] for v in dash["templating"]["list"]}
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dash["annotations"]["list"] if "expr" in a]
    used = set().union(*(_refs(e) for e in exprs)) - BUILTIN
    assert used <= defined, sorted(used - defined)
