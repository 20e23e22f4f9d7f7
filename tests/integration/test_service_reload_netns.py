"""A reload (SIGHUP) that adds and then removes a service, against a real FRR router and
ExaBGP in network namespaces.

The real agent starts with one service, `web4` (198.51.100.10/32 over the IPv4 session).
- SIGHUP with `web6` (2001:db8:100::10/128 over the IPv6 session) added while its backend
  fails its health check: web6 runs its checks and is down, and its prefix is not at the
  router; once its backend passes (rise 2), its prefix appears. web4's route never left the
  router's FIB (`ip monitor route` in the router's namespace saw no delete of it).
- SIGHUP with `web4` removed while a client holds a slow request open through the router to
  web4's VIP: web4's route gets GRACEFUL_SHUTDOWN, its listener stops accepting, the
  request completes (200, not reset), then web4's route is withdrawn; web6's route stays
  untouched throughout; /status, the event log and /metrics no longer show web4.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.test_dual_stack import PORT4, PORT6, _backend, _routes, two_service_node
from tests.support.netlab import (
    VIP,
    VIP6,
    Edge,
    NetLab,
    RouteMonitor,
    admin_status,
    edge_bgp_config,
    netns_command,
)
from tests.support.procs import ROOT, run, wait_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.needs("root", "frr"),
    pytest.mark.timeout(240),
]

# The client's request: a slow answer (the backend waits SLOW_MS), read to the end.
SLOW_MS = 20000
_SLOW_GET = """
import socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=60)
s.sendall(b"GET /slow/%d HTTP/1.1\\r\\nHost: vip\\r\\n\\r\\n" % int(sys.argv[2]))
data = b""
while b"\\r\\n\\r\\n" not in data or len(data.split(b"\\r\\n\\r\\n", 1)[1]) < 1:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(data.decode(errors="replace"))
"""


@pytest.fixture
def lab() -> Iterator[NetLab]:
    built = NetLab.create(1, ipv6=True, client=True)
    try:
        yield built
    finally:
        built.close()


def _node(edge: Edge, lab: NetLab, services: list[str]) -> dict[str, Any]:
    bgp = edge_bgp_config(
        edge,
        prefixes=[],
        runtime_dir=str(lab.workdir / "run"),
        drain_quiet_window_s=0.5,
        drain_deadline_s=3,
    )
    node = two_service_node(edge, bgp)
    node["services"] = [s for s in node["services"] if s["name"] in services]
    # The removed service's open connections may take up to a minute to finish.
    return {**node, "drain": {"deadline": 60}}


def _events(status: dict[str, Any], service: str) -> list[str]:
    return [e["cause"] for e in status["events"] if e.get("service") == service]


def _path(lab: NetLab, prefix: str) -> dict[str, Any]:
    assert lab.router is not None
    paths = lab.router.bgp_route_detail(prefix).get("paths", [])
    return dict(paths[0]) if paths else {}


def _gshut(path: dict[str, Any]) -> bool:
    return "graceful-shutdown" in path.get("community", {}).get("string", "")


def _deleted(lines: list[str], address: str) -> list[str]:
    return [line for line in lines if line.startswith("Deleted") and address in line]


def test_a_reload_adds_a_service_after_its_health_and_drains_a_removed_one(lab: NetLab) -> None:
    (edge,) = lab.edges
    assert lab.router is not None and edge.router_address6 is not None
    fail4, fail6 = lab.workdir / "fail4", lab.workdir / "fail6"
    fail6.touch()  # web6's backend fails its checks until the test lets it pass
    _backend(lab, edge, "127.0.0.1", PORT4, "b4", fail4)
    _backend(lab, edge, "::1", PORT6, "b6", fail6)
    config_path = lab.workdir / "node.yaml"
    config_path.write_text(yaml.safe_dump(_node(edge, lab, ["web4"])))
    agent_bin = str(Path(sys.executable).parent / "anycast-edge")
    log = (lab.workdir / "agent.log").open("wb")
    agent = lab.spawn(
        netns_command(edge.netns, agent_bin, "run", "--config", str(config_path)),
        stdout=log,
        cwd=ROOT,
    )
    wait_for(lambda: _routes(lab) == (True, False), 30, what="web4's VIP in the router's FIB")
    assert list(admin_status(edge.netns)["services"]) == ["web4"]
    monitor = RouteMonitor(lab.router.netns)
    try:
        _added_after_health(lab, edge, agent, config_path, fail6, monitor)
        _removed_after_a_drain(lab, edge, agent, config_path, monitor)
    except BaseException:
        print((lab.workdir / "agent.log").read_text()[-6000:])
        raise
    finally:
        monitor.close()


def _added_after_health(
    lab: NetLab,
    edge: Edge,
    agent: subprocess.Popen[bytes],
    config_path: Path,
    fail6: Path,
    monitor: RouteMonitor,
) -> None:
    config_path.write_text(yaml.safe_dump(_node(edge, lab, ["web4", "web6"])))
    agent.send_signal(signal.SIGHUP)
    # web6 runs: listener bound, checks run, and its backend failed them: down, not announced.
    status = wait_for(
        lambda: (
            (s := admin_status(edge.netns))["services"].get("web6", {}).get("state") == "down" and s
        ),
        20,
        what="web6 started by the reload and down on its failing backend",
    )
    web6 = status["services"]["web6"]
    assert [listener["serving"] for listener in web6["listeners"]] == [True]
    assert status["bgp"]["groups"]["web6"]["reason"] == "withdraw: service down"
    assert _routes(lab) == (True, False)  # not announced before its health passed
    assert status["reload"]["steps"] == [
        {"service": "web4", "action": "keep", "reason": "unchanged"},
        {
            "service": "web6",
            "action": "start",
            "reason": "new in the config: announced once healthy",
        },
    ]
    assert any(e["kind"] == "reload" and e["started"] == ["web6"] for e in status["events"]), (
        status["events"]
    )
    # Its backend passes: after rise, web6's prefix is announced.
    fail6.unlink()
    wait_for(lambda: _routes(lab) == (True, True), 20, what="web6's VIP once it is healthy")
    status = admin_status(edge.netns)
    assert status["services"]["web6"]["state"] == "healthy"
    # web4's route never left the router.
    assert not _deleted(monitor.seen(), VIP)
    assert _routes(lab) == (True, True)


def _removed_after_a_drain(
    lab: NetLab,
    edge: Edge,
    agent: subprocess.Popen[bytes],
    config_path: Path,
    monitor: RouteMonitor,
) -> None:
    assert lab.router is not None
    before6 = _path(lab, f"{VIP6}/128")
    out_path = lab.workdir / "slow.out"
    with out_path.open("wb") as out:
        client = lab.spawn(
            netns_command(lab.client_netns, sys.executable, "-c", _SLOW_GET, VIP, str(SLOW_MS)),
            stdout=out,
        )
    wait_for(
        lambda: admin_status(edge.netns)["services"]["web4"]["listeners"][0]["connections"] == 1,
        15,
        what="the client's slow request open on web4",
    )
    config_path.write_text(yaml.safe_dump(_node(edge, lab, ["web6"])))
    agent.send_signal(signal.SIGHUP)
    # web4 drains: GRACEFUL_SHUTDOWN on its route, then its listener stops accepting while
    # the client's request is still open (and its route still there).
    wait_for(lambda: _gshut(_path(lab, f"{VIP}/32")), 15, what="GRACEFUL_SHUTDOWN on web4's route")

    def stopped_accepting() -> dict[str, Any] | None:
        status = admin_status(edge.netns)
        web4 = status["services"].get("web4")
        if web4 is None or web4["listeners"][0]["serving"]:
            return None
        return status

    status = wait_for(stopped_accepting, 20, what="web4's listener closed by its drain")
    web4 = status["services"]["web4"]
    assert web4["removing"] is True
    assert status["reload"]["removing"] == ["web4"]
    assert "removed by a reload: stopped accepting" in _events(status, "web4")
    # Still in flight (its answer takes SLOW_MS; moving traffic is bounded by the bgp drain
    # deadline, 3 s, and the send confirmation, 5 s): its route is still there for it.
    assert client.poll() is None
    assert web4["listeners"][0]["connections"] == 1
    assert _routes(lab) == (True, True)
    # The request completes: answered in full, not reset.
    client.wait(timeout=SLOW_MS / 1000 + 30)
    answer = out_path.read_text()
    assert answer.startswith("HTTP/1.1 200"), answer
    assert "connection: close" in answer.lower(), answer  # the drain asks it to leave
    # Then web4's route goes; web6's stays as it was.
    wait_for(lambda: _routes(lab) == (False, True), 20, what="web4's VIP withdrawn")
    status = wait_for(
        lambda: "web4" not in (s := admin_status(edge.netns))["services"] and s,
        10,
        what="web4 gone from /status",
    )
    assert list(status["services"]) == ["web6"]
    assert status["reload"]["removing"] == []
    assert "removed by a reload: gone, 0 connections closed at the deadline" in _events(
        status, "web4"
    )
    assert "web4" not in status["bgp"]["groups"]
    assert _path(lab, f"{VIP6}/128")["aspath"] == before6["aspath"]
    assert not _gshut(_path(lab, f"{VIP6}/128"))
    assert not _deleted(monitor.seen(), VIP6)
    print("events:", *(f"{e['kind']}: {e['cause']}" for e in status["events"]), sep="\n  ")
    metrics = run(
        *netns_command(
            edge.netns, sys.executable, "-c",
            "import urllib.request; print(urllib.request.urlopen("
            "'http://127.0.0.1:9901/metrics').read().decode())",
        )
    )  # fmt: skip
    assert 'service="web6"' in metrics
    assert 'service="web4"' not in metrics
