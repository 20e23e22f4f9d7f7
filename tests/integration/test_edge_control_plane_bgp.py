"""GSLB weights reach the routers: two real agents (bgp: and control_plane: sections) in
edge namespaces, the real API (`python -m api`, SQLite) in the router's namespace, a real FRR
router. The operator's 3:1 becomes kernel next-hop weights 3:1; with the API killed the
routes and weights stay (static stability); a change made once it is back reaches the FIB."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml
from pyroute2.netns import popns, pushns

from contract.client import ApiClient
from contract.schemas import DrainKind, NodeSpec, SiteSpec, WeightsUpdate
from tests.support.netlab import VIP, NetLab, admin_status, edge_bgp_config, netns_command
from tests.support.procs import ROOT, wait_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.needs("root", "frr"),
    pytest.mark.timeout(180),
]

T = TypeVar("T")
OPERATOR = "operator-token-for-the-lab"
API_PORT = 8088


def in_netns(netns: str, make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine whose sockets are made inside `netns` (this thread only)."""
    pushns(netns)
    try:
        return asyncio.run(make())  # type: ignore[arg-type]
    finally:
        popns()


@pytest.fixture
def lab() -> Iterator[NetLab]:
    built = NetLab.create(2)
    try:
        yield built
    finally:
        built.close()


def start_api(lab: NetLab) -> tuple[str, Any]:
    assert lab.router is not None
    host = str(lab.edges[0].router_address)  # reachable from every edge through the router
    settings = {
        "host": host,
        "port": API_PORT,
        "store": {"kind": "sqlite", "path": str(lab.workdir / "gslb.db")},
        "heartbeat_ttl_s": 3,
        "tokens": [{"name": "ops", "role": "operator", "token": OPERATOR}]
        + [
            {
                "name": f"edge{e.index}",
                "role": "node",
                "node": f"edge{e.index}",
                "token": f"node-token-{e.index}",
            }
            for e in lab.edges
        ],
    }
    path = lab.workdir / "gslb.yaml"
    path.write_text(yaml.safe_dump(settings))
    log = (lab.workdir / "api.log").open("ab")
    proc = lab.spawn(
        netns_command(lab.router.netns, sys.executable, "-m", "api", "--config", str(path)),
        cwd=ROOT, stdout=log,
    )  # fmt: skip
    url = f"http://{host}:{API_PORT}"

    async def ready() -> bool:
        async with httpx.AsyncClient() as client:
            try:
                return (await client.get(url + "/docs", timeout=1)).status_code == 200
            except httpx.HTTPError:
                return False

    wait_for(lambda: in_netns(lab.router.netns, ready), 30, what="the API serving")  # type: ignore[union-attr]
    return url, proc


def start_agent(lab: NetLab, index: int, api_url: str) -> Any:
    edge = lab.edges[index - 1]
    port = 9000 + index
    lab.spawn(
        netns_command(edge.netns, sys.executable, "-m", "deploy.backend.named_backend",
                      "--port", str(port), "--name", f"b{index}",
                      "--fail-file", str(lab.workdir / f"b{index}.fail")),
        cwd=ROOT,
    )  # fmt: skip
    bgp = edge_bgp_config(edge, runtime_dir=str(lab.workdir / f"run{index}")).model_dump(
        mode="json"
    )
    bgp["neighbors"][0]["md5_password"] = edge.md5_password
    node = {
        "node": {"name": f"edge{index}", "site": "lab"},
        "listeners": [{"name": "tcp", "kind": "tcp", "address": VIP, "port": 8080}],
        "backends": [{"name": f"b{index}", "address": "127.0.0.1", "port": port}],
        "health": {
            "active": {
                "kind": "http",
                "path": "/health",
                "interval": 0.2,
                "timeout": 0.2,
                "rise": 2,
                "fall": 2,
            }
        },
        "bgp": bgp,
        "control_plane": {
            "endpoints": [api_url],
            "token": f"node-token-{index}",
            "state_file": str(lab.workdir / f"desired{index}.json"),
            "heartbeat_interval": 0.3,
        },
    }
    path = lab.workdir / f"node{index}.yaml"
    path.write_text(yaml.safe_dump(node))
    log = (lab.workdir / f"agent{index}.log").open("ab")
    agent_bin = str(Path(sys.executable).parent / "anycast-edge")
    return lab.spawn(netns_command(edge.netns, agent_bin, "run", "--config", str(path)), stdout=log)


def agent_status(lab: NetLab, index: int) -> dict[str, Any]:
    return admin_status(lab.edges[index - 1].netns)


async def event_causes(api_url: str) -> list[tuple[str, str, str]]:
    async with ApiClient([api_url], OPERATOR) as operator:
        events = await operator.events(limit=100)
    return [(e.kind, e.subject, e.cause) for e in events]


def ratio(lab: NetLab) -> float:
    """Kernel next-hop weight of edge1 over edge2 at the router (0 when not both present)."""
    assert lab.router is not None
    hops = lab.router.fib_nexthops(VIP)
    first, second = (hops.get(str(e.address), 0) for e in lab.edges)
    return first / second if first and second else 0.0


def test_gslb_weights_reach_the_router_and_outlive_the_api(lab: NetLab) -> None:
    assert lab.router is not None
    router_ns = lab.router.netns
    api_url, api = start_api(lab)

    async def seed() -> None:
        async with ApiClient([api_url], OPERATOR) as operator:
            state = await operator.put_site("lab", SiteSpec(), revision=0)
            state = await operator.put_node(
                "edge1", NodeSpec(site="lab", weight=300), revision=state.revision
            )
            await operator.put_node(
                "edge2", NodeSpec(site="lab", weight=100), revision=state.revision
            )

    in_netns(router_ns, seed)
    for index in (1, 2):
        start_agent(lab, index, api_url)
    wait_for(lambda: abs(ratio(lab) - 3.0) < 0.05, 60, what="next-hop weights 3:1 from the GSLB")

    # The API dies (no clean close): the edges keep announcing with the weights in force.
    api.send_signal(signal.SIGKILL)
    api.wait(10)
    for _ in range(10):  # several heartbeat intervals, bounded
        assert abs(ratio(lab) - 3.0) < 0.05
        time.sleep(0.3)

    # Back: a change made through it reaches the routers.
    api_url, api = start_api(lab)

    async def even() -> None:
        async with ApiClient([api_url], OPERATOR) as operator:
            state = await operator.state()
            await operator.set_weights(
                WeightsUpdate(nodes={"edge1": 100, "edge2": 100}), revision=state.revision
            )

    in_netns(router_ns, even)
    wait_for(lambda: abs(ratio(lab) - 1.0) < 0.05, 60, what="next-hop weights 1:1 after the change")

    # A GSLB drain of edge1 runs the drain choreography: GRACEFUL_SHUTDOWN first (routers
    # move new flows away), the withdraw only after; not an immediate withdraw.
    seen_gshut: list[bool] = []

    def gshut_then_gone() -> bool:
        paths = lab.router.bgp_route_detail(f"{VIP}/32").get("paths", [])  # type: ignore[union-attr]
        mine = [
            p for p in paths if p.get("nexthops", [{}])[0].get("ip") == str(lab.edges[0].address)
        ]
        if any("graceful-shutdown" in p.get("community", {}).get("string", "") for p in mine):
            seen_gshut.append(True)
        return bool(seen_gshut) and not mine

    async def drain_edge1() -> None:
        async with ApiClient([api_url], OPERATOR) as operator:
            state = await operator.state()
            await operator.drain(DrainKind.NODE, "edge1", "maintenance", revision=state.revision)

    in_netns(router_ns, drain_edge1)
    wait_for(gshut_then_gone, 60, interval=0.02, what="edge1: GSHUT seen, then withdrawn")
    assert set(lab.router.fib_nexthops(VIP)) == {str(lab.edges[1].address)}
    # Once done, the node says it is drained (not "node down"), and by whom.
    status = wait_for(
        lambda: (s := agent_status(lab, 1))["drain"]["phase"] == "done" and s, 30, what="done"
    )
    assert status["state"] == "down" and status["drain"]["source"] == "GSLB"
    assert status["bgp"]["reason"] == "withdraw: drained, traffic has moved"
    # The GSLB's event log has the phases as edge1 ran them (its facts, not the GSLB's wish).
    phases = wait_for(
        lambda: (
            [
                cause
                for kind, node, cause in in_netns(router_ns, lambda: event_causes(api_url))
                if kind == "node-drain" and node == "edge1"
            ]
            or None
        ),
        30,
        what="edge1's drain phases in the event log",
    )
    assert phases[0] == "drain none -> moving traffic (GSLB: maintenance)", phases
    wait_for(
        lambda: any(
            cause.endswith("-> done (GSLB: maintenance)")
            for kind, node, cause in in_netns(router_ns, lambda: event_causes(api_url))
            if kind == "node-drain" and node == "edge1"
        ),
        30,
        what="edge1's drain done in the event log",
    )


def test_a_node_that_recovers_while_no_api_answers_comes_back_at_its_last_weight(
    lab: NetLab,
) -> None:
    """edge1 goes down while the API is up: the routers only use edge2, which the GSLB now
    gives the whole fleet's 1000 Mbit/s. The API dies, edge1 recovers: it must not stay out
    for as long as the control plane is gone. It never lost its share (the GSLB computes it
    as if edge1 served: 750), so it announces that again; nothing is remembered or undone."""
    assert lab.router is not None
    router = lab.router
    api_url, api = start_api(lab)

    async def seed() -> None:
        async with ApiClient([api_url], OPERATOR) as operator:
            state = await operator.put_site("lab", SiteSpec(), revision=0)
            state = await operator.put_node(
                "edge1", NodeSpec(site="lab", weight=300), revision=state.revision
            )
            await operator.put_node(
                "edge2", NodeSpec(site="lab", weight=100), revision=state.revision
            )

    in_netns(router.netns, seed)
    start_agent(lab, 1, api_url)
    edge2_agent = start_agent(lab, 2, api_url)
    wait_for(lambda: abs(ratio(lab) - 3.0) < 0.05, 60, what="next-hop weights 3:1")

    edge1, edge2 = (str(e.address) for e in lab.edges)
    (lab.workdir / "b1.fail").touch()  # edge1's only backend fails: edge1 down
    wait_for(lambda: set(router.fib_nexthops(VIP)) == {edge2}, 30, what="only edge2 in the FIB")

    # The GSLB has seen edge1 down: edge1 out of the fleet's shares, its own kept at 750,
    # edge2's at 1000; and edge2 has applied its new share (its speaker announces it).
    async def published() -> bool:
        async with ApiClient([api_url], OPERATOR) as operator:
            fleet = await operator.effective_weights()
            edge1_view = await operator.node_desired("edge1")
            edge2_view = await operator.node_desired("edge2")
        return (
            fleet.nodes["edge1"] == 0
            and edge1_view.link_bandwidth_mbps == 750
            and edge2_view.link_bandwidth_mbps == 1000
        )

    wait_for(
        lambda: in_netns(router.netns, published), 30, what="the GSLB publishing edge2 at 1000"
    )
    wait_for(
        lambda: router.link_bandwidth_mbps(edge2) == 1000,
        30,
        what="edge2's share of 1000 Mbit/s at the router",
    )
    # The event log says why edge1 went down, as edge1 saw it: health and BGP reason.
    causes = in_netns(router.netns, lambda: event_causes(api_url))
    assert (
        "node-state",
        "edge1",
        "healthy -> down: 0/1 backends healthy, below 50%; BGP withdraw: node down",
    ) in causes

    # edge2's agent freezes (its ExaBGP does not): the dead-man switch outside it withdraws
    # the route, and once the agent runs again its next heartbeat turns that into an event.
    edge2_agent.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: not router.fib_nexthops(VIP), 30, interval=0.05, what="route gone")
    finally:
        edge2_agent.send_signal(signal.SIGCONT)
    wait_for(
        lambda: any(
            kind == "bgp-deadman" and node == "edge2"
            for kind, node, _ in in_netns(router.netns, lambda: event_causes(api_url))
        ),
        30,
        what="a bgp-deadman event for edge2",
    )
    wait_for(lambda: set(router.fib_nexthops(VIP)) == {edge2}, 30, what="edge2 back")
    api.send_signal(signal.SIGKILL)
    api.wait(10)
    (lab.workdir / "b1.fail").unlink()  # edge1 recovers while no API answers
    # Its share against edge2's 1000 (the view edge2 holds): 0.75.
    wait_for(lambda: abs(ratio(lab) - 0.75) < 0.05, 60, what="edge1 back at its share")
    assert set(router.fib_nexthops(VIP)) == {edge1, edge2}
