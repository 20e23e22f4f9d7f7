"""The PromQL the project ships (alert rules, the Grafana dashboard) and the metric names in
it, for the tests that check them against promtool and against the real /metrics."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from tests.support.procs import ROOT

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "anycast-edge.json"
#: The project's own series (Prometheus's `up` and friends are not ours to check).
OUR_METRIC = re.compile(r"\b(?:anycast_edge|gslb_api)_[a-z0-9_]+\b")
#: Grafana's variables, replaced by what they stand for when checked as plain PromQL.
GRAFANA_VARIABLES = {"$node": ".*", "${datasource}": "prometheus"}


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard (panels and variables), variables filled in."""
    board = dashboard()
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["query"]["query"])
    filled = []
    for expr in exprs:
        query = expr
        for name, value in GRAFANA_VARIABLES.items():
            query = query.replace(name, value)
        filled.append(query)
    return filled


def metric_names(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in OUR_METRIC.findall(expr)}
