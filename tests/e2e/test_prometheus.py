"""The lab's Prometheus, through its HTTP API: it scrapes every edge agent and both GSLB APIs
(every target up), loads every alert rule and evaluates each without error, sees the fleet as
the lab is (four healthy nodes, every BGP and BFD session up), and fires EdgeNodeDown for a
killed edge. Every wait is a bounded poll."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import yaml

from deploy import lab
from tests.support.procs import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600), pytest.mark.usefixtures("lab_ok")]


def api(path: str, **params: str) -> Any:
    answer = httpx.get(f"{lab.PROMETHEUS_URL}/api/v1/{path}", params=params, timeout=5)
    answer.raise_for_status()
    body = answer.json()
    assert body["status"] == "success", body
    return body["data"]


def query(expr: str) -> dict[str, float]:
    """An instant query's result: the `node` (or `instance`) label -> value."""
    result = api("query", query=expr)["result"]
    return {
        r["metric"].get("node", r["metric"].get("instance", "")): float(r["value"][1])
        for r in result
    }


def test_every_edge_and_api_is_scraped_and_up() -> None:
    lab.wait_for(lab.prometheus_scrapes_everything, 60, "every target up")
    targets = lab.prometheus_targets()
    print("\n" + "\n".join(f"{t['job']:13} {t['instance']:22} {t['health']}" for t in targets))
    by_job = {job: {t["instance"] for t in targets if t["job"] == job} for job in lab.SCRAPE_JOBS}
    assert by_job["anycast-edge"] == {f"{a}:9902" for a in lab.EDGE_ADDRESS.values()}
    assert by_job["gslb-api"] == {"198.18.100.30:8080", "198.18.100.40:8080"}
    assert all(t["health"] == "up" and not t["error"] for t in targets)
    assert query('up{job="anycast-edge"}') == dict.fromkeys(lab.NODES, 1.0)


def test_the_fleet_as_prometheus_sees_it() -> None:
    def fleet() -> bool:
        healthy = query('anycast_edge_node_state{state="healthy"}')
        peers = query("anycast_edge_bgp_peer_up")
        bfd = query("anycast_edge_bgp_bfd_peer_up")
        nodes = dict.fromkeys(lab.NODES, 1.0)
        return healthy == nodes and peers == nodes and bfd == nodes

    lab.wait_for(fleet, 60, "four healthy nodes, BGP and BFD up, in Prometheus")
    carried = query('anycast_edge_bgp_prefix_peers{desired="true"}')
    assert carried == dict.fromkeys(lab.NODES, 1.0)
    alive = api("query", query='sum by (instance) (gslb_api_nodes{liveness="alive"})')["result"]
    # Both APIs, all six nodes (site-c's active-passive pair heartbeats too).
    assert sorted(float(r["value"][1]) for r in alive) == [float(len(lab.ALL_NODES))] * 2


def test_every_alert_rule_is_loaded_and_evaluates() -> None:
    rules_file = ROOT / "deploy" / "prometheus" / "alerts.yml"
    expected = {
        rule["alert"]
        for group in yaml.safe_load(rules_file.read_text())["groups"]
        for rule in group["rules"]
    }

    def evaluated() -> list[dict[str, Any]] | None:
        rules = [r for g in api("rules", type="alert")["groups"] for r in g["rules"]]
        done = all(r.get("lastEvaluation", "").startswith("20") for r in rules)
        return rules if done and rules else None

    lab.wait_for(lambda: evaluated() is not None, 30, "every rule evaluated once")
    rules = evaluated()
    assert rules is not None
    assert {r["name"] for r in rules} == expected
    broken = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert broken == {}


def test_a_killed_edge_fires_edge_node_down() -> None:
    node = "edge-b2"
    lab.chaos_kill(node)

    def firing() -> bool:
        alerts = api("alerts")["alerts"]
        return any(
            a["labels"]["alertname"] == "EdgeNodeDown"
            and a["labels"].get("node") == node
            and a["state"] == "firing"
            for a in alerts
        )

    lab.wait_for(firing, 90, f"EdgeNodeDown firing for {node}")
    others = {a["labels"].get("node") for a in api("alerts")["alerts"]
              if a["labels"]["alertname"] == "EdgeNodeDown"}  # fmt: skip
    assert others == {node}
