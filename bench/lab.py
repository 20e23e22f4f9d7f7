"""`make bench-lab`: numbers from the docker-compose lab; a table, and bench-results/lab.json.

1. planned drain of a node, then of a whole site (GSLB drains) under a steady client load:
   requests sent and failed (target 0 failed).
2. node kill (docker kill) and node freeze (docker pause) with BFD, and freeze with BFD
   switched off on the site router's session (the hold timer decides): the time until the
   site router's FIB dropped the edge (polled), and the client-visible gap: how long after
   the event new requests were still hurt (failed, or slower than 0.5 s: a SYN lost to the
   dead edge costs a 1 s retransmission).
3. GSLB weight change -> the core router's kernel next-hop weights changed, measured from
   the API's acknowledgement to the line `ip monitor route` prints in the core; changes
   10 s apart. Beside it, the flap-budget hold-downs the edges counted during the changes
   (a weight change is no flap: bgp.flap passes it at once, so the target is 0) and the
   longest planned-change hold (flow sharing's barrier, bounded by its barrier_timeout).
4. measured share of new connections at 3:1 site weights vs the 75% target.
5. `lab up` time with the images built.

Everything runs inside the lab's containers; every load is bounded; the lab is taken down
at the end (dockerd stopped when this run started it).
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.timeline import draw
from contract.schemas import DrainKind
from deploy import lab

PICTURES = Path("bench-results/lab")


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "max": float("nan"), "n": 0}
    return {"p50": statistics.median(values), "max": max(values), "n": len(values)}


def _fib_lacks(router: str, address: str) -> bool:
    hops = lab.fib_nexthops(router)
    return bool(hops) and address not in hops


def _wait_gone(router: str, address: str, since: float, timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _fib_lacks(router, address):
            return time.time() - since
        time.sleep(0.01)
    raise lab.LabError(f"{address} still in {router}'s FIB after {timeout:.0f} s")


def _restore() -> None:
    lab.chaos_heal()
    lab.wait_for(_reset_gslb, 90, "the GSLB reset")
    lab.wait_for(lab.fleet_ready, 120, "the lab healthy again")


def _reset_gslb() -> bool:
    lab.undrain_all()
    view = lab.gslb_view()
    if abs(view["sites"].get("site-a", 0) - view["sites"].get("site-b", 0)) > 1:
        lab.set_site_weights({"site-a": 100, "site-b": 100})
    return True


def bench_drain(kind: DrainKind, name: str, router: str, address: str) -> dict[str, Any]:
    with lab.load(duration=10, workers=4) as running:
        time.sleep(3)
        issued = time.time()
        lab.drain(kind, name, "bench: planned drain")
        lab.wait_for(lambda: _fib_lacks(router, address), 30, f"{name} drained")
        gone = time.time()
        records = running.result()
    _restore()
    failed = [r for r in records if not r["ok"]]
    picture = draw(
        records,
        [(issued, "drain issued (GSHUT)"), (gone, f"gone from {router}'s FIB")],
        PICTURES / f"{kind}-drain.png",
        f"planned {kind} drain of {name}: requests per node",
    )
    return {
        "sent": len(records),
        "failed": len(failed),
        "errors": sorted({str(r.get("error")) for r in failed}),
        "timeline_png": str(picture),
    }


# A request slower than this counts as hurt (a lost SYN costs a 1 s retransmission).
HURT_S = 0.5


def new_request_gap(records: list[dict[str, Any]], event: float) -> float:
    """How long after the event new requests were still hurt (failed or slower than
    HURT_S): the start of the last hurt request, minus the event. Requests already in
    flight at the event are not counted: their fate is the broken connection's."""
    hurt = [
        r["start"]
        for r in records
        if r["start"] >= event and (not r["ok"] or r["end"] - r["start"] > HURT_S)
    ]
    return max(hurt, default=event) - event


def bench_outage(
    node: str, action: Callable[[str], None], reps: int, bfd: bool = True
) -> dict[str, Any]:
    site = lab.NODE_SITE[node]
    router = lab.SITE_ROUTER[site]
    address = lab.EDGE_ADDRESS[node]
    asn = {"site-a": 65010, "site-b": 65020}[site]
    fib_s: list[float] = []
    gaps: list[float] = []
    # How long the docker command itself took (kill, pause): part of fib_removed_s, and
    # on a loaded host the engine's share, not the network's.
    action_s: list[float] = []
    failed = 0
    picture = ""
    for rep in range(reps):
        if not bfd:
            _vtysh_bgp(router, asn, f"no neighbor {address} bfd")
        try:
            with lab.load(duration=8, workers=4) as running:
                time.sleep(2)
                event = time.time()
                action(node)
                action_s.append(time.time() - event)
                fib_s.append(_wait_gone(router, address, event))
                records = running.result()
        finally:
            if not bfd:
                _vtysh_bgp(router, asn, f"neighbor {address} bfd profile fast")
            _restore()
        gaps.append(new_request_gap(records, event))
        failed += sum(1 for r in records if not r["ok"])
        if rep == 0:
            what = f"{action.__name__.removeprefix('chaos_')} {node}{'' if bfd else ', no BFD'}"
            picture = str(
                draw(
                    records,
                    [(event, what), (event + fib_s[-1], f"gone from {router}'s FIB")],
                    PICTURES / f"{what.replace(' ', '-').replace(',', '')}.png",
                    f"{what}: requests per node",
                )
            )
    return {
        "fib_removed_s": _percentiles(fib_s),
        "docker_command_s": _percentiles(action_s),
        "gap_s": _percentiles(gaps),
        "failed": failed,
        "timeline_png": picture,
    }


def _vtysh_bgp(router: str, asn: int, command: str) -> None:
    lab.dexec(router, "vtysh", "-c", "configure terminal", "-c", f"router bgp {asn}", "-c", command)


_STATUS = (
    "import sys, urllib.request; "
    "sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:9901/status', timeout=3)"
    ".read().decode())"
)


def edge_status(node: str) -> dict[str, Any]:
    """One edge's /status, read inside its container (admin listens on loopback)."""
    out = lab.dexec(node, "/opt/venv/bin/python", "-c", _STATUS, timeout=10)
    status: dict[str, Any] = json.loads(out)
    return status


# A planned-change hold this long or longer is recorded with the flow-sharing peers'
# sequence numbers, to say whom it waited for.
SLOW_HOLD_S = 0.5


def _holds_now() -> dict[str, tuple[int, float, dict[str, Any]]]:
    """Per edge: flap-budget hold-downs so far, its last planned-change hold (s), and its
    flow-sharing peers (connected, live, sent and acknowledged sequence numbers)."""
    now: dict[str, tuple[int, float, dict[str, Any]]] = {}
    for node in lab.NODES:
        status = edge_status(node)
        bgp = status["bgp"]
        hold = bgp.get("planned_change_holds") or {}
        peers = {
            name: [p["connected"], p["live"], p["sent_seq"], p["acked_seq"]]
            for name, p in ((status.get("flowshare") or {}).get("peers") or {}).items()
        }
        now[node] = (int(bgp["flap_holddowns"]), float(hold.get("last_s", 0.0)), peers)
    return now


def bench_weight_change(reps: int) -> dict[str, Any]:
    """Each change: API acknowledged -> the core's kernel next-hop weights. A change not
    seen within 30 s counts as missed (not silently dropped). Beside each delay, what the
    edges report: flap-budget hold-downs during the change, and their longest planned-
    change hold (flow sharing's barrier), which is where a delay would come from."""
    monitor = subprocess.Popen(
        ["docker", "exec", lab.container("core"), "ip", "-o", "monitor", "route"],
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[tuple[float, str]] = queue.Queue()

    def read() -> None:
        assert monitor.stdout is not None
        for line in monitor.stdout:
            lines.put((time.time(), line))

    threading.Thread(target=read, daemon=True).start()
    delays: list[float] = []
    missed = 0
    holddowns = 0
    hold_max_s = 0.0
    slow_holds: list[dict[str, Any]] = []
    try:
        time.sleep(0.5)
        for index in range(reps):
            weights = {"site-a": 300, "site-b": 100} if index % 2 == 0 else {"site-a": 100}
            if index % 2:
                weights["site-b"] = 100
            want = "weight 75" if index % 2 == 0 else "weight 50"
            while not lines.empty():
                lines.get_nowait()
            before = _holds_now()
            lab.set_site_weights(weights)
            acked = time.time()
            deadline = time.monotonic() + 30
            seen = False
            while time.monotonic() < deadline and not seen:
                try:
                    stamp, line = lines.get(timeout=1)
                except queue.Empty:
                    continue
                if lab.VIP in line and want in line:
                    delays.append(stamp - acked)
                    seen = True
            missed += not seen
            after = _holds_now()
            holddowns += sum(after[n][0] - before[n][0] for n in lab.NODES)
            hold_max_s = max(hold_max_s, *(after[n][1] for n in lab.NODES))
            slow_holds += [
                {"change": index, "node": n, "hold_s": after[n][1], "peers": after[n][2]}
                for n in lab.NODES
                if after[n][1] >= SLOW_HOLD_S
            ]
            time.sleep(10.0)
    finally:
        monitor.kill()
        monitor.wait(10)
    return {
        **_percentiles(delays),
        "missed": missed,
        "flap_holddowns": holddowns,
        "planned_change_hold_max_s": hold_max_s,
        "slow_planned_change_holds": slow_holds,
    }


def bench_share() -> dict[str, Any]:
    lab.set_site_weights({"site-a": 300, "site-b": 100})
    lab.wait_for(lambda: abs(lab.site_shares_at_core()["site-a"] - 0.75) < 0.02, 60, "3:1")
    summary = lab.burst(1000, timeout=120)
    _restore()
    served = summary["total"] - summary["failed"]
    share = summary["by_site"].get("site-a", 0) / max(1, served)
    return {"target": 0.75, "measured": share, "connections": summary["total"]}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lab")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-results/lab.json"))
    args = parser.parse_args()
    results: dict[str, Any] = {}
    started_engine = lab.ensure_engine()
    try:
        lab.down()
        lab.allow_bridged_traffic()
        lab.build_images()
        begin = time.monotonic()
        lab.run(*lab.compose_command(), "up", "-d", "--no-build", timeout=300)
        lab.wait_ready()
        results["lab_up_s"] = time.monotonic() - begin
        results["node_drain"] = bench_drain(DrainKind.NODE, "edge-a1", "router-a", "198.18.10.11")
        results["site_drain"] = bench_drain(DrainKind.SITE, "site-a", "core", "198.18.1.2")
        results["node_kill"] = bench_outage("edge-b1", lab.chaos_kill, args.reps)
        results["node_freeze_bfd"] = bench_outage("edge-a2", lab.chaos_freeze, args.reps)
        results["node_freeze_no_bfd"] = bench_outage(
            "edge-a2", lab.chaos_freeze, args.reps, bfd=False
        )
        results["weight_change_to_core_fib_s"] = bench_weight_change(args.reps)
        results["site_share"] = bench_share()
    finally:
        lab.down(stop_engine=started_engine)
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def print_table(r: dict[str, Any]) -> None:
    def ms(p: dict[str, float]) -> str:
        return f"p50 {p['p50'] * 1000:6.0f} ms  max {p['max'] * 1000:6.0f} ms  (n={p['n']})"

    print()
    print(f"{'measure':42} result")
    for key, label in (("node_drain", "planned node drain"), ("site_drain", "planned site drain")):
        d = r[key]
        print(f"{label:42} {d['sent']} requests, {d['failed']} failed (target 0) {d['errors']}")
    for key, label in (
        ("node_kill", "node kill"),
        ("node_freeze_bfd", "node freeze, BFD 100 ms x 3"),
        ("node_freeze_no_bfd", "node freeze, no BFD (hold time 3 s)"),
    ):
        o = r[key]
        print(f"{label + ': FIB removed':42} {ms(o['fib_removed_s'])}")
        print(f"{label + ': of which the docker command':42} {ms(o['docker_command_s'])}")
        print(f"{label + ': new requests hurt for':42} {ms(o['gap_s'])}  failed {o['failed']}")
    w = r["weight_change_to_core_fib_s"]
    print(
        f"{'weight change -> core FIB weights':42} {ms(w)}  missed {w.get('missed', 0)}; "
        f"flap hold-downs {w.get('flap_holddowns')}; "
        f"longest planned-change hold {w.get('planned_change_hold_max_s', 0) * 1000:.0f} ms"
    )
    s = r["site_share"]
    print(
        f"{'site share at 3:1 (1000 new connections)':42} "
        f"{s['measured']:.1%} (target {s['target']:.0%} +- 5%)"
    )
    print(f"{'lab up (images built)':42} {r['lab_up_s']:.1f} s")
    print()
    print("timelines (PNG):")
    for key in ("node_drain", "site_drain", "node_kill", "node_freeze_bfd", "node_freeze_no_bfd"):
        print(f"  {key:20} {r[key]['timeline_png']}")


if __name__ == "__main__":
    raise SystemExit(main())
