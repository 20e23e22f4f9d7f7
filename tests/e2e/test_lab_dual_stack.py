"""Dual stack and two services in the docker-compose lab: client traffic over IPv6 from the
client container through the core and the site routers to the edges' IPv6 VIP and back;
the second service (app) over both families; the core's FIB holding both services' routes
in both families; and one service's backends failing: only that service's prefixes, IPv4
and IPv6, leave the core's FIB, while the other's stay and keep serving client traffic.

Shares the package's lab (tests/e2e/conftest.py); every wait is a bounded poll, every load
bounded, and no assertion is about time. Each test leaves the lab healthy (`lab_ok`).
"""

from __future__ import annotations

import asyncio
import collections
import json

import pytest

from contract.client import ApiClient
from deploy import lab

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600), pytest.mark.usefixtures("lab_ok")]

WEB4, WEB6 = lab.SERVICES["web"]
APP4, APP6 = lab.SERVICES["app"]


def _core_next_hops(vip: str) -> set[str]:
    return set(lab.fib_nexthops("core", vip))


def _sites_for(vip: str) -> set[str]:
    """The core's next-hop toward each site, in the VIP's family."""
    return set((lab.SITE_NEXT_HOP6 if ":" in vip else lab.SITE_NEXT_HOP).values())


def test_ipv6_client_traffic_crosses_the_routers_to_every_edge_and_back() -> None:
    before = {router: lab.forwarded_packets6(router) for router in lab.ROUTERS}
    count = 200
    summary = lab.burst(count, host=WEB6)
    after = {router: lab.forwarded_packets6(router) for router in lab.ROUTERS}
    delta = {router: after[router] - before[router] for router in lab.ROUTERS}
    print(f"\nclient -> [{WEB6}]:80: {json.dumps(summary)}")
    print(f"IPv6 packets forwarded during {count} requests: {delta}")
    assert summary["failed"] == 0, summary["errors"]
    assert set(summary["by_site"]) == set(lab.SITES)
    assert set(summary["by_node"]) == set(lab.NODES)
    assert len(summary["by_backend"]) == 4  # web's backends, both sites
    # Every request is at least SYN, ACK, request, FIN one way and as many back: all of it
    # through the core over IPv6, and through one site router or the other.
    assert delta["core"] >= 4 * count
    assert delta["router-a"] + delta["router-b"] >= 4 * count
    assert delta["router-a"] > 0 and delta["router-b"] > 0
    hops = lab.dexec("client", "traceroute", "-6", "-n", "-q", "1", "-w", "1", "-m", "5", WEB6)
    print(hops)
    assert "2001:db8:18::1 " in hops  # the core's clientnet address
    assert any(f"{hop} " in hops for hop in lab.SITE_NEXT_HOP6.values())  # a site router
    # The host itself never routes between the lab's networks, in either family.
    if (lab.ENGINE_STATE / "dockerd.owner").exists():
        assert lab.Path("/proc/sys/net/ipv6/conf/all/forwarding").read_text().strip() == "0"
        assert lab.Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "0"


@pytest.mark.parametrize("vip", [APP4, APP6])
def test_the_second_service_serves_over_both_families(vip: str) -> None:
    summary = lab.burst(200, host=vip)
    print(f"\nclient -> {vip}:80: {json.dumps(summary)}")
    assert summary["failed"] == 0, summary["errors"]
    assert set(summary["by_node"]) == set(lab.NODES)
    # app's own backends (the backend containers' second process, over IPv6), all four.
    backends = set(summary["by_backend"])
    assert len(backends) == 4 and all(name.endswith("-app") for name in backends), backends


def test_the_core_fib_holds_both_services_in_both_families() -> None:
    routes = lab.service_routes("core")
    print(f"\ncore FIB: {routes}")
    for vip, hops in routes.items():
        assert set(hops) == _sites_for(vip), vip
    # Each site router holds every one of its edges for each VIP, over the edge's address
    # of that family (the IPv6 routes came over the IPv6 sessions).
    for site, router in lab.SITE_ROUTER.items():
        for vip, hops in lab.service_routes(router).items():
            edges = lab.EDGE_ADDRESS6 if ":" in vip else lab.EDGE_ADDRESS
            assert set(hops) == {edges[node] for node in lab.SITES[site]}, (router, vip)
    # The IPv6 routes carry the sites' cumulative link-bandwidth to the core, as the IPv4
    # ones do: the core splits both families alike (equal weights: equal shares).
    detail = json.loads(lab.dexec("core", "vtysh", "-c", f"show bgp ipv6 unicast {WEB6}/128 json"))
    communities = [p.get("extendedCommunity", {}).get("string", "") for p in detail["paths"]]
    print(f"core's IPv6 paths for {WEB6}: {communities}")
    assert len(communities) == len(lab.SITES)
    assert all("LB:" in c for c in communities), communities
    weights6 = lab.fib_nexthops("core", WEB6)
    assert len(set(weights6.values())) == 1, weights6
    # Both families' sessions and BFD are up (what fleet_ready waited for, said here).
    sessions = lab.bgp_sessions("core")
    assert all(sessions.get(hop) == "Established" for hop in lab.SITE_NEXT_HOP6.values())
    for site, router in lab.SITE_ROUTER.items():
        bfd = lab.bfd_peers(router)
        assert all(bfd.get(lab.EDGE_ADDRESS6[node]) == "up" for node in lab.SITES[site]), bfd


def _service_states() -> dict[str, dict[str, str]]:
    """node -> service -> state, from the nodes' heartbeats (the GSLB's observed view)."""

    async def go() -> dict[str, dict[str, str]]:
        async with ApiClient(list(lab.API_URLS.values()), lab.OPERATOR_TOKEN, timeout_s=3) as c:
            observed = await c.observed()
        return {
            o.node: {s.name: str(s.state) for s in o.heartbeat.services}
            for o in observed
            if o.heartbeat is not None
        }

    return asyncio.run(go())


def _app_gone_web_kept() -> str | None:
    """What is not yet as it should be while app's backends fail: app's VIPs (both
    families) out of the core's FIB, web's still there via both sites; or None."""
    problems = [
        f"{vip} still via {sorted(hops)}" for vip in (APP4, APP6) if (hops := _core_next_hops(vip))
    ]
    problems += [
        f"{vip} via {sorted(hops)}"
        for vip in (WEB4, WEB6)
        if (hops := _core_next_hops(vip)) != _sites_for(vip)
    ]
    return "; ".join(problems) or None


def test_failing_one_services_backends_withdraws_only_its_prefixes() -> None:
    web_before = {vip: _core_next_hops(vip) for vip in (WEB4, WEB6)}
    assert all(hops == _sites_for(vip) for vip, hops in web_before.items()), web_before
    assert _core_next_hops(APP4) and _core_next_hops(APP6)
    # Client traffic to web over IPv6 across app's withdraw, and IPv4 after it.
    with lab.load(duration=20, workers=4, host=WEB6) as running:
        failed = lab.chaos_fail_service("app")
        print(f"\napp's health failing on {failed}")
        assert len(failed) >= 2 * len(lab.SITES)  # every backend container
        lab.wait_until_none(_app_gone_web_kept, 60, "app withdrawn at the core, web kept")
        records = running.result()
    states = _service_states()
    print(f"services as the nodes report them: {states}")
    print(f"core FIB: {lab.service_routes('core')}")
    assert {node: states[node] for node in lab.NODES} == {
        node: {"web": "healthy", "app": "down"} for node in lab.NODES
    }
    # Web kept serving from every edge over IPv6 all along (its routes never moved)...
    served = collections.Counter(r["node"] for r in records if r["ok"])
    failures = [r.get("error") for r in records if not r["ok"]]
    print(f"web over IPv6 during app's withdraw: {len(records)} requests, {dict(served)}")
    assert records and failures == [], failures[:10]
    assert set(served) == set(lab.NODES)
    # ... and over IPv4 after it; app's VIPs are unreachable in both families.
    summary = lab.burst(100, host=WEB4)
    assert summary["failed"] == 0 and set(summary["by_node"]) == set(lab.NODES), summary
    for vip in (APP4, APP6):
        dark = lab.burst(3, timeout=20, host=vip)
        print(f"{vip}: {dark['failed']} of {dark['total']} failed: {dark['errors']}")
        assert dark["failed"] == dark["total"] == 3
    # Healed: app comes back in both families, at every router (as fleet_ready checks).
    lab.chaos_heal()
    lab.wait_for(lab.services_announced_everywhere, 60, "app announced again everywhere")
    for vip in (APP4, APP6):
        assert lab.burst(50, host=vip)["failed"] == 0
