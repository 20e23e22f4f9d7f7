"""Active-passive mode announced by BGP (`vip_group.announce: bgp`) against real FRR.

Two edges in front of one FRR router (tests/support/netlab.py, iBGP so the router compares
their MEDs), the VIP on each edge's loopback, each running the real agent with a `bgp:`
section and a `vip_group:` whose heartbeats cross the router. Both announce the VIP; the
standby's MED carries the penalty, so the router's best path and its FIB go to the active.
A kill of the active leaves the standby's route, which becomes the best at once and then
loses its penalty when the standby is elected.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.netlab import VIP, Edge, NetLab, admin_status, edge_bgp_config, netns_command
from tests.support.procs import ROOT, wait_for

pytestmark = [pytest.mark.netns, pytest.mark.needs("root", "frr"), pytest.mark.timeout(180)]

BACKEND_PORT = 9001
KEY = "bgp-mode-test-key-0123456789abcdef"
PENALTY = 100


@pytest.fixture
def lab() -> Iterator[NetLab]:
    built = NetLab.create(2, ibgp=True)
    try:
        yield built
    finally:
        built.close()


def start_member(lab: NetLab, edge: Edge, priority: int) -> Any:
    lab.spawn(
        netns_command(
            edge.netns, sys.executable, "-m", "deploy.backend.named_backend",
            "--port", str(BACKEND_PORT), "--name", f"b{edge.index}",
        ),
        cwd=ROOT,
    )  # fmt: skip
    bgp = edge_bgp_config(edge, runtime_dir=str(lab.workdir / f"run{edge.index}"))
    bgp_data = bgp.model_dump(mode="json")
    bgp_data["neighbors"][0]["md5_password"] = edge.md5_password  # dumped as ********
    node = {
        "node": {"name": f"n{edge.index}", "site": "lab"},
        "listeners": [{"name": "tcp", "kind": "tcp", "address": VIP, "port": 8080}],
        "backends": [{"name": "b1", "address": "127.0.0.1", "port": BACKEND_PORT}],
        "health": {"active": {"kind": "tcp", "interval": 0.2, "timeout": 0.2, "rise": 1}},
        "bgp": bgp_data,
        "vip_group": {
            "name": "g1",
            "interface": edge.veth,
            "vip": f"{VIP}/32",
            "priority": priority,
            "members": [{"id": f"n{e.index}", "address": str(e.address)} for e in lab.edges],
            "key": KEY,
            "announce": "bgp",
            "standby_med_penalty": PENALTY,
        },
    }
    path = lab.workdir / f"n{edge.index}.yaml"
    path.write_text(yaml.safe_dump(node))
    agent = str(Path(sys.executable).parent / "anycast-edge")
    log = (lab.workdir / f"n{edge.index}.log").open("wb")
    return lab.spawn(netns_command(edge.netns, agent, "run", "--config", str(path)), stdout=log)


def meds(lab: NetLab) -> dict[str, int]:
    """The router's paths for the VIP: next hop -> MED."""
    assert lab.router is not None
    paths = lab.router.bgp_route_detail(f"{VIP}/32").get("paths", [])
    return {p["nexthops"][0]["ip"]: int(p.get("metric", 0)) for p in paths}


def role(edge: Edge) -> str:
    group: dict[str, Any] = admin_status(edge.netns)["vip_group"]
    return str(group["role"])


def test_the_standby_announces_with_a_worse_med_and_takes_over_on_a_kill(lab: NetLab) -> None:
    e1, e2 = lab.edges
    assert lab.router is not None
    first = start_member(lab, e1, 200)
    start_member(lab, e2, 100)
    a1, a2 = str(e1.address), str(e2.address)
    try:
        wait_for(lambda: meds(lab) == {a1: 0, a2: PENALTY}, 40, what="both paths, n2's penalized")
    except TimeoutError:
        print("meds", meds(lab))
        print(lab.router.vtysh("show bgp ipv4 unicast"))
        for e in lab.edges:
            print((lab.workdir / f"n{e.index}.log").read_text()[-2500:])
        raise
    assert role(e1) == "active" and role(e2) == "standby"
    # the router's FIB follows the active alone (a worse MED is no equal-cost path)
    wait_for(lambda: set(lab.router.fib_nexthops(VIP)) == {a1}, 10, what="FIB via n1")  # type: ignore[union-attr]

    os.kill(first.pid, signal.SIGKILL)  # ExaBGP goes with it (parent-death signal)
    wait_for(lambda: set(lab.router.fib_nexthops(VIP)) == {a2}, 20, what="FIB via n2")  # type: ignore[union-attr]
    wait_for(lambda: role(e2) == "active", 10, what="n2 elected")
    wait_for(lambda: meds(lab) == {a2: 0}, 10, what="n2's penalty gone once active")
