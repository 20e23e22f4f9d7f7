"""`make bench-bgp`: BGP numbers measured on this machine with real FRR and ExaBGP in netns.

Prints a table and writes bench-results/bgp.json:
- health verdict -> UPDATE sent by ExaBGP (the agent's own share) and -> route gone from
  the router's kernel FIB (FRR 8.4's own processing is the floor), for an IPv4 /32 over
  an IPv4 session and an IPv6 /128 over an IPv6 session (`--updates-only`: these rows
  alone);
- hard edge failure (blackholed, no TCP close) -> next-hop gone, with BFD and without;
- a planned drain of one of two edges under a steady load of short connections;
- share of new connections per edge vs the weights;
- agent frozen (SIGSTOP of the agent process alone) -> route gone at the peer, FRR and
  BIRD, and the dead-man switch's own share (freeze -> the relay fired); SIGSTOP of the
  whole process group -> route gone (the router's hold timer, 3 s).

Every run is bounded (counts and deadlines); traffic stays inside the lab's namespaces.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bgp.bfd import BfdDaemon
from bgp.drain import drain
from bgp.exabgp import ExaBgpDriver
from bgp.policy import PolicyInputs, Serving, advertisements
from tests.support.netlab import (
    ROUTER_ASN,
    VIP,
    VIP6,
    NetLab,
    RouteMonitor,
    SpeakerProcess,
    edge_bgp_config,
    passive_opens,
)
from tests.support.procs import wait_for

RESULTS = Path("bench-results/bgp.json")
UPDATE_ROUNDS = 30
BFD_ROUNDS = 5
HOLD_ROUNDS = 3
SHARE_CONNECTIONS = 2000
DRAIN_LOAD_S = 8.0
FREEZE_ROUNDS = 7
GROUP_FREEZE_ROUNDS = 3


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (with few samples p99 is the maximum, said so plainly)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": round(percentile(values, 50) * 1000, 2),
        "p99_ms": round(percentile(values, 99) * 1000, 2),
        "max_ms": round(max(values) * 1000, 2) if values else math.nan,
    }


async def start_driver(lab: NetLab, index: int, **overrides: Any) -> ExaBgpDriver:
    edge = lab.edges[index]
    config = edge_bgp_config(edge, **overrides)
    driver = ExaBgpDriver(config, lab.workdir / f"edge{edge.index}", netns=edge.netns)
    await driver.start()
    await asyncio.wait_for(driver.wait_established(), 30)
    return driver


def healthy(driver: ExaBgpDriver, drain_flag: bool = False) -> Any:
    """The node's announcement at its capacity (leaving: while draining)."""
    serving = Serving.LEAVING if drain_flag else Serving.FULL
    inputs = PolicyInputs(serving, driver.config, driver.config.capacity_mbps)
    return advertisements(inputs)[0]


async def bench_verdict_to_update_and_fib(ipv6: bool = False) -> dict[str, Any]:
    """`ipv6`: VIP6/128 over the edge's IPv6 session (the same method as IPv4)."""
    lab = NetLab.create(1, ipv6=ipv6)
    assert lab.router
    monitor = RouteMonitor(lab.router.netns)
    vip = VIP6 if ipv6 else VIP
    if ipv6:
        edge = lab.edges[0]
        neighbor = {
            "peer_address": str(edge.router_address6),
            "peer_asn": ROUTER_ASN,
            "md5_password": edge.md5_password,
        }
        driver = await start_driver(lab, 0, prefixes=[f"{VIP6}/128"], neighbors=[neighbor])
    else:
        driver = await start_driver(lab, 0)
    sent_withdraw: list[float] = []
    sent_announce: list[float] = []
    fib_withdraw: list[float] = []
    fib_announce: list[float] = []
    try:
        for _ in range(UPDATE_ROUNDS):
            for announce in (True, False):
                monitor.drain_pending()
                started = time.monotonic()
                # The verdict: policy evaluation is part of the agent's share.
                desired = healthy(driver) if announce else frozenset()
                driver.set_desired(desired)
                await asyncio.wait_for(driver.wait_sent(), 10)
                sent = time.monotonic()

                def matches(line: str, announce: bool = announce) -> bool:
                    return vip in line and (("Deleted" in line) != announce)

                in_fib = await asyncio.to_thread(monitor.wait_line, matches, 10)
                (sent_announce if announce else sent_withdraw).append(sent - started)
                (fib_announce if announce else fib_withdraw).append(in_fib - started)
                await asyncio.sleep(0.05)
    finally:
        await driver.stop(withdraw_first=False)
        monitor.close()
        lab.close()
    return {
        "verdict_to_update_sent_withdraw": summary_ms(sent_withdraw),
        "verdict_to_update_sent_announce": summary_ms(sent_announce),
        "verdict_to_fib_route_gone": summary_ms(fib_withdraw),
        "verdict_to_fib_route_installed": summary_ms(fib_announce),
    }


async def bench_hard_failure(bfd: bool, rounds: int, timers_ms: int = 100) -> dict[str, Any]:
    lab = NetLab.create(2, bfd=bfd, bfd_timers=(timers_ms, timers_ms, 3))
    assert lab.router
    router = lab.router
    monitor = RouteMonitor(router.netns)
    bfd_settings = {
        "enabled": bfd,
        "transmit_interval_ms": timers_ms,
        "receive_interval_ms": timers_ms,
    }
    drivers = [await start_driver(lab, i, bfd=bfd_settings) for i in range(2)]
    daemons: list[BfdDaemon] = []
    if bfd:
        for driver, edge in zip(drivers, lab.edges, strict=True):

            def established(driver: ExaBgpDriver = driver) -> set[Any]:
                return {p for p, s in driver.neighbors().items() if s.state == "up"}

            daemon = BfdDaemon(
                driver.config, lab.workdir / f"bfd{edge.index}", established, netns=edge.netns
            )
            await daemon.start()
            daemons.append(daemon)
    gone: list[float] = []
    victim = lab.edges[0]

    def ready() -> bool:
        if len(router.fib_nexthops()) != 2:
            return False
        return not bfd or sum(p["status"] == "up" for p in router.bfd_peers()) == 2

    try:
        for driver in drivers:
            driver.set_desired(healthy(driver))
        for _ in range(rounds):
            await asyncio.to_thread(wait_for, ready, 60, 0.1, "both edges ready")
            monitor.drain_pending()
            started = time.monotonic()
            lab.blackhole(victim)

            def nexthop_gone(line: str) -> bool:
                return VIP in line and str(victim.address) not in line

            out = await asyncio.to_thread(monitor.wait_line, nexthop_gone, 30)
            gone.append(out - started)
            lab.unblackhole(victim)
    finally:
        for daemon in daemons:
            await daemon.stop()
        for driver in drivers:
            await driver.stop(withdraw_first=False)
        monitor.close()
        lab.close()
    return summary_ms(gone)


_LOAD_CLIENT = """
import json, socket, time
end = time.monotonic() + {seconds}
results = []
while time.monotonic() < end and len(results) < 20000:
    t = time.monotonic()
    time.sleep(0.002)  # a steady ~400 requests/s, not a flood
    try:
        c = socket.create_connection(("{vip}", 8080), timeout=1)
        who = c.recv(16).decode() or "empty"
        c.close()
    except OSError as exc:
        who = "failed:" + type(exc).__name__
    results.append((t, who))
print(json.dumps(results))
"""


async def bench_planned_drain() -> dict[str, Any]:
    lab = NetLab.create(2, client=True)
    drivers = [await start_driver(lab, i) for i in range(2)]
    draining = drivers[1]
    try:
        for driver in drivers:
            driver.set_desired(healthy(driver))
        assert lab.router
        router = lab.router
        await asyncio.to_thread(wait_for, lambda: len(router.fib_nexthops()) == 2, 30)
        await asyncio.to_thread(lab.start_name_servers)
        code = _LOAD_CLIENT.format(seconds=DRAIN_LOAD_S, vip=VIP)
        load = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", lab.client_netns, sys.executable, "-c", code,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await asyncio.sleep(1.5)
        edge_ns = lab.edges[1].netns

        async def announce_draining() -> None:
            draining.set_desired(healthy(draining, drain_flag=True))
            await asyncio.wait_for(draining.wait_sent(), 10)

        async def withdraw() -> None:
            draining.set_desired(frozenset())
            await asyncio.wait_for(draining.wait_sent(), 10)

        drain_started = time.monotonic()
        report = await drain(
            announce_draining,
            lambda: passive_opens(edge_ns),
            withdraw,
            quiet_rate_per_s=1.0,
            quiet_window_s=1.0,
            deadline_s=10.0,
            poll_interval_s=0.1,
        )
        drain_done = time.monotonic()
        stdout, _ = await asyncio.wait_for(load.communicate(), DRAIN_LOAD_S + 30)
    finally:
        for driver in drivers:
            await driver.stop(withdraw_first=False)
        lab.close()
    results: list[tuple[float, str]] = json.loads(stdout.decode())
    failed = [who for _, who in results if who.startswith("failed")]
    # Client clock and ours are the same monotonic clock (same host).
    after = [who for t, who in results if t > drain_done]
    return {
        "requests": len(results),
        "failed": len(failed),
        "failures": sorted(set(failed)),
        "drain_outcome": str(report.outcome),
        "drain_s": round(drain_done - drain_started, 2),
        "requests_after_drain": len(after),
        "served_by_drained_edge_after_drain": sum(1 for who in after if who == "2"),
    }


async def bench_share() -> dict[str, Any]:
    lab = NetLab.create(3, client=True)
    capacities = (300, 100, 200)
    drivers = [await start_driver(lab, i, capacity_mbps=c) for i, c in enumerate(capacities)]
    try:
        for driver in drivers:
            driver.set_desired(healthy(driver))
        assert lab.router
        router = lab.router
        await asyncio.to_thread(wait_for, lambda: len(router.fib_nexthops()) == 3, 30)
        weights = router.fib_nexthops()
        await asyncio.to_thread(lab.start_name_servers)
        counts = await asyncio.to_thread(lab.count_connections, SHARE_CONNECTIONS, 8080, 120)
    finally:
        for driver in drivers:
            await driver.stop(withdraw_first=False)
        lab.close()
    total = sum(v for k, v in counts.items() if k.isdigit())
    rows = {}
    for edge, capacity in zip(lab.edges, capacities, strict=True):
        rows[f"edge{edge.index}"] = {
            "target_share": round(capacity / sum(capacities), 3),
            "kernel_weight": weights.get(str(edge.address)),
            "measured_share": round(counts.get(str(edge.index), 0) / total, 3) if total else 0,
        }
    return {"connections": total, "failed": counts.get("failed", 0), "edges": rows}


def _withdrawn_line(line: str) -> bool:
    return VIP in line and line.startswith("Deleted")


def bench_freeze(router: str, rounds: int, whole_group: bool = False) -> dict[str, Any]:
    """SIGSTOP of the agent (or its whole process group) at a random phase of its beats
    -> the route leaves the router's kernel FIB. Long hold time for the agent-alone case,
    so nothing but the dead-man switch can explain the withdraw."""
    lab = NetLab.create(1, router=router)
    edge = lab.edges[0]
    hold = {"hold_time_s": 3 if whole_group else 30}
    monitor = RouteMonitor(lab.router_netns)
    gone: list[float] = []
    deadman_share: list[float] = []
    try:
        speaker = SpeakerProcess(lab, edge, "--serving", "full", neighbor_overrides=hold)
        for _ in range(rounds):
            wait_for(lambda: str(edge.address) in lab.fib_nexthops(), 60, what="route")
            time.sleep(0.5 + random.random() * 0.3)  # a random phase of the 150 ms beats
            monitor.drain_pending()
            stopped = time.monotonic()
            stop = os.killpg if whole_group else os.kill
            stop(speaker.pid, signal.SIGSTOP)
            try:
                gone.append(monitor.wait_line(_withdrawn_line, 30) - stopped)
            finally:
                stop(speaker.pid, signal.SIGCONT)
            if not whole_group:
                fired = speaker.status()["deadman"]["last"]
                deadman_share.append(fired["at_monotonic"] - stopped)
    finally:
        monitor.close()
        lab.close()
    result: dict[str, Any] = dict(summary_ms(gone))
    result["timeout_ms"] = speaker.config.deadman.timeout_ms
    if deadman_share:
        result["deadman_share"] = summary_ms(deadman_share)
    return result


def print_table(results: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str, str, str]] = []

    def add(name: str, stats: dict[str, Any], note: str = "") -> None:
        p50, p99, top = (f"{stats[k]:.1f}" for k in ("p50_ms", "p99_ms", "max_ms"))
        rows.append((name, p50, p99, top, note))

    if (u := results.get("updates")) is not None:
        n = u["verdict_to_update_sent_withdraw"]["n"]
        add("verdict -> UPDATE sent (withdraw)", u["verdict_to_update_sent_withdraw"], f"n={n}")
        add("verdict -> UPDATE sent (announce)", u["verdict_to_update_sent_announce"], f"n={n}")
        add("verdict -> route gone from FIB", u["verdict_to_fib_route_gone"], "incl. FRR+zebra")
        add("verdict -> route in FIB", u["verdict_to_fib_route_installed"], "incl. FRR+zebra")
    if (u6 := results.get("updates_ipv6")) is not None:
        n = u6["verdict_to_update_sent_withdraw"]["n"]
        add(
            "IPv6: verdict -> UPDATE sent (withdraw)",
            u6["verdict_to_update_sent_withdraw"],
            f"n={n}",
        )
        add(
            "IPv6: verdict -> route gone from FIB",
            u6["verdict_to_fib_route_gone"],
            "/128, IPv6 session",
        )
        add(
            "IPv6: verdict -> route in FIB",
            u6["verdict_to_fib_route_installed"],
            "/128, IPv6 session",
        )
    for key, label in (
        ("blackhole_bfd_50ms", "blackhole -> nexthop gone, BFD 50ms x3"),
        ("blackhole_bfd_100ms", "blackhole -> nexthop gone, BFD 100ms x3"),
        ("blackhole_no_bfd", "blackhole -> nexthop gone, no BFD"),
    ):
        if key in results:
            note = "hold time 3 s" if key.endswith("no_bfd") else "router+edge bfdd"
            add(label, results[key], f"n={results[key]['n']}, {note}")
    for key, label in (
        ("freeze_to_withdraw_frr", "agent SIGSTOP -> route gone, FRR"),
        ("freeze_to_withdraw_bird", "agent SIGSTOP -> route gone, BIRD"),
    ):
        if key in results:
            timeout = results[key].get("timeout_ms", "?")
            add(label, results[key], f"n={results[key]['n']}, dead-man timeout {timeout} ms")
            share = results[key]["deadman_share"]
            add("  of which freeze -> relay fired", share, "the dead-man's own share")
    if "group_freeze_to_withdraw_frr" in results:
        group = results["group_freeze_to_withdraw_frr"]
        add("process group SIGSTOP -> gone, FRR", group, f"n={group['n']}, hold time 3 s")
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'p50 ms':>9}  {'p99 ms':>9}  {'max ms':>9}  note")
    for name, p50, p99, top, note in rows:
        print(f"{name:<{width}}  {p50:>9}  {p99:>9}  {top:>9}  {note}")
    if (d := results.get("planned_drain")) is None:
        return
    print(
        f"\nplanned drain of 1 of 2 edges under load: {d['requests']} requests, "
        f"{d['failed']} failed {d['failures'] or ''}, drain {d['drain_outcome']} in "
        f"{d['drain_s']} s, {d['served_by_drained_edge_after_drain']} of "
        f"{d['requests_after_drain']} later requests reached the drained edge"
    )
    if (s := results.get("share")) is None:
        return
    print(f"\nshare of {s['connections']} new connections ({s['failed']} failed):")
    for name, row in s["edges"].items():
        print(
            f"  {name}: target {row['target_share']:.3f}  kernel weight "
            f"{row['kernel_weight']}  measured {row['measured_share']:.3f}  "
            f"(diff {row['measured_share'] - row['target_share']:+.3f})"
        )


def write_results(results: dict[str, Any]) -> dict[str, Any]:
    """Writes the keys measured now over those of an earlier run (others are kept)."""
    RESULTS.parent.mkdir(exist_ok=True)
    previous: dict[str, Any] = {}
    if RESULTS.exists():
        previous = json.loads(RESULTS.read_text())
    merged = previous | results
    RESULTS.write_text(json.dumps(merged, indent=2))
    return merged


async def freeze_results() -> dict[str, Any]:
    return {
        "freeze_to_withdraw_frr": await asyncio.to_thread(bench_freeze, "frr", FREEZE_ROUNDS),
        "freeze_to_withdraw_bird": await asyncio.to_thread(bench_freeze, "bird", FREEZE_ROUNDS),
        "group_freeze_to_withdraw_frr": await asyncio.to_thread(
            bench_freeze, "frr", GROUP_FREEZE_ROUNDS, True
        ),
    }


async def main() -> None:
    """`--freeze-only`: the freeze rows alone; `--updates-only`: the verdict rows alone,
    IPv4 and IPv6 (the other keys of bgp.json are kept)."""
    results: dict[str, Any] = {
        "machine_note": "2 shared cores; FRR 8.4.4, BIRD 2.0.12, ExaBGP 5.0.15"
    }
    args = sys.argv[1:]
    if "--freeze-only" not in args:
        results["updates"] = await bench_verdict_to_update_and_fib()
        results["updates_ipv6"] = await bench_verdict_to_update_and_fib(ipv6=True)
    if "--updates-only" in args:
        print_table(write_results(results))
        print(f"\nwritten to {RESULTS}")
        return
    if "--freeze-only" not in args:
        results["blackhole_bfd_50ms"] = await bench_hard_failure(True, BFD_ROUNDS, timers_ms=50)
        results["blackhole_bfd_100ms"] = await bench_hard_failure(True, BFD_ROUNDS, timers_ms=100)
        results["blackhole_no_bfd"] = await bench_hard_failure(False, HOLD_ROUNDS)
        results["planned_drain"] = await bench_planned_drain()
        results["share"] = await bench_share()
    results |= await freeze_results()
    print_table(write_results(results))
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    asyncio.run(main())
