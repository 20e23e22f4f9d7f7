"""Dual stack and services per node, against a real FRR router in network namespaces.

- The real agent with two services on one node, `web4` (198.51.100.10/32) and `web6`
  (2001:db8:100::10/128, its backend on ::1), announced over an IPv4 and an IPv6 session
  with BFD on both: the router installs both routes with link-bandwidth; a client talks
  HTTP over IPv6 through the router to the VIP and back, and the backend sees its IPv6
  address in X-Forwarded-For; failing one service's backends withdraws only that
  service's prefix (each family in turn), the other stays; a drain puts GRACEFUL_SHUTDOWN
  on the IPv6 route too.
- The speaker alone announcing an IPv6 prefix as IPv6 NLRI over its IPv4 session.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bgp.config import BgpConfig
from tests.support.netlab import (
    CLIENT_ADDRESS6,
    VIP,
    VIP6,
    Edge,
    NetLab,
    SpeakerProcess,
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

PORT4, PORT6 = 9001, 9002

_HTTP_GET = """
import socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=5)
s.sendall(b"GET /headers HTTP/1.1\\r\\nHost: vip\\r\\nConnection: close\\r\\n\\r\\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
print(data.decode(errors="replace"))
"""


def _backend(lab: NetLab, edge: Edge, host: str, port: int, name: str, fail: Path) -> None:
    lab.spawn(
        netns_command(
            edge.netns, sys.executable, "-m", "deploy.backend.named_backend",
            "--host", host, "--port", str(port), "--name", name, "--fail-file", str(fail),
        ),
        cwd=ROOT,
    )  # fmt: skip


def two_service_node(edge: Edge, bgp: BgpConfig) -> dict[str, Any]:
    """node.yaml for edge1: services web4 (IPv4) and web6 (IPv6), each with its own
    backend, and `bgp` with the edge's IPv6 router as a second neighbor (both with MD5)."""
    bgp_data = bgp.model_dump(mode="json")
    bgp_data["neighbors"][0]["md5_password"] = edge.md5_password
    bgp_data["neighbors"].append(
        {
            "peer_address": str(edge.router_address6),
            "peer_asn": bgp_data["neighbors"][0]["peer_asn"],
            "md5_password": edge.md5_password,
        }
    )
    return {
        "node": {"name": "edge1", "site": "lab"},
        "services": [
            _service("web4", f"{VIP}/32", VIP, "127.0.0.1", PORT4),
            _service("web6", f"{VIP6}/128", VIP6, "::1", PORT6),
        ],
        "bgp": bgp_data,
    }


def _service(name: str, prefix: str, vip: str, backend: str, port: int) -> dict[str, Any]:
    return {
        "name": name,
        "prefixes": [prefix],
        "listeners": [{"name": f"{name}-http", "kind": "http", "address": vip, "port": 80}],
        "backends": [{"name": f"{name}-b1", "address": backend, "port": port}],
        "health": {
            "active": {"kind": "http", "path": "/health", "interval": 0.2, "timeout": 0.2}
            | {"rise": 2, "fall": 2}
        },
        "bgp": {"communities": [f"65000:{4 if ':' not in vip else 6}"]},
    }


def _start_agent(lab: NetLab, edge: Edge, fail4: Path, fail6: Path) -> None:
    _backend(lab, edge, "127.0.0.1", PORT4, "b4", fail4)
    _backend(lab, edge, "::1", PORT6, "b6", fail6)
    assert edge.address6 is not None and edge.router_address6 is not None
    bgp = edge_bgp_config(
        edge,
        prefixes=[],
        runtime_dir=str(lab.workdir / "run"),
        drain_quiet_window_s=0.5,
        drain_deadline_s=10,
        bfd={"enabled": True},
    )
    node = {**two_service_node(edge, bgp), "drain": {"deadline": 2}}
    config_path = lab.workdir / "node.yaml"
    config_path.write_text(yaml.safe_dump(node))
    agent_bin = str(Path(sys.executable).parent / "anycast-edge")
    log = (lab.workdir / "agent.log").open("wb")
    command = netns_command(edge.netns, agent_bin, "run", "--config", str(config_path))
    lab.spawn(command, stdout=log, cwd=ROOT)


def _routes(lab: NetLab) -> tuple[bool, bool]:
    return bool(lab.fib_nexthops(VIP)), bool(lab.fib_nexthops(VIP6))


@pytest.fixture
def lab() -> Iterator[NetLab]:
    built = NetLab.create(1, ipv6=True, bfd=True, client=True)
    try:
        yield built
    finally:
        built.close()


def test_two_services_both_families_each_withdraws_alone(lab: NetLab) -> None:
    (edge,) = lab.edges
    assert lab.router is not None and edge.address6 is not None
    fail4, fail6 = lab.workdir / "fail4", lab.workdir / "fail6"
    _start_agent(lab, edge, fail4, fail6)
    wait_for(lambda: _routes(lab) == (True, True), 30, what="both VIPs in the router's FIB")

    # The IPv6 route: over the IPv6 session, next-hop the edge's IPv6 address, with
    # link-bandwidth and the service's own community; BFD up on the IPv6 peer too.
    assert set(lab.fib_nexthops(VIP6)) == {str(edge.address6)}
    assert lab.router.link_bandwidth_mbps(str(edge.address6), VIP6) == pytest.approx(1000)
    path6 = lab.router.bgp_route_detail(f"{VIP6}/128")["paths"][0]
    assert "65000:6" in path6.get("community", {}).get("string", "")
    wait_for(
        lambda: (
            {p["peer"] for p in lab.router.bfd_peers() if p.get("status") == "up"}  # type: ignore[union-attr]
            == {str(edge.address), str(edge.address6)}
        ),
        15,
        what="BFD up with both of the edge's addresses",
    )

    # Client traffic over IPv6 through the router to the VIP and back; the backend (on
    # ::1) sees the client's IPv6 address, bare, in X-Forwarded-For.
    out = run(*netns_command(lab.client_netns, sys.executable, "-c", _HTTP_GET, VIP6))
    assert out.startswith("HTTP/1.1 200"), out
    assert f"x-forwarded-for: {CLIENT_ADDRESS6}" in out.lower(), out
    out4 = run(*netns_command(lab.client_netns, sys.executable, "-c", _HTTP_GET, VIP))
    assert f"x-forwarded-for: {lab.client_address}" in out4.lower(), out4

    # web6's backends fail: only its prefix goes; web4's stays (and the node serves).
    fail6.touch()
    wait_for(lambda: _routes(lab) == (True, False), 15, what="only the IPv6 VIP withdrawn")
    status = admin_status(edge.netns)
    assert status["state"] == "healthy", status["state"]
    assert status["services"]["web6"]["state"] == "down"
    assert status["services"]["web4"]["state"] == "healthy"
    assert status["bgp"]["groups"]["web6"]["reason"] == "withdraw: service down"
    # And back, then the other family.
    fail6.unlink()
    wait_for(lambda: _routes(lab) == (True, True), 15, what="the IPv6 VIP back")
    fail4.touch()
    wait_for(lambda: _routes(lab) == (False, True), 15, what="only the IPv4 VIP withdrawn")
    assert lab.fib_nexthops(VIP6) == {str(edge.address6): 1}
    metrics = run(
        *netns_command(
            edge.netns, sys.executable, "-c",
            "import urllib.request; print(urllib.request.urlopen("
            "'http://127.0.0.1:9901/metrics').read().decode())",
        )
    )  # fmt: skip
    assert 'anycast_edge_service_state{service="web4",state="down"} 1.0' in metrics
    assert 'anycast_edge_service_state{service="web6",state="healthy"} 1.0' in metrics
    fail4.unlink()
    wait_for(lambda: _routes(lab) == (True, True), 15, what="both VIPs back")

    # The node's drain applies to every service: GRACEFUL_SHUTDOWN on the IPv6 route too.
    run(*netns_command(edge.netns, "curl", "-s", "-X", "POST", "http://127.0.0.1:9901/drain"))

    def gshut6() -> bool:
        paths = lab.router.bgp_route_detail(f"{VIP6}/128").get("paths", [])  # type: ignore[union-attr]
        return any("graceful-shutdown" in p.get("community", {}).get("string", "") for p in paths)

    wait_for(gshut6, 15, what="GRACEFUL_SHUTDOWN on the IPv6 route")
    wait_for(lambda: _routes(lab) == (False, False), 30, what="both VIPs withdrawn by the drain")


def test_ipv6_nlri_over_an_ipv4_session() -> None:
    with NetLab.create(1, ipv6=True, ipv6_over_ipv4=True) as lab:
        (edge,) = lab.edges
        assert lab.router is not None and edge.address6 is not None
        speaker = SpeakerProcess(
            lab,
            edge,
            "--serving",
            "full",
            prefixes=[f"{VIP}/32", f"{VIP6}/128"],
            neighbor_overrides={"families": ["ipv4", "ipv6"]},
        )
        wait_for(lambda: bool(lab.fib_nexthops(VIP6)), 30, what="the IPv6 VIP over IPv4")
        # One session (the IPv4 one) carries both families.
        assert list(lab.router.neighbor_states()) == [str(edge.address)]
        assert set(lab.fib_nexthops(VIP6)) == {str(edge.address6)}
        assert lab.fib_nexthops(VIP) == {str(edge.address): 1}
        assert lab.router.link_bandwidth_mbps(str(edge.address6), VIP6) == pytest.approx(1000)
        status = speaker.command("serving leaving")
        assert sorted(status["desired"]) == sorted([f"{VIP}/32", f"{VIP6}/128"])

        def gshut6() -> bool:
            paths = lab.router.bgp_route_detail(f"{VIP6}/128").get("paths", [])  # type: ignore[union-attr]
            return any(
                "graceful-shutdown" in p.get("community", {}).get("string", "") for p in paths
            )

        wait_for(gshut6, 15, what="GRACEFUL_SHUTDOWN on the IPv6 route")
        speaker.command("serving stopped")
        wait_for(lambda: not lab.fib_nexthops(VIP6), 15, what="the IPv6 VIP withdrawn")
        assert json.dumps(speaker.status()["announced"]) == "[]"
