"""A GSLB drain of one service, against a real FRR router in network namespaces.

The real agent with two services on one node (`web4` 198.51.100.10/32 over the IPv4
session, `web6` 2001:db8:100::10/128 over the IPv6 one) follows the real API (`python -m
api`, SQLite, in the router's namespace). `edgectl drain edge1 --service web6` (the real
binary) puts GRACEFUL_SHUTDOWN and prepends on web6's route only: web4's route stays as it
was (no GSHUT, same AS path, same link-bandwidth), and the node itself stays in service.
`edgectl undrain edge1 --service web6` takes the GSHUT off again.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from contract.client import ApiClient
from contract.schemas import NodeSpec, ServiceSpec, SiteSpec
from tests.integration.test_dual_stack import PORT4, PORT6, _backend, _routes, two_service_node
from tests.integration.test_edge_control_plane_bgp import OPERATOR, in_netns, start_api
from tests.support.netlab import (
    VIP,
    VIP6,
    Edge,
    NetLab,
    admin_status,
    edge_bgp_config,
    netns_command,
)
from tests.support.procs import ROOT, run, wait_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.needs("root", "frr"),
    pytest.mark.timeout(180),
]

EDGECTL = str(Path(sys.executable).parent / "edgectl")


@pytest.fixture
def lab() -> Iterator[NetLab]:
    built = NetLab.create(1, ipv6=True)
    try:
        yield built
    finally:
        built.close()


def _start_agent(lab: NetLab, edge: Edge, api_url: str) -> None:
    _backend(lab, edge, "127.0.0.1", PORT4, "b4", lab.workdir / "fail4")
    _backend(lab, edge, "::1", PORT6, "b6", lab.workdir / "fail6")
    assert edge.router_address6 is not None
    bgp = edge_bgp_config(edge, prefixes=[], runtime_dir=str(lab.workdir / "run"))
    node = {
        **two_service_node(edge, bgp),
        "control_plane": {
            "endpoints": [api_url],
            "token": "node-token-1",
            "state_file": str(lab.workdir / "desired.json"),
            "heartbeat_interval": 0.3,
        },
    }
    config_path = lab.workdir / "node.yaml"
    config_path.write_text(yaml.safe_dump(node))
    agent_bin = str(Path(sys.executable).parent / "anycast-edge")
    log = (lab.workdir / "agent.log").open("wb")
    lab.spawn(
        netns_command(edge.netns, agent_bin, "run", "--config", str(config_path)),
        stdout=log,
        cwd=ROOT,
    )


def _edgectl(lab: NetLab, api_url: str, *args: str) -> str:
    assert lab.router is not None
    env = ["env", f"EDGECTL_API={api_url}", f"EDGECTL_TOKEN={OPERATOR}"]
    return run(*netns_command(lab.router.netns, *env, EDGECTL, *args), timeout=60)


def _path(lab: NetLab, prefix: str) -> dict[str, Any]:
    assert lab.router is not None
    paths = lab.router.bgp_route_detail(prefix).get("paths", [])
    return dict(paths[0]) if paths else {}


def _gshut(path: dict[str, Any]) -> bool:
    return "graceful-shutdown" in path.get("community", {}).get("string", "")


def test_a_gslb_drain_of_one_service_gshuts_only_its_prefixes(lab: NetLab) -> None:
    (edge,) = lab.edges
    assert lab.router is not None and edge.address6 is not None
    api_url, _ = start_api(lab)

    async def seed() -> None:
        async with ApiClient([api_url], OPERATOR) as operator:
            state = await operator.put_site("lab", SiteSpec(), revision=0)
            state = await operator.put_node("edge1", NodeSpec(site="lab"), revision=state.revision)
            state = await operator.put_service(
                "web4", ServiceSpec(prefix=f"{VIP}/32"), revision=state.revision
            )
            await operator.put_service(
                "web6", ServiceSpec(prefix=f"{VIP6}/128"), revision=state.revision
            )

    in_netns(lab.router.netns, seed)
    _start_agent(lab, edge, api_url)
    wait_for(lambda: _routes(lab) == (True, True), 30, what="both VIPs in the router's FIB")
    wait_for(
        lambda: admin_status(edge.netns)["control_plane"]["desired"]["services"].get("web6"),
        15,
        what="the agent holding its per-service view",
    )
    before4 = _path(lab, f"{VIP}/32")
    before6 = _path(lab, f"{VIP6}/128")
    assert not _gshut(before4) and not _gshut(before6)
    bw4 = lab.router.link_bandwidth_mbps(str(edge.address), VIP)
    assert bw4 == pytest.approx(1000)

    # The one node is all of web6's capacity: the budget refuses (per service) unless forced.
    out = _edgectl(
        lab, api_url, "drain", "edge1", "--service", "web6", "--reason", "web6 release", "--force"
    )
    assert "service web6 on node edge1 drained" in out
    wait_for(
        lambda: _gshut(_path(lab, f"{VIP6}/128")), 15, what="GRACEFUL_SHUTDOWN on web6's route"
    )
    after4 = _path(lab, f"{VIP}/32")
    after6 = _path(lab, f"{VIP6}/128")
    # web6 leaves with GSHUT and prepends; web4's route is exactly as it was.
    assert len(after6["aspath"]["string"].split()) > len(before6["aspath"]["string"].split())
    assert not _gshut(after4)
    assert after4["aspath"] == before4["aspath"]
    assert after4.get("community") == before4.get("community")
    assert lab.router.link_bandwidth_mbps(str(edge.address), VIP) == pytest.approx(bw4)
    assert _routes(lab) == (True, True)  # GSHUT moves traffic to others; none here, so it stays
    status = admin_status(edge.netns)
    assert status["state"] == "healthy"  # the node itself is not drained
    assert (
        status["bgp"]["groups"]["web6"]["reason"]
        == "announce: draining, with GRACEFUL_SHUTDOWN and prepends"
    )
    assert status["bgp"]["groups"]["web4"]["reason"] == "announce: node healthy"

    _edgectl(lab, api_url, "undrain", "edge1", "--service", "web6")
    wait_for(lambda: not _gshut(_path(lab, f"{VIP6}/128")), 15, what="GSHUT off web6's route")
    assert _path(lab, f"{VIP6}/128")["aspath"] == before6["aspath"]
    assert _path(lab, f"{VIP}/32")["aspath"] == before4["aspath"]
