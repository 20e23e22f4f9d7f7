"""Flow-sharing numbers within a site, in network namespaces (root; a few minutes, bounded).

A real FRR router with multipath to three edges running the real agent, the GSLB API,
and a client with long-lived connections that each send and expect an echo every 100 ms:
broken connections out of N for a join, a weight change, a drain and an undrain, with the
forwarding off and on; the sync lag (accept -> every peer holds it in its kernel map) as
the agents measure it; and the forwarding map at 100,000 and 1,000,000 flows (load time,
kernel memory, the agent's memory for the peer table). Prints a table and writes
bench-results/flows.json (`changes`: [{name, forwarding, connections, broken}],
`sync_lag_ms`: {p50, p99}, `map`: [...]). Across sites (names ending `_across_sites`):
edges 1-2 in site a, edge 3 in site b, no shared segment, a VXLAN overlay among the
agents over their routed links; a drain of site b too.

    python -m bench.flows [--connections 300] [--map-sizes 100000,1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edge.config import FlowShareConfig
from edge.flowshare import kernel, render
from edge.flowshare.table import SenderTable
from edge.flowshare.wire import FlowKey, Snapshot
from tests.support.netlab import VIP, build_flow_fleet, run_planned_changes

RESULTS = Path("bench-results/flows.json")
ROOT = Path(__file__).resolve().parents[1]


def changes(connections: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    results: list[dict[str, Any]] = []
    lag: dict[str, Any] = {}
    sections: list[dict[str, Any]] = []
    for across_sites in (False, True):
        for forwarding in (False, True):
            lab, fleet, client = build_flow_fleet(forwarding, connections, across_sites)
            try:
                results += run_planned_changes(fleet, client, connections)
                if forwarding:
                    sections += [fleet.status(i)["flowshare"]["sync_lag_ms"] for i in (1, 2, 3)]
            finally:
                lab.close()
    lag = {
        # Each agent's own percentiles over its run; the worst agent's stand.
        "p50": max(s["p50"] for s in sections if s["p50"] is not None),
        "p99": max(s["p99"] for s in sections if s["p99"] is not None),
        "samples": sum(s["samples"] for s in sections),
    }
    return results, lag


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
    args = parser.parse_args()
    if args.map_only:
        print(json.dumps(asyncio.run(_map_scale(args.map_only))))
        return
    if os.geteuid() != 0:
        sys.exit("bench.flows: needs root (network namespaces)")
    moved, lag = changes(args.connections)
    maps = [map_scale(int(n)) for n in args.map_sizes.split(",") if n]
    print(f"\n{'change':<26} {'forwarding':>10} {'connections':>12} {'broken':>7} {'young':>6}")
    for r in moved:
        print(
            f"{r['name']:<26} {'on' if r['forwarding'] else 'off':>10} {r['connections']:>12}"
            f" {r['broken']:>7} {r['young_broken']:>6}"
        )
    print(f"\nsync lag accept -> every peer's map: p50 {lag['p50']} ms, p99 {lag['p99']} ms"
          f" ({lag['samples']} samples, worst agent)")  # fmt: skip
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
                "map": maps,
                "note": "netns, this machine (2 shared cores); _across_sites: VXLAN, 2 sites",
            },
            indent=2,
        )
    )
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
