"""`make bench-ap`: active-passive failover as a client sees it, against keepalived 2.2.

The same L2 segment of namespaces as the tests (tests/support/vip_lab.py): a client, two
nodes, a backend, and for the fenced runs the real 3-member etcd. On every node the same
agent serves the client through the backend; what differs is who moves the VIP:
- `anycast-edge`: `anycast-edge run` (the agent with its vip_group extension), fenced by etcd,
  with an ARP monitor on the segment's gateway (the bridge's address);
- `anycast-edge-unfenced`: the same without a store (VRRP-like);
- `keepalived`: the plain agent plus keepalived 2.2 with unicast VRRP and its default 1 s
  adverts (the reference, in the same run).

Faults on the active node, n >= 5 each: `kill` (SIGKILL of the node's processes: the
agent, and keepalived where it runs), `freeze` (SIGSTOP of the same for FREEZE_S, then
SIGCONT) and `link_cut` (its link blackholed both ways for CUT_S). The client sends a new
HTTP request every 20 ms (100 ms timeout); the gap is the longest time between two answered
requests from the fault on. An observer samples every 10 ms which kernels hold the VIP:
`dual_owner_samples` counts samples with two. `sticky_kept_share`: 200 client keys
(in a header, three backends balanced round robin with `pool.sticky`: only the active's
session table knows a key's backend) and the share that kept their backend across a kill
failover, once the heartbeats carried the table to the standby. Every wait is bounded;
traffic stays inside the namespaces.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.support.etcd_cluster import LocalEtcdCluster
from tests.support.netlab import pids_running
from tests.support.procs import run, wait_for
from tests.support.vip_lab import VIP, VIP_CIDR, ApLab, Node, Observer

RESULTS = Path("bench-results/ap.json")
RUNS = int(os.environ.get("AP_BENCH_N", "5"))
FREEZE_S = 6.0
CUT_S = 6.0
PROBE_EVERY_S = 0.02
PROBE_TIMEOUT_S = 0.1
SYSTEMS = ("anycast-edge", "anycast-edge-unfenced", "keepalived")
SCENARIOS = ("kill", "freeze", "link_cut")
STICKY_KEYS = 200

_KEEPALIVED_CONF = """
global_defs {{
  router_id {name}
}}
vrrp_instance g1 {{
  state BACKUP
  interface {interface}
  virtual_router_id 51
  priority {priority}
  advert_int 1
  unicast_src_ip {address}
  unicast_peer {{
    {peer}
  }}
  virtual_ipaddress {{
    {vip} dev {interface}
  }}
}}
"""


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


class Prober:
    """New HTTP requests from the client every PROBE_EVERY_S: (time answered, node)."""

    def __init__(self, lab: ApLab) -> None:
        self.lab = lab
        self.answers: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            with contextlib.suppress(OSError, ValueError):
                node = self.lab.client_get(timeout=PROBE_TIMEOUT_S)
                self.answers.append((time.monotonic(), node))
            time.sleep(max(0.0, PROBE_EVERY_S - (time.monotonic() - began)))

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def gap_after(self, fault: float) -> float:
        """Longest time without an answer, from the last answer before `fault` on."""
        times = [t for t, _ in self.answers]
        before = [t for t in times if t < fault]
        after = [t for t in times if t >= fault]
        if not before or not after:
            return math.inf
        points = [before[-1], *after]
        return max(b - a for a, b in itertools.pairwise(points))

    def served_by_since(self, node: str, since: float) -> bool:
        return any(t >= since and n == node for t, n in self.answers)


class Bench:
    def __init__(self, lab: ApLab) -> None:
        self.lab = lab
        self.n1, self.n2 = lab.nodes
        self.system = ""
        self.services: dict[str, Any] = {}
        self.restarts = 0  # of this system, by settle()

    # -- starting a system ------------------------------------------------------------
    def _priority(self, node: Node) -> int:
        return 200 if node is self.n1 else 100

    def start_node(self, node: Node) -> None:
        lab = self.lab
        if self.system == "keepalived":
            config = lab.node_config(node, self._priority(node))
            del config["vip_group"]
            path = lab.workdir / f"{node.name}-plain.yaml"
            path.write_text(yaml.safe_dump(config))
            agent = Path(sys.executable).parent / "anycast-edge"
            self.services[node.name] = lab.spawn(
                ["ip", "netns", "exec", node.netns, str(agent), "run", "-c", str(path)],
                stdout=(lab.workdir / f"{node.name}-agent.log").open("ab"),
            )
            peer = self.n2 if node is self.n1 else self.n1
            conf = lab.workdir / f"{node.name}-keepalived.conf"
            conf.write_text(
                _KEEPALIVED_CONF.format(
                    name=node.name,
                    interface=node.veth,
                    priority=self._priority(node),
                    address=node.address,
                    peer=peer.address,
                    vip=VIP_CIDR,
                )
            )
            for stale in lab.workdir.glob(f"{node.name}-k*.pid"):  # a kill -9 leaves them
                stale.unlink()
            # fmt: off
            lab.spawn(
                [
                    "ip", "netns", "exec", node.netns, "keepalived", "-n", "-l", "-P",
                    "-f", str(conf),
                    "-p", str(lab.workdir / f"{node.name}-k.pid"),
                    "-r", str(lab.workdir / f"{node.name}-kv.pid"),
                ],
                stdout=(lab.workdir / f"{node.name}-keepalived.log").open("ab"),
            )
            # fmt: on
        else:
            etcd = lab.etcd_urls if self.system == "anycast-edge" else None
            config = lab.node_config(node, self._priority(node), etcd=etcd)
            lab.start_node(node, config)

    def node_pids(self, node: Node) -> list[int]:
        if self.system == "keepalived":
            pids = pids_running(node.netns, b"keepalived")
            service = self.services.get(node.name)
            return [*pids, *([service.pid] if service and service.poll() is None else [])]
        assert node.process is not None
        return [node.process.pid] if node.process.poll() is None else []

    def stop_node(self, node: Node) -> None:
        for pid in self.node_pids(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not self.node_pids(node), 10, what=f"{node.name} stopped")
        # keepalived leaves the VIP behind after a kill (the number is in the results):
        # clean it up so the next run starts from a clean segment
        run("ip", "-n", node.netns, "addr", "del", VIP_CIDR, "dev", node.veth, check=False)

    def steady(self, timeout: float = 30.0) -> None:
        """n1 the only owner, the client served by it (failback done)."""

        def ok() -> bool:
            if not (self.lab.holds_vip(self.n1) and not self.lab.holds_vip(self.n2)):
                return False
            with contextlib.suppress(OSError, ValueError):
                return self.lab.client_get(timeout=0.5) == "n1"
            return False

        wait_for(ok, timeout, 0.1, what=f"{self.system}: n1 the only owner, serving")
        time.sleep(1.0 if self.system != "keepalived" else 2.5)  # settle (adverts)

    # -- one fault ---------------------------------------------------------------------
    def settle(self) -> None:
        """steady(); a system that does not get back to one owner by itself (keepalived
        after a healed link cut, seen here) is restarted, and that is counted."""
        try:
            self.steady()
        except TimeoutError:
            print(f"  {self.system}: no single owner 30 s after the last fault: restarting it")
            self.restarts += 1
            for node in (self.n2, self.n1):
                self.stop_node(node)
            self.start_node(self.n1)
            time.sleep(0.5)
            self.start_node(self.n2)
            self.steady()

    def run_once(self, scenario: str) -> tuple[float, int]:
        lab, n1 = self.lab, self.n1
        self.settle()
        with Observer(lab) as observer, Prober(lab) as prober:
            time.sleep(0.5)
            fault = time.monotonic()
            if scenario == "kill":
                for pid in self.node_pids(n1):
                    os.kill(pid, signal.SIGKILL)
                wait_for(lambda: prober.served_by_since("n2", fault), 20, 0.02, what="n2 serving")
                time.sleep(1.0)
            elif scenario == "freeze":
                pids = self.node_pids(n1)
                for pid in pids:
                    os.kill(pid, signal.SIGSTOP)
                wait_for(lambda: prober.served_by_since("n2", fault), 20, 0.02, what="n2 serving")
                time.sleep(max(0.0, FREEZE_S - (time.monotonic() - fault)))
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)
                time.sleep(1.0)
            else:
                lab.cut_link(n1)
                wait_for(lambda: prober.served_by_since("n2", fault), 20, 0.02, what="n2 serving")
                time.sleep(max(0.0, CUT_S - (time.monotonic() - fault)))
                lab.heal_link(n1)
                time.sleep(1.0)
        gap = prober.gap_after(fault)
        dual = observer.dual_owner_samples()
        if scenario == "kill":
            self.stop_node(n1)
            self.start_node(n1)
        return gap, dual

    def scenario(self, name: str) -> dict[str, Any]:
        gaps, duals = [], 0
        self.restarts = 0
        for _ in range(RUNS):
            gap, dual = self.run_once(name)
            gaps.append(gap)
            duals += dual
        print(f"  {self.system:<22} {name:<9} gaps ms: {[round(g * 1000) for g in gaps]}")
        return {
            "name": name,
            "system": self.system,
            "gap_ms": {
                "p50": round(percentile(gaps, 50) * 1000, 1),
                "max": round(max(gaps) * 1000, 1),
            },
            "n": len(gaps),
            "dual_owner_samples": duals,
            # restarts needed to get back to one owner before a run (see Bench.settle)
            "restarts": self.restarts,
        }

    def start(self, system: str) -> None:
        self.system = system
        self.lab.arp_monitor = system != "keepalived"
        self.start_node(self.n1)
        time.sleep(0.5)
        self.start_node(self.n2)

    def stop(self) -> None:
        for node in self.lab.nodes:
            self.stop_node(node)
        self.services.clear()


def sticky_share(lab: ApLab, bench: Bench) -> float:
    """Keys in a header, balanced round robin with `pool.sticky`: the share that kept their
    backend across a kill failover. Which backend a key has is known only to the active's
    session table (its turns gave it), which the heartbeats carry to the standby."""
    keys = [f"client-{i}" for i in range(STICKY_KEYS)]

    def backends() -> dict[str, str]:
        return {key: lab.client_get_backend(key) for key in keys}

    bench.settle()
    before = backends()
    wait_for(
        lambda: (lab.vip_status(bench.n2).get("sessions") or 0) >= STICKY_KEYS,
        10,
        0.1,
        what="the session table on the standby",
    )
    for pid in bench.node_pids(bench.n1):
        os.kill(pid, signal.SIGKILL)
    lab.wait_role(bench.n2, "active", 20)
    wait_for(lambda: lab.client_get(timeout=0.5) == "n2", 10, what="n2 serving")
    after = backends()
    bench.stop_node(bench.n1)
    bench.start_node(bench.n1)
    return sum(1 for key in keys if before[key] == after[key]) / len(keys)


def print_table(results: dict[str, Any]) -> None:
    print(f"\n{'scenario':<10} {'system':<22} {'gap p50 ms':>11} {'gap max ms':>11} {'n':>3}  dual")
    for row in results["scenarios"]:
        g = row["gap_ms"]
        print(
            f"{row['name']:<10} {row['system']:<22} {g['p50']:>11} {g['max']:>11}"
            f" {row['n']:>3}  {row['dual_owner_samples']}"
        )
    print(f"\nsticky_kept_share: {results['sticky_kept_share']}")
    print(
        f"probe: a new HTTP request every {PROBE_EVERY_S * 1000:.0f} ms "
        f"({PROBE_TIMEOUT_S * 1000:.0f} ms timeout); observer every 10 ms"
    )


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("bench-ap: needs root (network namespaces)")
    wanted = [s for s in os.environ.get("AP_BENCH_SYSTEMS", ",".join(SYSTEMS)).split(",") if s]
    results: dict[str, Any] = {"scenarios": [], "runs_per_scenario": RUNS}
    with tempfile.TemporaryDirectory(prefix="ae-bench-ap-") as tmp:
        cluster = LocalEtcdCluster(Path(tmp) / "etcd")
        cluster.start()
        try:
            lab = ApLab.create_segment(
                2,
                cluster.client_urls,
                backends=3,
                sticky_header="X-Key",
                sticky_algorithm="round_robin",
            )
            try:
                bench = Bench(lab)
                for system in wanted:
                    print(f"{system}:")
                    bench.start(system)
                    try:
                        for scenario in SCENARIOS:
                            results["scenarios"].append(bench.scenario(scenario))
                        if system == "anycast-edge":
                            results["sticky_kept_share"] = sticky_share(lab, bench)
                    except BaseException:
                        for log in sorted(lab.workdir.glob("*.log")):
                            print(f"--- {log.name}", log.read_text(errors="replace")[-1500:])
                        raise
                    finally:
                        bench.stop()
            finally:
                lab.close()
        finally:
            cluster.stop()
    results.setdefault("sticky_kept_share", None)
    results["keepalived"] = "2.2 (Debian), unicast VRRP, advert_int 1"
    results["vip"] = VIP
    print_table(results)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
