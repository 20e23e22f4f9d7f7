"""End to end, in the docker-compose lab, with real client traffic from the client container
to the anycast address through FRR routers to real agents (ExaBGP + bfdd) and backends.

Every load is bounded; every wait is a bounded poll; no assertion is about time.
"""

from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import threading
import time
from typing import Any

import pytest

from contract.client import ApiClient, ApiError
from contract.schemas import DrainKind, ServiceSpec
from deploy import lab
from tests.support.netlab import LongLivedClient

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900), pytest.mark.usefixtures("lab_ok")]


def served(records: list[dict[str, Any]]) -> collections.Counter[str]:
    return collections.Counter(r["node"] for r in records if r["ok"])


def failures(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if not r["ok"]]


def report(what: str, records: list[dict[str, Any]]) -> None:
    failed = failures(records)
    print(
        f"\n{what}: {len(records)} requests, served by {dict(served(records))}, failed {len(failed)}"
    )
    for record in failed[:10]:
        print(f"  failed: start {record['start']:.3f} {record.get('error')}")


def test_both_sites_and_all_four_edges_serve() -> None:
    summary = lab.burst(400)
    print(f"\n{json.dumps(summary)}")
    assert summary["failed"] == 0
    assert set(summary["by_site"]) == set(lab.SITES)
    assert set(summary["by_node"]) == set(lab.NODES)
    assert len(summary["by_backend"]) == 4  # both backends of both sites answered


def test_client_traffic_traverses_the_routers() -> None:
    before = {router: lab.forwarded_packets(router) for router in lab.ROUTERS}
    count = 200
    assert lab.burst(count)["failed"] == 0
    after = {router: lab.forwarded_packets(router) for router in lab.ROUTERS}
    delta = {router: after[router] - before[router] for router in lab.ROUTERS}
    print(f"\npackets forwarded during {count} requests: {delta}")
    # Each request is at least SYN, ACK, request, FIN one way and as many back: all of
    # them through the core, and through one site router or the other.
    assert delta["core"] >= 4 * count
    assert delta["router-a"] + delta["router-b"] >= 4 * count
    assert delta["router-a"] > 0 and delta["router-b"] > 0
    hops = lab.dexec("client", "traceroute", "-n", "-q", "1", "-w", "1", "-m", "5", lab.VIP)
    print(hops)
    assert "198.18.0.1 " in hops  # the core
    assert "198.18.1.2 " in hops or "198.18.2.2 " in hops  # a site router
    # The host itself never routes between the lab's networks.
    if (lab.ENGINE_STATE / "dockerd.owner").exists():
        assert lab.Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "0"


def test_site_weights_3_to_1_reach_the_core_and_the_traffic() -> None:
    lab.set_site_weights({"site-a": 300, "site-b": 100})
    lab.wait_for(
        lambda: abs(lab.site_shares_at_core()["site-a"] - 0.75) < 0.02,
        60,
        "the core's next-hop weights at 3:1",
    )
    print(f"\ncore FIB next-hops: {lab.fib_nexthops('core')}")
    summary = lab.burst(1000, timeout=120)
    share_a = summary["by_site"].get("site-a", 0) / max(1, summary["total"] - summary["failed"])
    print(f"measured: {summary['by_site']} -> site-a {share_a:.1%} (target 75%)")
    assert summary["failed"] == 0
    # 1000 flows hashed at random: 75% +- 4 standard deviations (1.4% each).
    assert 0.69 <= share_a <= 0.81


def _fib_lacks(router: str, address: str) -> bool:
    hops = lab.fib_nexthops(router)
    return bool(hops) and address not in hops


def _settled() -> bool:
    """The change is over: every live node applied the GSLB's latest revision, and no router's
    next-hops for the VIP moved for a second. A drain re-weights the nodes left serving (each
    applies its new share on its own long-poll, so a site router's split moves for a moment),
    and a flow hashed anew mid-handshake by such a move would be reset without flow
    sharing, which hands it to its owner."""
    view = lab.gslb_view()
    lagging = [
        name
        for name, node in view["nodes"].items()
        if node["liveness"] == "alive" and node["applied_revision"] != view["revision"]
    ]
    if lagging:
        return False
    before = {router: lab.fib_nexthops(router) for router in lab.ROUTERS}
    time.sleep(1.0)
    return before == {router: lab.fib_nexthops(router) for router in lab.ROUTERS}


def test_drain_a_node_then_its_site() -> None:
    node, site = "edge-a1", "site-a"
    with lab.load(duration=30, workers=4) as running:
        time.sleep(3)
        lab.drain(DrainKind.NODE, node, "e2e: planned node drain")
        lab.wait_for(lambda: _fib_lacks("router-a", lab.EDGE_ADDRESS[node]), 30, f"{node} gone")
        lab.wait_for(_settled, 30, "the fleet settled after the node drain")
        node_drained_at = time.time()
        time.sleep(3)
        site_drain_started_at = time.time()
        lab.drain(DrainKind.SITE, site, "e2e: planned site drain")
        lab.wait_for(lambda: _fib_lacks("core", lab.SITE_NEXT_HOP[site]), 30, f"{site} gone")
        lab.wait_for(_settled, 30, "the fleet settled after the site drain")
        site_drained_at = time.time()
        records = running.result()
    report("drain", records)
    after_node = [r for r in records if node_drained_at < r["start"] < site_drain_started_at]
    after_site = [r for r in records if r["start"] > site_drained_at]
    in_flight = [r for r in failures(records) if r["start"] <= site_drained_at]
    # Flows the routers re-hash while the routes change reach their owner through flow
    # sharing (the lab's edges run it, across both sites): none fails.
    assert in_flight == [], [
        ("node" if r["start"] < site_drain_started_at else "site", r.get("error"))
        for r in in_flight
    ]
    assert after_node and after_site
    assert failures(after_node) == []
    assert node not in served(after_node)
    assert failures(after_site) == []
    assert set(served(after_site)) <= set(lab.SITES["site-b"])


def test_killing_a_node_moves_its_traffic() -> None:
    node = "edge-b1"
    with lab.load(duration=10, workers=4) as running:
        time.sleep(3)
        lab.chaos_kill(node)
        killed_at = time.time()
        lab.wait_for(lambda: _fib_lacks("router-b", lab.EDGE_ADDRESS[node]), 30, f"{node} gone")
        gone_at = time.time()
        records = running.result()
    report(f"kill {node}", records)
    print(f"route gone {gone_at - killed_at:.2f} s after the kill")
    after = [r for r in records if r["start"] > gone_at]
    assert after
    assert failures(after) == []
    assert node not in served(after)
    assert served(after).keys() >= {"edge-a1", "edge-a2", "edge-b2"}
    # Only requests in flight at the kill (or sent before the route went) may fail.
    assert all(r["start"] <= gone_at for r in failures(records))


def test_freezing_a_node_is_detected_through_bfd() -> None:
    node = "edge-a2"
    address = lab.EDGE_ADDRESS[node]
    lab.chaos_freeze(node)
    lab.wait_for(lambda: _fib_lacks("router-a", address), 30, f"frozen {node} gone")
    neighbor = json.loads(
        lab.dexec("router-a", "vtysh", "-c", f"show bgp neighbors {address} json")
    )
    reason = neighbor[address].get("lastNotificationReason", "")
    print(f"\nrouter-a dropped {node}: {reason}; BFD {lab.bfd_peers('router-a').get(address)}")
    assert "BFD" in reason
    summary = lab.burst(200)
    assert summary["failed"] == 0
    assert node not in summary["by_node"]


def test_stopping_every_api_changes_nothing_for_traffic() -> None:
    fibs = {router: lab.fib_nexthops(router) for router in lab.ROUTERS}
    lab.run("docker", "stop", "-t", "2", *(lab.container(api) for api in lab.API_URLS))
    with lab.load(duration=8, workers=4) as running:
        for _ in range(10):  # bounded: the routers keep what they had
            assert {router: lab.fib_nexthops(router) for router in lab.ROUTERS} == fibs
            time.sleep(0.5)
        records = running.result()
    report("no API", records)
    assert failures(records) == []
    assert set(served(records)) == set(lab.NODES)


def test_partitioning_the_apis_from_etcd_changes_nothing_for_traffic() -> None:
    fibs = {router: lab.fib_nexthops(router) for router in lab.ROUTERS}
    lab.chaos_partition_api_etcd()
    with lab.load(duration=6, workers=4) as running:
        for _ in range(8):
            assert {router: lab.fib_nexthops(router) for router in lab.ROUTERS} == fibs
            time.sleep(0.5)
        records = running.result()
    report("APIs cut from etcd", records)
    assert failures(records) == []
    assert set(served(records)) == set(lab.NODES)


def test_an_etcd_leader_kill_loses_no_acknowledged_write() -> None:
    acked: list[tuple[str, int]] = []
    refused: list[str] = []
    stop = threading.Event()

    async def writer() -> None:
        async with ApiClient(list(lab.API_URLS.values()), lab.OPERATOR_TOKEN, timeout_s=5) as c:
            index = 0
            while not stop.is_set() and index < 400:
                name = f"probe-{index}"
                index += 1
                try:
                    state = await c.state()
                    spec = ServiceSpec(prefix="198.51.100.10/32", ports=[80])
                    done = await c.put_service(name, spec, revision=state.revision)
                    acked.append((name, done.revision))
                except ApiError as exc:
                    refused.append(f"{name}: {exc}")
                    await asyncio.sleep(0.05)

    thread = threading.Thread(target=lambda: asyncio.run(writer()))
    thread.start()
    try:
        lab.wait_for(lambda: len(acked) >= 10, 30, "writes before the kill")
        leader = lab.chaos_kill_etcd_leader()
        killed_after = len(acked)
        lab.wait_for(lambda: len(acked) >= killed_after + 10, 60, "writes after the kill")
    finally:
        stop.set()
        thread.join(60)
    print(
        f"\nkilled etcd leader {leader}; {len(acked)} writes acknowledged, {len(refused)} refused"
    )
    lab.chaos_heal()  # the killed member comes back and catches up

    async def read_back() -> Any:
        async with ApiClient(list(lab.API_URLS.values()), lab.OPERATOR_TOKEN) as c:
            return await c.state()

    state = asyncio.run(read_back())
    missing = [name for name, _ in acked if name not in state.services]
    assert missing == []
    assert state.revision >= max(revision for _, revision in acked)

    async def clean() -> None:
        async with ApiClient(list(lab.API_URLS.values()), lab.OPERATOR_TOKEN) as c:
            for name in list(state.services):
                current = await c.state()
                # The last one withdraws the only served prefix: the disruption budget
                # refuses that without an override.
                await c.delete_service(
                    name, revision=current.revision, override="e2e cleanup of probe services"
                )

    asyncio.run(clean())


def test_edgectl_finds_the_lab_by_itself(tmp_path: lab.Path) -> None:
    """What `make lab` leaves behind: a current `lab` context, so `edgectl status` needs no flag."""
    import os
    import subprocess
    import sys

    config = lab.write_context(tmp_path / "edgectl.yaml")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EDGECTL_")}
    environ["EDGECTL_CONFIG"] = str(config)
    edgectl = str(lab.Path(sys.executable).parent / "edgectl")
    result = subprocess.run(
        [edgectl, "status"], capture_output=True, text=True, env=environ, timeout=60, check=False
    )
    print(result.stdout)
    assert result.returncode == 0, result.stderr
    for node in lab.NODES:
        assert node in result.stdout


LONG_LIVED = 200


def _flowshare_sections() -> dict[str, dict[str, Any]]:
    """Each edge's /status flowshare section (its admin endpoint listens on its loopback)."""
    fetch = (
        "import urllib.request; "
        "print(urllib.request.urlopen('http://127.0.0.1:9901/status', timeout=5).read().decode())"
    )
    return {
        node: json.loads(lab.dexec(node, "python", "-c", fetch))["flowshare"] for node in lab.NODES
    }


def _flows_out_of_sync() -> str | None:
    """What is out of sync among the edges' flow tables, or None: every edge's streams to
    its peers are up and acknowledged, and every edge holds each peer's flows as that peer
    counts them (after the chaos tests, a replaced or frozen edge's streams were found dead
    by the keepalive and started over with a snapshot)."""
    read_at: dict[str, float] = {}
    sections: dict[str, dict[str, Any]] = {}
    for node, section in _flowshare_sections().items():
        sections[node], read_at[node] = section, time.monotonic()
    problems: list[str] = []
    for edge, section in sections.items():
        for name, peer in section["peers"].items():
            where = f"{edge}/{name}"
            if not peer["connected"]:
                problems.append(
                    f"{where}: stream {edge}->{name} not connected"
                    f" (attempt {peer.get('attempt')}, connects {peer['connects']},"
                    f" dead_streams {peer['dead_streams']})"
                )
            if not peer["live"]:
                problems.append(f"{where}: {name} not live at {edge} (no frame within timeout)")
            if peer["acked_seq"] < peer["sent_seq"]:
                problems.append(
                    f"{where}: acked_seq {peer['acked_seq']} < sent_seq {peer['sent_seq']}"
                )
            owned = sections[name]["own_flows"]
            if peer["flows_held"] != owned:
                says = sections[name]["peers"].get(edge, {})
                problems.append(
                    f"{where}: flows_held {peer['flows_held']} != {name}'s own_flows {owned}"
                    f" ({name}'s stream to {edge}: sent_seq {says.get('sent_seq')},"
                    f" acked_seq {says.get('acked_seq')}, holds_of_ours"
                    f" {says.get('holds_of_ours')}; {name} read"
                    f" {read_at[name] - read_at[edge]:+.2f} s after {edge})"
                )
    return "; ".join(problems) or None


def test_long_lived_connections_survive_planned_changes() -> None:
    """200 keep-alive connections from the client to the VIP's HTTP listener, each sending
    a request and expecting its response every 200 ms, across a site weight change, a node
    drain and its undrain and a site drain: none is reset (a draining node may end one
    gracefully, `Connection: close` after a whole response: counted apart, not broken). Each change is counted from just before it until its routes settled
    and 2.5 s more (a broken connection shows within the client's 2 s patience), before a
    drained node's own deadline closes what is left on it."""
    sections = _flowshare_sections()
    assert all(s["forwarding"] == "on" and s["overlay"]["up"] for s in sections.values()), sections
    process = subprocess.Popen(
        ["docker", "exec", "-i", lab.container("client"), "python", "-c",
         LongLivedClient.code(port=80, period=0.2, http=True)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    client = LongLivedClient(process)
    changes: list[tuple[str, Any, Any]] = [
        (
            "site weights 3:1",
            lambda: lab.set_site_weights({"site-a": 300, "site-b": 100}),
            lambda: abs(lab.site_shares_at_core()["site-a"] - 0.75) < 0.02,
        ),
        (
            "drain edge-a1",
            lambda: lab.drain(DrainKind.NODE, "edge-a1", "e2e: long-lived"),
            lambda: _fib_lacks("router-a", lab.EDGE_ADDRESS["edge-a1"]),
        ),
        (
            "undrain edge-a1",
            lab.undrain_all,
            lambda: lab.EDGE_ADDRESS["edge-a1"] in lab.fib_nexthops("router-a"),
        ),
        (
            "drain site-b",
            lambda: lab.drain(DrainKind.SITE, "site-b", "e2e: long-lived"),
            lambda: _fib_lacks("core", lab.SITE_NEXT_HOP["site-b"]),
        ),
    ]
    broken: dict[str, int] = {}
    try:
        for name, change, settled in changes:
            # A drained node closes what is left on it at its deadline: start each change
            # from a full pool on serving nodes.
            lab.wait_for(_settled, 60, f"the fleet settled before: {name}")
            lab.wait_until_none(_flows_out_of_sync, 30, f"the flow tables in sync before: {name}")
            missing = LONG_LIVED - client.report()["open"]
            if missing > 0:
                client.open(missing, f"refill-{len(broken)}")
            before = client.report()
            assert before["open"] >= LONG_LIVED, before
            change()
            lab.wait_for(settled, 60, f"the routes after: {name}")
            lab.wait_for(_settled, 60, f"the fleet settled after: {name}")
            time.sleep(2.5)
            after = client.report()
            broken[name] = sum(after["broken"].values()) - sum(before["broken"].values())
            closed = sum(after["closed"].values()) - sum(before["closed"].values())
            print(f"\n{name}: {broken[name]} of {before['open']} long-lived connections broken,"
                  f" {closed} closed gracefully")  # fmt: skip
    finally:
        process.kill()
        process.wait(10)
    sections = _flowshare_sections()
    forwarded = sum(
        peer["packets_forwarded"]
        for section in sections.values()
        for peer in section["peers"].values()
    )
    print(f"packets forwarded to their owners: {forwarded}")
    held = {
        node: {name: (p["connected"], p["flows_held"]) for name, p in section["peers"].items()}
        for node, section in sections.items()
    }
    assert broken == {name: 0 for name, _, _ in changes}, held
    assert forwarded > 0  # the changes did move flows
