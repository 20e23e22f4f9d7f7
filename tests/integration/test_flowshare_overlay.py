"""Flow sharing across sites, against the real parts: edges 1 and 2 in site "a", edge 3 in
site "b" at the GSLB, sharing no segment; each agent builds a VXLAN overlay over its
routed link to the (real FRR) router and hands moved packets to their owner through it.
A join of site b's only edge, a weight change in site a, a drain and undrain of edge 1
(each moves the router's split between the sites) and a drain of site b break no
long-lived connection; packets did cross the overlay between the sites; a stopped agent
takes its overlay with it."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.netlab import (
    CROSS_SITE_CHANGES,
    OVERLAY_VNI,
    FlowFleet,
    build_flow_fleet,
    netns_command,
    peer_lan_interface,
    run,
    run_planned_changes,
)

pytestmark = [pytest.mark.netns, pytest.mark.needs("root", "frr", "nft")]

CONNECTIONS = 200


@pytest.fixture(scope="module")
def across() -> Iterator[tuple[FlowFleet, list[dict[str, Any]]]]:
    lab, fleet, client = build_flow_fleet(True, CONNECTIONS, across_sites=True)
    try:
        results = run_planned_changes(fleet, client, CONNECTIONS)
        yield fleet, results
    finally:
        lab.close()


def overlay_device(fleet: FlowFleet, index: int) -> dict[str, Any] | None:
    edge = fleet.lab.edges[index - 1]
    name = peer_lan_interface(fleet.lab, edge)
    out = run(*netns_command(edge.netns, "ip", "-d", "-j", "link", "show"))
    found = [link for link in json.loads(out) if link["ifname"] == name]
    return found[0] if found else None


@pytest.mark.timeout(400)
def test_changes_across_sites_break_no_connection(
    across: tuple[FlowFleet, list[dict[str, Any]]],
) -> None:
    fleet, results = across
    print(json.dumps(results))
    assert [r["name"] for r in results] == [f"{n}_across_sites" for n in CROSS_SITE_CHANGES]
    for result in results:
        assert result["connections"] >= CONNECTIONS, result
        assert result["broken"] == 0, result
    for index in (1, 2, 3):
        device = overlay_device(fleet, index)
        assert device is not None and "UP" in device["flags"], device
        info = device["linkinfo"]
        assert info["info_kind"] == "vxlan" and info["info_data"]["id"] == OVERLAY_VNI
        section = fleet.status(index)["flowshare"]
        assert section["forwarding"] == "on" and section["overlay"]["up"], section
    # Packets crossed between the sites: site b's edge forwarded to site a's, or back.
    to_site_a = sum(fleet.status(3)["flowshare"]["peers"][f"edge{i}"]["packets_forwarded"]
                    for i in (1, 2))  # fmt: skip
    to_site_b = sum(fleet.status(i)["flowshare"]["peers"]["edge3"]["packets_forwarded"]
                    for i in (1, 2))  # fmt: skip
    assert to_site_a + to_site_b > 0, (to_site_a, to_site_b)


@pytest.mark.timeout(60)
def test_a_stopped_agent_takes_its_overlay_with_it(
    across: tuple[FlowFleet, list[dict[str, Any]]],
) -> None:
    fleet, _ = across
    assert overlay_device(fleet, 2) is not None
    assert fleet.stop_agent(2, signal.SIGINT) == 0
    assert overlay_device(fleet, 2) is None
