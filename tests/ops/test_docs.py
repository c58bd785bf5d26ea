"""The operations guide and the Grafana dashboard name only metrics the node exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.ops.test_metrics import filled_metrics

ROOT = Path(__file__).resolve().parents[2]
NAME = re.compile(r"\b((?:qkdnode|process)_[a-z0-9_]+)")


def exported() -> tuple[set[str], set[str]]:
    """(family names, sample names) of a node with every metric touched."""
    families, sample_names = set(), set()
    for family in text_string_to_metric_families(filled_metrics().render().decode()):
        families.add(family.name)
        sample_names.update(s.name for s in family.samples)
    return families, sample_names


def test_dashboard_queries_use_exported_metrics() -> None:
    dash = json.loads((ROOT / "docs/grafana-dashboard.json").read_text())
    _, names = exported()
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [a["expr"] for a in dash["annotations"]["list"]]
    used = {n for e in exprs for n in NAME.findall(e)}
    assert used, "no metric found in the dashboard"
    assert used <= names, sorted(used - names)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_operations_guide_lists_every_node_metric() -> None:
    text = (ROOT / "docs/operations.md").read_text()
    families, names = exported()
    documented = set(NAME.findall(text))
    ours = {
        f + "_total" if f + "_total" in names else f
        for f in families
        if f.startswith("qkdnode_") and not f.endswith("_created")
    }
    assert ours <= documented, sorted(ours - documented)
    # And the guide invents none (allow the process_* wildcard row).
    invented = {n for n in documented if n not in names | families and not n.endswith("_")}
    assert invented == set(), sorted(invented)
