"""The Grafana dashboard (deploy/grafana/kvstore.json) and the Prometheus alert rules
(deploy/prometheus/alerts.yaml) parse, are well formed, and use only metrics a running node
exports on its /metrics endpoint."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from onenode import one_node

from kvstore.server.metrics_http import MetricsEndpoint

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "kvstore.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
METRIC = re.compile(r"\bkvstore_[a-z0-9_]+")


def dashboard_exprs() -> list[str]:
    d = json.loads(DASHBOARD.read_text())
    assert d["title"] and d["uid"] and d["panels"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    exprs = []
    for p in d["panels"]:
        assert p["title"] and p["targets"], p
        for t in p["targets"]:
            exprs.append(t["expr"])
    return exprs


def alert_exprs() -> list[str]:
    doc: Any = yaml.safe_load(ALERTS.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    names = [r["alert"] for r in rules]
    assert rules and len(names) == len(set(names)), "alert names repeat"
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, r
        assert r["labels"]["severity"] in ("critical", "warning", "info") and r["annotations"]["summary"], r
        assert r["expr"].count("(") == r["expr"].count(")"), r["expr"]
    return [r["expr"] for r in rules]


def exported(text: str) -> set[str]:
    """Every series name /metrics can show: sample names, and the names a TYPE line implies
    (a counter's `_total`, a histogram's `_bucket`, `_sum`, `_count`) for metrics with no sample yet."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            if kind == "counter":
                names.add(name + "_total")
            elif kind == "histogram":
                names.update(name + s for s in ("_bucket", "_sum", "_count"))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


async def scrape(tmp_path: Path) -> str:
    async with one_node(tmp_path) as n:
        endpoint = MetricsEndpoint("127.0.0.1:0", n.node.metrics.registry)
        try:
            loop = asyncio.get_running_loop()

            def get() -> str:
                with urllib.request.urlopen(endpoint.url, timeout=10) as r:
                    return str(r.read().decode())

            return await loop.run_in_executor(None, get)
        finally:
            endpoint.close()


def test_every_metric_the_dashboard_and_the_alerts_use_is_exported(tmp_path: Path) -> None:
    exprs = dashboard_exprs() + alert_exprs()
    used = {m for e in exprs for m in METRIC.findall(e)}
    assert "kvstore_cluster_version" in used and "kvstore_raft_is_leader" in used
    text = asyncio.run(scrape(tmp_path))
    names = exported(text)
    assert "kvstore_writes_total" in names and "kvstore_no_such_metric" not in names
    missing = sorted(used - names)
    assert not missing, f"used by deploy/ but not exported by a node: {missing}"
