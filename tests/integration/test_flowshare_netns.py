"""Flow sharing against the real parts: a real FRR router with multipath (UCMP from the
GSLB's weights) to three edges running the real agent (L4 listener on the VIP, echo
backend), the GSLB API, and a client with long-lived connections that each send and expect
an echo every 100 ms. For a join, a weight change, a drain and an undrain: with the
forwarding no connection breaks (also none opened just before the change); without it,
the same changes break connections (so the scenario does move flows). Then: stale maps
pointing at each other drop a packet instead of bouncing it; forged flow announcements
are refused; a crash's leftovers go at the next start and a stop leaves nothing; a
missing kernel feature means serving without forwarding, nothing half installed.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge.config import FlowShareConfig, parse_config
from edge.flows import FlowTable
from edge.flowshare import render, wire
from edge.flowshare.extension import FlowShareExtension, Forwarding
from edge.flowshare.link import framed
from edge.flowshare.wire import Delta, Frame, Op, flow_key
from tests.support.netlab import (
    FLOW_KEY,
    FLOW_PORT,
    PLANNED_CHANGES,
    VIP,
    FlowFleet,
    LongLivedClient,
    build_flow_fleet,
    in_netns,
    netns_command,
    peer_lan_address,
    run,
    run_planned_changes,
    wait_for,
)

pytestmark = [pytest.mark.netns, pytest.mark.needs("root", "frr", "nft")]

CONNECTIONS = 200


@pytest.fixture(scope="module")
def fleet_on() -> Iterator[tuple[FlowFleet, LongLivedClient, list[dict[str, Any]]]]:
    lab, fleet, client = build_flow_fleet(forwarding=True, connections=CONNECTIONS)
    try:
        results = run_planned_changes(fleet, client, CONNECTIONS)
        yield fleet, client, results
    finally:
        lab.close()


@pytest.mark.timeout(300)
def test_with_forwarding_planned_changes_break_no_connection(
    fleet_on: tuple[FlowFleet, LongLivedClient, list[dict[str, Any]]],
) -> None:
    fleet, _, results = fleet_on
    print(json.dumps(results))
    assert [r["name"] for r in results] == list(PLANNED_CHANGES)
    for result in results:
        assert result["connections"] >= CONNECTIONS, result
        assert result["broken"] == 0, result
    # The drain waited for both peers to hold edge 1's flows before the BGP choreography.
    assert (
        "flowshare before node draining (drain moving traffic) -> leaving: 2 peers hold our flows"
        in fleet.agent_log(1)
    )
    # The changes did move flows: packets were handed to their owners.
    moved = sum(fleet.status(i)["flowshare"]["packets_moved"] for i in (1, 2, 3))
    assert moved > 0
    for index in (1, 2, 3):
        section = fleet.status(index)["flowshare"]
        assert section["forwarding"] == "on" and section["refused_frames"] == {}, section
        attempts = {peer["attempt"] for peer in section["peers"].values()}
        assert attempts == {"connected"}, section["peers"]
    # The weight change went through the GSLB's flow-sync gate, fed by the heartbeats'
    # flow-sharing reports (drains are not gated; a fleet without reports logs none).
    gated = [e for e in fleet.events() if e.kind == "flow-sync"]
    assert len(gated) == 1, gated
    assert gated[0].cause.startswith("flow tables "), gated[0]
    # /metrics says what /status says: flows held per peer, packets forwarded per peer.
    forwarded = 0
    for index in (1, 2, 3):
        families = {
            f.name: f for f in text_string_to_metric_families(fleet.admin(index, "/metrics"))
        }
        held = {
            s.labels["peer"]: s.value
            for s in families["anycast_edge_flowshare_peer_flows_held"].samples
        }
        assert set(held) == {f"edge{i}" for i in (1, 2, 3) if i != index}
        forwarded += sum(
            s.value for s in families["anycast_edge_flowshare_peer_packets_forwarded"].samples
        )
        assert families["anycast_edge_flowshare_forwarding"].samples
        assert (
            "anycast_edge_flowshare_map_size" in families
            and "anycast_edge_flowshare_loop_drops" in families
        )
    assert forwarded > 0


@pytest.mark.timeout(300)
def test_without_forwarding_the_same_changes_break_connections() -> None:
    lab, fleet, client = build_flow_fleet(forwarding=False, connections=CONNECTIONS)
    try:
        results = run_planned_changes(fleet, client, CONNECTIONS)
    finally:
        lab.close()
    print(json.dumps(results))
    assert sum(r["broken"] for r in results) > 0, results
    drain = next(r for r in results if r["name"] == "drain")
    assert drain["broken"] > 0, drain  # the drained edge's flows land where no socket is


# -- loops, forgeries -----------------------------------------------------------------------


def counters(fleet: FlowFleet, index: int) -> dict[str, int]:
    edge = fleet.lab.edges[index - 1]
    out = run(*netns_command(edge.netns, "nft", "-j", "list", "table", "inet", render.TABLE))
    found: dict[str, int] = {}
    for item in json.loads(out)["nftables"]:
        rule = item.get("rule", {})
        for expr in rule.get("expr", []):
            if "counter" in expr and "comment" in rule:
                found[rule["comment"]] = expr["counter"]["packets"]
    return found


def loops(fleet: FlowFleet) -> int:
    return sum(counters(fleet, i).get("loop", 0) for i in (1, 2, 3))


_BARE_ACKS = """
import socket, struct
def checksum(data):
    if len(data) % 2:
        data += b"\\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF
src, dst = "{src}", "{dst}"
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
for n in range({count}):
    header = struct.pack("!HHIIBBHHH", {sport}, {dport}, 1000 + n, 1, 5 << 4, 0x10, 65535, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(header))
    header = header[:16] + struct.pack("!H", checksum(pseudo + header)) + header[18:]
    sock.sendto(header, (dst, 0))
"""


def test_stale_maps_pointing_at_each_other_do_not_bounce_a_packet(
    fleet_on: tuple[FlowFleet, LongLivedClient, list[dict[str, Any]]],
) -> None:
    """Each edge's map says the next edge owns a flow nobody has (bare ACKs from the
    client): whichever edge the router picks hands a packet on once; the next one drops it
    as a loop instead of handing it on again."""
    fleet, _, _ = fleet_on
    lab = fleet.lab
    sport = 61000
    element = f"{lab.client_address} . {sport} . {VIP} . {FLOW_PORT}"
    for index in (1, 2, 3):
        edge = lab.edges[index - 1]
        cfg = FlowShareConfig.model_validate(fleet.agent_config(edge)["flowshare"])
        mark = render.peer_marks(cfg)[f"edge{index % 3 + 1}"]
        command = f"add element inet {render.TABLE} {render.MAP4} {{ {element} : {mark:#x} }}"
        run(*netns_command(edge.netns, "nft", command))
    try:
        loops_before = loops(fleet)
        code = _BARE_ACKS.format(
            src=lab.client_address, dst=VIP, count=5, sport=sport, dport=FLOW_PORT
        )
        run(*netns_command(lab.client_netns, sys.executable, "-c", code))
        wait_for(lambda: loops(fleet) - loops_before >= 5, 10, what="5 packets dropped as loops")
        time.sleep(0.5)
        # A loop drop happens only to a packet that came over the peers' segment: each of
        # the 5 was handed on exactly once and then dropped (a bounce would count again).
        assert loops(fleet) - loops_before == 5
    finally:
        for edge in lab.edges:
            command = f"delete element inet {render.TABLE} {render.MAP4} {{ {element} }}"
            run(*netns_command(edge.netns, "nft", command), check=False)


def test_forged_flow_announcements_are_refused(
    fleet_on: tuple[FlowFleet, LongLivedClient, list[dict[str, Any]]],
) -> None:
    """From edge 3's address on the peers' segment: a frame with a wrong key, garbage,
    and a frame with the right key claiming to be edge 2. edge 1's map is unchanged."""
    fleet, _, _ = fleet_on
    lab = fleet.lab
    victim, attacker = lab.edges[0], lab.edges[2]
    claimed = flow_key(str(lab.client_address), 62000, VIP, FLOW_PORT)
    refused_before = sum(fleet.status(1)["flowshare"]["refused_frames"].values())
    map_before = fleet.map_elements(1)

    def frame(sender: str, key: bytes) -> bytes:
        body = Delta(((Op.ACCEPT, claimed),))
        forged = Frame(sender, "edge1", time.time_ns(), 10**9, time.time_ns() // 10**6, body)
        return framed(wire.encode(forged, key))

    async def attack() -> None:
        for payload in (
            frame("edge3", b"not the fleet's key, 16+ bytes"),
            framed(b"AEF1" + secrets.token_bytes(200)),
            frame("edge2", FLOW_KEY.encode()),  # right key, wrong address for edge2
        ):
            _, writer = await asyncio.open_connection(
                str(peer_lan_address(victim)), 4790, local_addr=(str(peer_lan_address(attacker)), 0)
            )
            writer.write(payload)
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.close()

    in_netns(attacker.netns, attack)
    wait_for(
        lambda: sum(fleet.status(1)["flowshare"]["refused_frames"].values()) >= refused_before + 3,
        10,
        what="three refused frames at edge 1",
    )
    refused = fleet.status(1)["flowshare"]["refused_frames"]
    assert any("bad MAC" in reason for reason in refused), refused
    assert any("not the peer at" in reason for reason in refused), refused
    elements = fleet.map_elements(1)
    assert (claimed.client, claimed.client_port, claimed.vip, claimed.vip_port) not in elements
    assert not [key for key in map_before if key[1] == claimed.client_port]


def test_a_frozen_peer_is_noticed_reconnected_and_resynced(
    fleet_on: tuple[FlowFleet, LongLivedClient, list[dict[str, Any]]],
) -> None:
    """kill -STOP edge 2's agent: its kernel still acknowledges TCP, so the streams look
    "up" to the kernel (TCP_USER_TIMEOUT cannot fire) and only the keepalive can tell.
    Edge 1 finds its stream to edge 2 unanswered and aborts it, and edge 2's stream to it
    silent (edge 2's flows are no longer forwarded to it). After SIGCONT the streams are
    back on new connections, and each side holds the other's flows whole again."""
    fleet, _, _ = fleet_on
    agent = fleet.agents[2]

    def peer(index: int, name: str) -> dict[str, Any]:
        return dict(fleet.status(index)["flowshare"]["peers"][name])

    before = peer(1, "edge2")
    assert before["connected"] and before["live"], before
    agent.send_signal(signal.SIGSTOP)
    try:
        wait_for(
            lambda: peer(1, "edge2")["dead_streams"] > before["dead_streams"],
            20,
            what="edge 1 finds its stream to the frozen edge 2 dead",
        )
        frozen = peer(1, "edge2")
        assert not frozen["live"], frozen
    finally:
        agent.send_signal(signal.SIGCONT)

    def resynced() -> bool:
        one, two = fleet.status(1)["flowshare"], fleet.status(2)["flowshare"]
        to_two, to_one = one["peers"]["edge2"], two["peers"]["edge1"]
        return bool(
            to_two["connected"]
            and to_two["live"]
            and to_two["connects"] > before["connects"]
            and to_two["acked_seq"] >= to_two["sent_seq"]
            and to_one["flows_held"] == one["own_flows"]
            and to_two["flows_held"] == two["own_flows"]
        )

    wait_for(resynced, 30, what="edge 1 and edge 2 hold each other's flows again")
    assert "stream to edge2" in fleet.agent_log(1) and "unanswered for" in fleet.agent_log(1)


# -- life cycle in the kernel -----------------------------------------------------------------


def kernel_state(netns: str) -> dict[str, Any]:
    tables = run(*netns_command(netns, "nft", "list", "tables"))
    rules = json.loads(run("ip", "-n", netns, "-j", "rule", "show"))
    sysctl = {
        name: run(*netns_command(netns, "sysctl", "-n", name)).strip()
        for name in ("net.ipv4.ip_forward", "net.ipv4.ip_early_demux")
    }
    return {
        "table": render.TABLE in tables,
        "local_pref": sorted(r.get("priority", 0) for r in rules if r.get("table") == "local"),
        "fwmark_rules": [r for r in rules if "fwmark" in r],
        "sysctl": sysctl,
    }


def test_a_crash_leaves_state_the_next_start_removes_and_a_stop_leaves_nothing(
    fleet_on: tuple[FlowFleet, LongLivedClient, list[dict[str, Any]]],
) -> None:
    fleet, _, _ = fleet_on
    edge = fleet.lab.edges[1]
    running = kernel_state(edge.netns)
    assert running["table"] and running["local_pref"] == [53] and running["fwmark_rules"]
    assert running["sysctl"] == {"net.ipv4.ip_forward": "1", "net.ipv4.ip_early_demux": "0"}
    fleet.stop_agent(2, signal.SIGKILL)
    assert kernel_state(edge.netns) == running  # a crash removes nothing
    fleet.start_agent(2)
    wait_for(
        lambda: "removed leftovers of an earlier run" in fleet.agent_log(2), 30, what="cleanup"
    )
    wait_for(
        lambda: fleet.status(2).get("flowshare", {}).get("forwarding") == "on",
        30,
        what="edge 2 back",
    )
    assert fleet.stop_agent(2) == 0
    clean = kernel_state(edge.netns)
    assert clean == {
        "table": False,
        "local_pref": [0],
        "fwmark_rules": [],
        "sysctl": {"net.ipv4.ip_forward": "0", "net.ipv4.ip_early_demux": "1"},
    }


def test_a_missing_kernel_feature_means_serving_without_forwarding(tmp_path: Path) -> None:
    """peer_interface names no interface: one clear line, status says so, nothing installed."""
    netns = f"ae-{secrets.token_hex(3)}-u"
    run("ip", "netns", "add", netns)
    try:
        run("ip", "-n", netns, "link", "set", "lo", "up")
        before = kernel_state(netns)
        config = parse_config(
            {
                "node": {"name": "edge1", "site": "s"},
                "listeners": [{"name": "tcp", "kind": "tcp", "address": VIP, "port": FLOW_PORT}],
                "backends": [{"name": "b", "address": "127.0.0.1", "port": 9001}],
                "flowshare": {
                    "local_address": "127.0.0.1",
                    "peers": [{"name": "edge2", "address": "127.0.0.2"}],
                    "peer_interface": "nosuchif0",
                    "key": FLOW_KEY,
                    "runtime_dir": str(tmp_path),
                },
            }
        )
        seen: dict[str, Any] = {}

        async def start_and_stop() -> None:
            ext = FlowShareExtension(config)
            await ext.start(SimpleNamespace(flows=FlowTable()))  # type: ignore[arg-type]
            seen["status"] = ext.status()
            seen["state"] = await asyncio.to_thread(kernel_state, netns)
            await ext.stop()

        thread = threading.Thread(target=lambda: in_netns(netns, start_and_stop))
        thread.start()
        thread.join(30)
        status = seen["status"]
        assert status["forwarding"] == Forwarding.UNAVAILABLE
        assert "no interface 'nosuchif0'" in status["unavailable"]
        assert "\n" not in status["unavailable"]
        assert seen["state"] == before  # nothing half installed
        assert kernel_state(netns) == before
    finally:
        run("ip", "netns", "delete", netns, check=False)
