"""The lab's Prometheus files hold up: promtool (Debian's `prometheus` package) accepts the
config and the alert rules, and `promtool test rules` runs the rule unit tests in
tests/unit/prometheus/, which fire every alert on the series that should fire it and keep
it quiet on a near miss. Every alert has such a test."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.procs import ROOT

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
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"]]


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
