"""Flow-sharing numbers within a site, in network namespaces (root; a few minutes, bounded).

A real FRR router with multipath to three edges running the real agent, the GSLB API,
and a client with long-lived connections that each send and expect an echo every 100 ms:
broken connections out of N for a join, a weight change, a drain and an undrain, with the
forwarding off and on; the sync lag (accept -> every peer holds it in its kernel map) as
the agents measure it; the CPU that forwarding costs per packet on the forwarding edge
(the same packets sent to the owner directly and through the forwarding edge, the
sender's CPU compared: veth delivers in the sender's softirq); and the forwarding map at
100,000 and 1,000,000 flows (load time, kernel memory, the agent's memory for the peer
table). Prints a table and writes bench-results/flows.json (`changes`: [{name,
forwarding, connections, broken}], `sync_lag_ms`: {p50, p99},
`cpu_per_forwarded_packet_us`, `map`: [...]). Across sites (names ending
`_across_sites`): edges 1-2 in site a, edge 3 in site b, no shared segment, a VXLAN
overlay among the agents over their routed links; a drain of site b too.

    python -m bench.flows [--connections 300] [--map-sizes 100000,1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edge.config import FlowShareConfig
from edge.flowshare import kernel, render
from edge.flowshare.table import SenderTable
from edge.flowshare.wire import FlowKey, Snapshot
from tests.support.netlab import (
    VIP,
    FlowFleet,
    build_flow_fleet,
    netns_command,
    run_planned_changes,
)

RESULTS = Path("bench-results/flows.json")
FORWARD_PACKETS = 100_000
ROOT = Path(__file__).resolve().parents[1]


# Sends `count` copies of one Ethernet frame (a TCP ACK of a live flow) out of one
# interface with AF_PACKET; prints the CPU this process used meanwhile. A veth delivers
# in the sender's own softirq, so that CPU includes every hop the packet takes behind it.
_BLASTER = r"""
import json, resource, socket, struct, sys
ifname, dst_mac, src_mac, src, sport, dst, dport, count = sys.argv[1:]
def csum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
saddr, daddr = socket.inet_aton(src), socket.inet_aton(dst)
tcp = struct.pack("!HHIIBBHHH", int(sport), int(dport), 0x12345678, 0x9ABCDEF0, 5 << 4,
                  0x10, 502, 0, 0)
pseudo = saddr + daddr + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0, saddr, daddr)
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
eth = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", ""))
frame = eth + b"\x08\x00" + ip + tcp
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
sock.bind((ifname, 0))
before = resource.getrusage(resource.RUSAGE_SELF)
for _ in range(int(count)):
    sock.send(frame)
after = resource.getrusage(resource.RUSAGE_SELF)
used = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
print(json.dumps({"cpu_s": used}))
"""


def _mac(netns: str, ifname: str) -> str:
    out = subprocess.run(
        ["ip", "-n", netns, "-j", "link", "show", "dev", ifname],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return str(json.loads(out)[0]["address"])


def _agent_cpu_s(fleet: FlowFleet, index: int) -> float:
    fields = Path(f"/proc/{fleet.agents[index].pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _forwarded(fleet: FlowFleet, index: int) -> int:
    peers = fleet.status(index)["flowshare"]["peers"]
    return sum(int(p["packets_forwarded"]) for p in peers.values())


def forwarding_cpu(fleet: FlowFleet, packets: int, rounds: int = 3) -> dict[str, Any]:
    """CPU per forwarded packet on edge 1: from the router's namespace, the same TCP ACK of
    a flow a peer of edge 1 owns is sent `packets` times straight to the owner (reference)
    and `packets` times to edge 1, which forwards it to the owner over the peers' segment.
    The sender's CPU includes every hop behind it (veth delivers in its softirq): the
    difference per packet is what edge 1's forwarding adds (its nft lookup, policy routing,
    the hop over the segment). Edge 1's agent is not on the path: its own CPU meanwhile is
    reported beside it."""
    lab = fleet.lab
    elements = fleet.map_elements(1)
    maps = {i: fleet.map_elements(i) for i in fleet.agents if i != 1}
    # A flow edge 1 forwards: in edge 1's map, and owned by the edge whose map lacks it.
    key, owner = next((k, i) for k in elements for i in maps if k not in maps[i])
    client, client_port, vip, vip_port = key
    router_ns = lab.router_netns

    def blast(index: int) -> float:
        router_if = f"ae{lab.suffix}r{index}"
        edge = lab.edges[index - 1]
        out = subprocess.run(
            netns_command(router_ns, sys.executable, "-c", _BLASTER, router_if,
                          _mac(edge.netns, edge.veth), _mac(router_ns, router_if), client,
                          str(client_port), vip, str(vip_port), str(packets)),
            capture_output=True, text=True, check=True, timeout=600,
        ).stdout  # fmt: skip
        return float(json.loads(out)["cpu_s"])

    direct: list[float] = []
    via: list[float] = []
    forwarded: list[int] = []
    agent: list[float] = []
    for _ in range(rounds):
        direct.append(blast(owner))
        time.sleep(1.5)  # the agent reads its packet counters once a second
        before, cpu_before = _forwarded(fleet, 1), _agent_cpu_s(fleet, 1)
        via.append(blast(1))
        agent.append(_agent_cpu_s(fleet, 1) - cpu_before)
        time.sleep(1.5)
        forwarded.append(_forwarded(fleet, 1) - before)
    extra_us = [(v - d) * 1e6 / max(f, 1) for v, d, f in zip(via, direct, forwarded, strict=True)]
    return {
        "packets": packets,
        "forwarded": forwarded,
        "direct_us_per_packet": round(statistics.median(direct) * 1e6 / packets, 2),
        "via_forwarding_edge_us_per_packet": round(statistics.median(via) * 1e6 / packets, 2),
        "cpu_per_forwarded_packet_us": round(statistics.median(extra_us), 2),
        "agent_cpu_us_per_forwarded_packet": round(
            statistics.median(agent) * 1e6 / max(statistics.median(forwarded), 1), 3
        ),
    }


def changes(connections: int) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    results: list[dict[str, Any]] = []
    lag: dict[str, Any] = {}
    cpu: dict[str, Any] = {}
    sections: list[dict[str, Any]] = []
    for across_sites in (False, True):
        for forwarding in (False, True):
            lab, fleet, client = build_flow_fleet(forwarding, connections, across_sites)
            try:
                results += run_planned_changes(fleet, client, connections)
                if forwarding:
                    sections += [fleet.status(i)["flowshare"]["sync_lag_ms"] for i in (1, 2, 3)]
                if forwarding and not across_sites:
                    cpu = forwarding_cpu(fleet, FORWARD_PACKETS)
            finally:
                lab.close()
    lag = {
        # Each agent's own percentiles over its run; the worst agent's stand.
        "p50": max(s["p50"] for s in sections if s["p50"] is not None),
        "p99": max(s["p99"] for s in sections if s["p99"] is not None),
        "samples": sum(s["samples"] for s in sections),
        # Per agent (three per fleet, within a site then across sites): p50, p99, samples.
        "agents": [[s["p50"], s["p99"], s["samples"]] for s in sections],
        # The slowest batches of all agents: lag, of it before the streams had the batch
        # (the accepting agent's own loop), the last peer to ack, seconds since its start.
        "slowest": sorted(
            (x for s in sections for x in s.get("slowest", [])), key=lambda x: -x["lag"]
        )[:8],
    }
    return results, lag, cpu


def _keys(count: int) -> list[FlowKey]:
    # Clients in 198.19.0.0/16 (lab range), 16 ports each for a million.
    return [
        FlowKey(f"198.19.{(i >> 8) & 255}.{i & 255}", 1024 + (i >> 16), VIP, 8080)
        for i in range(count)
    ]


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _slab_kb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Slab:"):
            return int(line.split()[1])
    return 0


async def _map_scale(count: int) -> dict[str, Any]:
    """Inside a throwaway namespace: the agent's table for `count` peer flows and the
    nft map holding them."""
    cfg = FlowShareConfig.model_validate(
        {
            "local_address": "198.18.1.1",
            "peers": [{"name": "edge2", "address": "198.18.1.2"}],
            "peer_interface": "lo",
            "key": "x" * 16,
        }
    )
    rss = _rss_kb()  # what the agent holds for a peer: the keys and the table around them
    keys = _keys(count)
    table = SenderTable()
    table.apply_snapshot(Snapshot(1, 0, 1, tuple(keys)))
    table_kb = _rss_kb() - rss
    await kernel.nft(render.ruleset(cfg, [(VIP, 8080)]))
    slab = _slab_kb()
    mark = render.peer_marks(cfg)["edge2"]
    started = time.monotonic()
    step = 50_000
    for i in range(0, count, step):
        await kernel.nft(render.element_commands([], dict.fromkeys(keys[i : i + step], mark)))
    load_s = time.monotonic() - started
    elements = await kernel.nft_json("list", "map", "inet", render.TABLE, render.MAP4)
    held = sum(len(m.get("map", {}).get("elem", [])) for m in elements["nftables"])
    slab_kb = _slab_kb() - slab
    started = time.monotonic()
    await kernel.delete_table()
    return {
        "flows": count,
        "map_elements": held,
        "load_s": round(load_s, 2),
        "kernel_slab_mb": round(slab_kb / 1024, 1),
        "kernel_bytes_per_flow": round(slab_kb * 1024 / count),
        "agent_table_mb": round(table_kb / 1024, 1),
        "agent_bytes_per_flow": round(table_kb * 1024 / count),
        "delete_s": round(time.monotonic() - started, 2),
    }


def map_scale(count: int) -> dict[str, Any]:
    netns = f"ae-{secrets.token_hex(3)}-m"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        out = subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "bench.flows",
             "--map-only", str(count)],
            capture_output=True, text=True, timeout=900, check=True, cwd=ROOT,
        ).stdout  # fmt: skip
        result: dict[str, Any] = json.loads(out.splitlines()[-1])
        return result
    finally:
        subprocess.run(["ip", "netns", "delete", netns], check=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument("--map-sizes", default="100000,1000000")
    parser.add_argument("--map-only", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cpu-only", action="store_true", help="only the CPU per packet")
    args = parser.parse_args()
    if args.cpu_only:
        lab, fleet, _ = build_flow_fleet(True, 40)
        try:
            print(json.dumps(forwarding_cpu(fleet, FORWARD_PACKETS)))
        finally:
            lab.close()
        return
    if args.map_only:
        print(json.dumps(asyncio.run(_map_scale(args.map_only))))
        return
    if os.geteuid() != 0:
        sys.exit("bench.flows: needs root (network namespaces)")
    moved, lag, cpu = changes(args.connections)
    maps = [map_scale(int(n)) for n in args.map_sizes.split(",") if n]
    print(f"\n{'change':<26} {'forwarding':>10} {'connections':>12} {'broken':>7} {'young':>6}")
    for r in moved:
        print(
            f"{r['name']:<26} {'on' if r['forwarding'] else 'off':>10} {r['connections']:>12}"
            f" {r['broken']:>7} {r['young_broken']:>6}"
        )
    print(f"\nsync lag accept -> every peer's map: p50 {lag['p50']} ms, p99 {lag['p99']} ms"
          f" ({lag['samples']} samples, worst agent; target p99 <= 100 ms)")  # fmt: skip
    print("  per agent p50/p99 ms (samples): " + ", ".join(
        f"{a[0]}/{a[1]} ({a[2]})" for a in lag["agents"]))  # fmt: skip
    print("  slowest batches (ms, of it before sent, last ack from, s after start): " + ", ".join(
        f"{x['lag']} ({x['before_sent']}, {x['last_ack_from']}, {x['at_s']})"
        for x in lag["slowest"]))  # fmt: skip
    print(f"forwarding edge's CPU per forwarded packet: {cpu['cpu_per_forwarded_packet_us']} us"
          f" (sent to the owner directly {cpu['direct_us_per_packet']} us/packet, through"
          f" the forwarding edge {cpu['via_forwarding_edge_us_per_packet']} us/packet,"
          f" {cpu['packets']} packets x {len(cpu['forwarded'])}; edge 1's agent"
          f" {cpu['agent_cpu_us_per_forwarded_packet']} us/packet)")  # fmt: skip
    print(f"\n{'flows':>9} {'in map':>9} {'load s':>7} {'kernel MB':>10} {'B/flow':>7}"
          f" {'agent MB':>9} {'B/flow':>7}")  # fmt: skip
    for m in maps:
        print(
            f"{m['flows']:>9} {m['map_elements']:>9} {m['load_s']:>7} {m['kernel_slab_mb']:>10}"
            f" {m['kernel_bytes_per_flow']:>7} {m['agent_table_mb']:>9}"
            f" {m['agent_bytes_per_flow']:>7}"
        )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "changes": [
                    {
                        k: r[k]
                        for k in ("name", "forwarding", "connections", "broken", "young_broken")
                    }
                    for r in moved
                ],
                "sync_lag_ms": lag,
                "cpu_per_forwarded_packet_us": cpu["cpu_per_forwarded_packet_us"],
                "forwarding_cpu": cpu,
                "map": maps,
                "note": "netns, this machine (2 shared cores); _across_sites: VXLAN, 2 sites",
            },
            indent=2,
        )
    )
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
