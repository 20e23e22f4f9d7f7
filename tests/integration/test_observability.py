"""What operators look at comes from the real parts:

* every metric name in the alert rules (deploy/prometheus/alerts.yml) and the Grafana
  dashboard (deploy/grafana/anycast-edge.json) exists in the exposition of a real agent (with
  a BGP session and BFD to a real FRR router, and a control plane it cannot reach) and of the
  real GSLB API on etcd served by uvicorn, and every series those expose is on the dashboard;
* the agent's read-only metrics listener serves /metrics and nothing else;
* `anycast-edge run --log-format json` writes one JSON object per line (ts, level, logger,
  msg, component, node, site), and its decisions carry their structured fields.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import OPERATOR, VIEWER, ApiUnderTest
from tests.support.netlab import VIP, NetLab, edge_bgp_config, netns_command
from tests.support.procs import ROOT, free_port, run, wait_for
from tests.support.prometheus import alert_rules, dashboard_queries, metric_names
from tests.support.site import Site

#: The series names a family of each type puts in the exposition (what PromQL can name).
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
    "untyped": ("",),
}


def exposed(text: str) -> set[str]:
    """Every series name /metrics exposes, even of a family without samples right now."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return {n for n in names if not n.endswith("_created")}


# -- the real agent with BGP and BFD, and the real API on etcd ---------------------------------


def _bgp_agent(lab: NetLab) -> str:
    """The agent in front of the lab's FRR router (BGP + BFD, control plane unreachable);
    returns its address in its namespace."""
    (edge,) = lab.edges
    port = 9001
    lab.spawn(
        netns_command(
            edge.netns, sys.executable, "-m", "deploy.backend.named_backend",
            "--port", str(port), "--name", "b1",
        ),
        cwd=ROOT,
    )  # fmt: skip
    bgp = edge_bgp_config(edge, runtime_dir=str(lab.workdir / "run"), bfd={"enabled": True})
    bgp_data = bgp.model_dump(mode="json")
    bgp_data["neighbors"][0]["md5_password"] = edge.md5_password
    node = {
        "node": {"name": "edge1", "site": "lab"},
        "listeners": [
            {"name": "web", "kind": "http", "address": VIP, "port": 80},
            {"name": "tcp", "kind": "tcp", "address": VIP, "port": 8080},
        ],
        "backends": [{"name": "b1", "address": "127.0.0.1", "port": port}],
        "health": {"active": {"kind": "http", "path": "/health", "interval": 0.2, "timeout": 0.2}},
        "metrics": {"address": str(edge.address), "port": 9902},
        "bgp": bgp_data,
        "control_plane": {
            "endpoints": ["http://127.0.0.1:9"],  # nothing answers: the node runs on its own
            "token": "unused-token-0123",
            "state_file": str(lab.workdir / "desired.json"),
            "request_timeout": 0.3,
        },
    }
    config = lab.workdir / "node.yaml"
    config.write_text(yaml.safe_dump(node))
    agent = str(Path(sys.executable).parent / "anycast-edge")
    log = (lab.workdir / "agent.log").open("wb")
    lab.spawn(netns_command(edge.netns, agent, "run", "--config", str(config)), stdout=log)
    return str(edge.address)


def _scrape_in(netns: str, url: str) -> str:
    code = f"import urllib.request; print(urllib.request.urlopen({url!r}).read().decode())"
    return run(*netns_command(netns, sys.executable, "-c", code))


@pytest.fixture
def bgp_lab() -> Iterator[NetLab]:
    built = NetLab.create(1, bfd=True)
    try:
        yield built
    finally:
        built.close()


@pytest.mark.netns
@pytest.mark.needs("root", "frr", "etcd")
@pytest.mark.timeout(180)
@pytest.mark.parametrize("store_kind", ["etcd"])  # the etcd watch series exist only there
def test_every_metric_the_alerts_and_dashboard_name_is_exported(
    bgp_lab: NetLab, api: ApiUnderTest
) -> None:
    address = _bgp_agent(bgp_lab)
    netns = bgp_lab.edges[0].netns
    url = f"http://{address}:9902/metrics"

    def bgp_and_bfd_up() -> str | None:
        text = _scrape_in(netns, url)
        peer = f'peer="{bgp_lab.edges[0].router_address}"'
        up = f"anycast_edge_bgp_peer_up{{{peer}}} 1.0" in text
        bfd = f"anycast_edge_bgp_bfd_peer_up{{{peer}}} 1.0" in text
        stale = "anycast_edge_control_plane_stale 1.0" in text
        return text if up and bfd and stale else None

    agent_text = wait_for(bgp_and_bfd_up, 60, interval=0.5, what="BGP and BFD up, CP stale")
    # The API answered a few requests (and one heartbeat-less read of the fleet) first.
    for path in ("/v1/state", "/v1/status"):
        httpx.get(api.url + path, headers={"Authorization": f"Bearer {VIEWER}"}, timeout=5)
    answer = httpx.get(
        api.url + "/metrics", headers={"Authorization": f"Bearer {OPERATOR}"}, timeout=5
    )
    assert answer.status_code == 200, answer.text
    names = exposed(agent_text) | exposed(answer.text)

    used_by_alerts = metric_names([rule["expr"] for rule in alert_rules()])
    used_by_dashboard = metric_names(dashboard_queries())
    print(
        f"\nexposed: {len(names)}; alerts use {len(used_by_alerts)}, dashboard {len(used_by_dashboard)}"
    )
    assert sorted(used_by_alerts - names) == [], "alert rules name series nobody exports"
    assert sorted(used_by_dashboard - names) == [], "the dashboard names series nobody exports"
    # ... and nothing the fleet exports is missing from the dashboard (a new metric gets a panel).
    ours = {n for n in names if n.startswith(("anycast_edge_", "gslb_api_"))}
    families = {n for n in ours if not n.endswith(("_bucket", "_sum"))}
    shown = {
        n
        for n in families
        if n in used_by_dashboard or n.removesuffix("_count") + "_bucket" in used_by_dashboard
    }
    assert sorted(families - shown) == [], "exported but on no dashboard panel"


# -- the metrics listener and JSON logs, without root ------------------------------------------


@pytest.fixture
def json_site(tmp_path: Path) -> Iterator[Site]:
    site = Site(tmp_path, metrics={"address": "127.0.0.1", "port": free_port()})
    for backend in site.backends.values():
        backend.start()
    try:
        site.agent.start(args=("--log-format", "json"))
        yield site
    finally:
        site.close()


def _log_lines(site: Site) -> list[dict[str, Any]]:
    lines = [line for line in site.agent.log().splitlines() if line.strip()]
    assert lines, "the agent logged nothing"
    parsed = []
    for line in lines:
        record = json.loads(line)  # every line, not only ours: uvicorn's too
        assert isinstance(record, dict), line
        parsed.append(record)
    return parsed


def test_json_logs_one_object_per_line_with_the_decisions_fields(json_site: Site) -> None:
    agent = json_site.agent
    json_site.fail_files["b1"].touch()  # b1 fails its checks: a backend decision
    wait_for(lambda: agent.status()["state"] == "degraded", 15, what="degraded")
    json_site.fail_files["b1"].unlink()
    agent.wait_state("healthy")
    answer = httpx.post(agent.admin + "/drain", params={"reason": "json-log test"}, timeout=5)
    assert answer.status_code == 202
    wait_for(lambda: agent.status()["state"] in ("drained", "down"), 20, what="drained")
    agent.stop()

    records = _log_lines(json_site)
    for record in records:
        assert {"ts", "level", "logger", "msg"} <= record.keys(), record
        assert record["component"] == "agent" and record["node"] == "edge-t1", record
        assert record["site"] == "site-t"
        assert record["level"] in ("debug", "info", "warning", "error", "critical")
        assert record["ts"].endswith("+00:00")  # UTC, ISO 8601
    states = [r for r in records if r.get("event") == "state"]
    assert {"state", "old_state", "drain", "reason"} <= states[-1].keys()
    assert any(r["state"] == "draining" and "json-log test" in r["reason"] for r in states), states
    backend = [r for r in records if r.get("event") == "backend" and r["backend"] == "b1"]
    assert {r["health"] for r in backend} >= {"down", "up"}, backend
    assert all(r["level"] == "warning" for r in backend if r["health"] == "down")


def test_the_metrics_listener_serves_metrics_and_nothing_else(json_site: Site) -> None:
    metrics = json_site.agent.config["metrics"]
    base = f"http://{metrics['address']}:{metrics['port']}"
    answer = httpx.get(base + "/metrics", timeout=5)
    assert answer.status_code == 200
    assert 'anycast_edge_node_state{state="healthy"} 1.0' in answer.text
    # The same registry as the admin endpoint's /metrics.
    assert exposed(answer.text) == exposed(httpx.get(json_site.agent.admin + "/metrics").text)
    for method, path in (("GET", "/status"), ("POST", "/drain"), ("GET", "/flows")):
        assert httpx.request(method, base + path, timeout=5).status_code == 404, path
    assert json_site.agent.status()["state"] == "healthy"  # the POST /drain changed nothing


def test_text_logs_stay_the_default(tmp_path: Path) -> None:
    site = Site(tmp_path)
    try:
        site.start()
    finally:
        site.close()
    first = site.agent.log().splitlines()[0]
    assert not first.startswith("{") and " INFO edge.agent: " in site.agent.log(), first
