"""The lab's Prometheus files hold up: promtool (Debian's `prometheus` package) accepts the
config and the alert rules, and `promtool test rules` runs the rule unit tests in
tests/unit/prometheus/, which fire every alert on the series that should fire it and keep
it quiet on a near miss. Every alert has such a test. Every query of the Grafana dashboard is
PromQL that promtool parses (each checked as a recording rule)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.procs import ROOT
from tests.support.prometheus import alert_rules, dashboard, dashboard_queries

pytestmark = pytest.mark.needs("promtool")

PROMETHEUS = ROOT / "deploy" / "prometheus"
RULE_TESTS = sorted((Path(__file__).parent / "prometheus").glob("*_test.yml"))


def promtool(*args: str, cwd: Path) -> str:
    result = subprocess.run(
        ["promtool", *args], capture_output=True, text=True, timeout=60, check=False, cwd=cwd
    )
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout


def alert_names() -> list[str]:
    return [rule["alert"] for rule in alert_rules()]


def test_promtool_accepts_the_config_and_its_rules() -> None:
    out = promtool("check", "config", "prometheus.yml", cwd=PROMETHEUS)
    assert f"SUCCESS: {len(alert_names())} rules found" in out


def test_promtool_accepts_the_rules() -> None:
    promtool("check", "rules", "alerts.yml", cwd=PROMETHEUS)


@pytest.mark.parametrize("path", RULE_TESTS, ids=lambda p: p.name)
def test_promtool_rule_unit_tests_pass(path: Path) -> None:
    assert "SUCCESS" in promtool("test", "rules", path.name, cwd=path.parent)


def test_every_alert_has_a_rule_test_that_fires_it() -> None:
    fired: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                if check.get("exp_alerts"):
                    fired.add(check["alertname"])
    assert RULE_TESTS
    assert sorted(set(alert_names()) - fired) == []


def test_alert_names_are_unique() -> None:
    names = alert_names()
    assert len(names) == len(set(names))


def test_every_dashboard_query_is_promql(tmp_path: Path) -> None:
    queries = [q for q in dashboard_queries() if not q.startswith("label_values(")]
    assert len(queries) > 30
    rules = [{"record": f"dashboard:query{i}", "expr": q} for i, q in enumerate(queries)]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"SUCCESS: {len(rules)} rules found" in promtool(
        "check", "rules", path.name, cwd=tmp_path
    )


def test_the_dashboard_is_well_formed() -> None:
    board = dashboard()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    assert board["uid"] == "anycast-edge"
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_readme_says_what_each_alert_means() -> None:
    readme = (ROOT / "README.md").read_text()
    assert [name for name in alert_names() if f"| {name} |" not in readme] == []
