"""The real agent (`anycast-edge run`) with a `bgp:` section, in an edge namespace, in
front of a real FRR router: its health drives the announcement; SIGTERM drains through
GRACEFUL_SHUTDOWN before the withdraw; SIGKILL takes the route with it."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.netlab import (
    VIP,
    NetLab,
    admin_status,
    edge_bgp_config,
    netns_command,
    pids_running,
)
from tests.support.procs import ROOT, run, wait_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.needs("root", "frr"),
    pytest.mark.timeout(120),
]

BACKEND_PORT = 9001


@pytest.fixture
def lab() -> Iterator[NetLab]:
    built = NetLab.create(1)
    try:
        yield built
    finally:
        built.close()


def start_agent(
    lab: NetLab, fail_file: Path, md5_password: str | None = None, **bgp_overrides: Any
) -> Any:
    (edge,) = lab.edges
    lab.spawn(
        netns_command(
            edge.netns, sys.executable, "-m", "deploy.backend.named_backend",
            "--port", str(BACKEND_PORT), "--name", "b1", "--fail-file", str(fail_file),
        ),
        cwd=ROOT,
    )  # fmt: skip
    bgp = edge_bgp_config(
        edge,
        runtime_dir=str(lab.workdir / "run"),
        drain_quiet_window_s=0.5,
        drain_deadline_s=10,
        **bgp_overrides,
    )
    bgp_data = bgp.model_dump(mode="json")
    bgp_data["neighbors"][0]["md5_password"] = md5_password or edge.md5_password
    node = {
        "node": {"name": "edge1", "site": "lab"},
        "listeners": [{"name": "tcp", "kind": "tcp", "address": VIP, "port": 8080}],
        "backends": [{"name": "b1", "address": "127.0.0.1", "port": BACKEND_PORT}],
        "health": {
            "active": {
                "kind": "http", "path": "/health",
                "interval": 0.2, "timeout": 0.2, "rise": 2, "fall": 2,
            }
        },
        "drain": {"deadline": 2},
        "bgp": bgp_data,
    }  # fmt: skip
    config_path = lab.workdir / "node.yaml"
    config_path.write_text(yaml.safe_dump(node))
    agent_bin = str(Path(sys.executable).parent / "anycast-edge")
    log = (lab.workdir / "agent.log").open("wb")
    return lab.spawn(
        netns_command(edge.netns, agent_bin, "run", "--config", str(config_path)), stdout=log
    )


def announced(lab: NetLab) -> bool:
    assert lab.router
    return str(lab.edges[0].address) in lab.router.fib_nexthops(VIP)


def withdrawn(lab: NetLab) -> bool:
    assert lab.router
    return lab.router.fib_nexthops(VIP) == {} and lab.router.bgp_routes() == {}


def agent_status(lab: NetLab) -> dict[str, Any]:
    return admin_status(lab.edges[0].netns)


def test_agent_health_drives_announcement_and_kill_takes_route(lab: NetLab) -> None:
    fail_file = lab.workdir / "b1.fail"
    agent = start_agent(lab, fail_file)
    wait_for(lambda: announced(lab), 30, what="route once the backend is healthy")
    status = agent_status(lab)
    assert status["state"] == "healthy"
    assert status["bgp"]["announced"] == [f"{VIP}/32"]
    assert status["bgp"]["sessions"][str(lab.edges[0].router_address)]["state"] == "up"
    # The agent's /metrics carries the BGP series, as the peer holds the route.
    peer = str(lab.edges[0].router_address)
    code = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9901/metrics').read().decode())"
    metrics = run(*netns_command(lab.edges[0].netns, sys.executable, "-c", code))
    assert f'anycast_edge_bgp_peer_up{{peer="{peer}"}} 1.0' in metrics
    assert f'anycast_edge_bgp_peer_prefixes_advertised_count{{peer="{peer}"}} 1.0' in metrics
    assert status["bgp"]["reason"] == "announce: node healthy"

    fail_file.touch()  # the only backend fails its checks: node down
    wait_for(lambda: withdrawn(lab), 20, what="withdraw when the backends die")
    fail_file.unlink()
    wait_for(lambda: announced(lab), 20, what="announce again when health rises")

    assert pids_running(lab.edges[0].netns, b"bin/exabgp")
    os.kill(agent.pid, signal.SIGKILL)
    wait_for(lambda: withdrawn(lab), 20, what="route gone with the killed agent")
    wait_for(
        lambda: not pids_running(lab.edges[0].netns, b"bin/exabgp"),
        20,
        what="ExaBGP gone with the killed agent (parent-death signal)",
    )


def test_agent_sigterm_drains_through_graceful_shutdown(lab: NetLab) -> None:
    agent = start_agent(lab, lab.workdir / "b1.fail")
    wait_for(lambda: announced(lab), 30, what="route once healthy")
    assert lab.router
    router = lab.router
    seen_gshut: list[bool] = []

    def gshut_then_gone() -> bool:
        paths = router.bgp_route_detail(f"{VIP}/32").get("paths", [])
        for path in paths:
            if "graceful-shutdown" in path.get("community", {}).get("string", ""):
                seen_gshut.append(True)
        return bool(seen_gshut) and not paths

    agent.send_signal(signal.SIGTERM)
    wait_for(gshut_then_gone, 30, interval=0.02, what="GSHUT seen, then the withdraw")
    assert agent.wait(30) == 0


def test_bfd_lost_under_bgp_makes_the_node_degraded_until_repaired() -> None:
    """The edge's bfdd hangs: the router drops BGP and brings it back without BFD, so fast
    failover is silently gone. The agent's node state says degraded (with the cause) until
    its bfdd is restarted and BFD is up again."""
    built = NetLab.create(1, bfd=True)
    try:
        start_agent(built, built.workdir / "b1.fail", bfd={"enabled": True})
        wait_for(lambda: announced(built), 30, what="route once healthy")
        wait_for(lambda: agent_status(built)["state"] == "healthy", 20, what="healthy with BFD up")
        bfdd = pids_running(built.edges[0].netns, b"bfdd")
        assert bfdd, "the agent runs bfdd beside ExaBGP"
        for pid in bfdd:
            os.kill(pid, signal.SIGSTOP)
        seen: list[dict[str, Any]] = []

        def degraded() -> bool:
            status = agent_status(built)
            if status["state"] == "degraded":
                seen.append(status)
                return True
            return False

        wait_for(degraded, 60, interval=0.1, what="node degraded: BFD down while BGP up")
        assert any("BFD down while BGP up" in e["cause"] for e in seen[0]["events"])
        assert announced(built)  # degraded still serves
        # ...at a reduced bandwidth, decided on the edge (no control plane here at all):
        # bgp.degraded_bandwidth_factor (0.5) of its capacity, as the router decodes it.
        assert built.router is not None
        edge = str(built.edges[0].address)
        capacity = seen[0]["bgp"]["link_bandwidth_mbps"]
        wait_for(
            lambda: built.router.link_bandwidth_mbps(edge) == capacity / 2,  # type: ignore[union-attr]
            30,
            what="the router seeing half the link bandwidth",
        )
        assert seen[0]["bgp"]["reason"] == "announce: node degraded, at reduced bandwidth"
        wait_for(lambda: agent_status(built)["state"] == "healthy", 60, what="bfdd repaired")
        wait_for(
            lambda: built.router.link_bandwidth_mbps(edge) == capacity,  # type: ignore[union-attr]
            30,
            what="the full link bandwidth once repaired",
        )
    finally:
        built.close()


def test_a_node_no_session_carries_is_degraded_and_says_why(lab: NetLab) -> None:
    """Health passed, the agent wants to announce, but the router refuses the session (a
    wrong TCP-MD5 password): after the grace period the node state is degraded, with the
    cause, and nothing is announced; /status tells intent from fact."""
    start_agent(lab, lab.workdir / "b1.fail", md5_password="wrong-password")
    status = wait_for(
        lambda: (s := agent_status(lab))["state"] == "degraded" and s,
        30,
        interval=0.2,
        what="node degraded for want of a session",
    )
    assert any(
        f"no BGP session carries {VIP}/32 (0 of 1 sessions established)" in e["cause"]
        for e in status["events"]
    ), status["events"]
    assert status["bgp"]["reason"].startswith("announce:")  # the intent...
    assert status["bgp"]["announced"] == []  # ...and the fact
    assert not announced(lab)
