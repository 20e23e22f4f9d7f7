"""End to end, in the docker-compose lab: site c's active-passive pair (edge-c1, edge-c2 on
one L2 segment, deploy/lab/edge-c*.yaml) with real client traffic from the client container
through the core and router-c to the group's VIP.

The active is killed (`docker kill`: the agent, its VIP guard and its namespace go at once)
or frozen (`docker pause`: its kernel keeps the address until the address's lifetime ends)
under client load: the standby takes the VIP, router-c's neighbour entry for the VIP moves
to the standby's MAC (gratuitous ARP), client requests succeed again and the GSLB shows the
standby active. A sampler on this host reads, every 20 ms, which node's kernel holds the
VIP (through each container's network namespace, a paused one's too): never two. Then the
node comes back; the gap the client saw is printed, never asserted (a benchmark's number).

Every load is bounded; every wait is a bounded poll; no assertion is about time.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deploy import lab
from tests.support.requires import unavailable

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600), pytest.mark.usefixtures("lab_ok")]

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
SAMPLE_INTERVAL_S = 0.02


def _container_pid(node: str) -> int:
    done = subprocess.run(
        ["docker", "inspect", "-f", "{{.State.Pid}}", lab.container(node)],
        capture_output=True, text=True, timeout=10, check=False,
    )  # fmt: skip
    return int(done.stdout.strip() or 0) if done.returncode == 0 else 0


def _holds_in(pid: int) -> bool:
    """Whether the kernel of process `pid`'s network namespace holds the VIP: a socket made
    there can bind to it (ip_nonlocal_bind is 0 in the lab's containers). From a throwaway
    thread, so no thread of ours stays in another namespace."""
    if pid <= 0:
        return False
    answer: list[bool | BaseException] = []

    def worker() -> None:
        try:
            target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        except FileNotFoundError:  # the container's processes are gone: so is its address
            answer.append(False)
            return
        try:
            if _libc.setns(target, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into pid {pid}'s network namespace")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                try:
                    probe.bind((lab.AP_VIP, 0))
                    answer.append(True)
                except OSError as error:
                    if error.errno != errno.EADDRNOTAVAIL:
                        raise
                    answer.append(False)
        except BaseException as error:
            answer.append(error)
        finally:
            os.close(target)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    if isinstance(answer[0], BaseException):
        raise answer[0]
    return answer[0]


class Sampler:
    """Which site-c nodes hold the VIP, every SAMPLE_INTERVAL_S, until closed (bounded by
    `limit_s`). Each sample reads the nodes one after the other and again in the reverse
    order: a node in both reads beside another in both held the VIP at the same time as it
    (a handover between two reads cannot look like two owners)."""

    def __init__(self, limit_s: float = 240.0) -> None:
        self.limit_s = limit_s
        self.samples: list[tuple[float, frozenset[str]]] = []
        self.dual: list[tuple[float, frozenset[str]]] = []
        self.errors: list[str] = []
        self._pids = {node: _container_pid(node) for node in lab.AP_NODES}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self, order: tuple[str, ...]) -> frozenset[str]:
        return frozenset(node for node in order if _holds_in(self._pids[node]))

    def _run(self) -> None:
        end = time.monotonic() + self.limit_s
        count = 0
        while not self._stop.is_set() and time.monotonic() < end:
            if count % 10 == 0:  # a restarted container has a new pid
                self._pids = {node: _container_pid(node) for node in lab.AP_NODES}
            count += 1
            try:
                forward = self._read(lab.AP_NODES)
                if len(forward) > 1 and len(forward & self._read(lab.AP_NODES[::-1])) > 1:
                    self.dual.append((time.time(), forward))
            except OSError as error:
                self.errors.append(str(error))
                continue
            self.samples.append((time.time(), forward))
            time.sleep(SAMPLE_INTERVAL_S)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def holders(self) -> frozenset[str] | None:
        return self.samples[-1][1] if self.samples else None

    def wait_holders(self, expected: set[str], timeout: float, what: str) -> float:
        """Until the last sample shows exactly `expected`; the wall clock of that sample."""
        lab.wait_for(lambda: self.holders() == frozenset(expected), timeout, what, interval=0.02)
        return self.samples[-1][0]

    def first_held_by(self, node: str, after: float) -> float | None:
        return next((t for t, held in self.samples if t >= after and node in held), None)


def _edgectl_groups(config: Path) -> list[dict[str, Any]]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EDGECTL_")}
    environ["EDGECTL_CONFIG"] = str(config)
    edgectl = str(Path(sys.executable).parent / "edgectl")
    done = subprocess.run(
        [edgectl, "status", "--json"],
        capture_output=True, text=True, env=environ, timeout=30, check=True,
    )  # fmt: skip
    return list(json.loads(done.stdout)["groups"])


def _group_active(config: Path) -> list[str] | None:
    groups = {g["name"]: g for g in _edgectl_groups(config)}
    group = groups.get(lab.AP_GROUP)
    return None if group is None else list(group["active"])


def _logs(node: str) -> str:
    done = subprocess.run(
        ["docker", "logs", "--tail", "60", lab.container(node)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return done.stdout + done.stderr


def _gap(records: list[dict[str, Any]], event: float) -> tuple[float, int]:
    """The longest time the client went without a successful response around `event` (the
    largest interval between two successive successful responses, from the last one before
    it on), and how many requests failed."""
    ends = sorted(r["end"] for r in records if r["ok"])
    last_before = max((t for t in ends if t <= event), default=event)
    window = [t for t in ends if t >= last_before]
    gap = max((b - a for a, b in itertools.pairwise(window)), default=0.0)
    return gap, sum(1 for r in records if not r["ok"])


CHAOS: dict[str, Callable[[str], None]] = {"kill": lab.chaos_kill, "freeze": lab.chaos_freeze}


@pytest.mark.parametrize("fault", sorted(CHAOS))
def test_the_standby_takes_the_vip_and_the_client_follows(fault: str, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        unavailable("the VIP sampler enters the containers' network namespaces: needs root")
    try:
        _failover(fault, tmp_path)
    except BaseException:
        for node in lab.AP_NODES:
            print(f"--- {node}: its group's transitions, then its log\n{_transitions(node)}")
            print(_logs(node))
        raise
    for node in lab.AP_NODES:
        print(f"{node}: {_transitions(node)}")


def _one_owner() -> str:
    """The one node holding the VIP once site c is settled (bounded)."""
    found: list[str] = []

    def problem() -> str | None:
        if (wrong := lab.ap_problem()) is not None:
            return wrong
        found[:] = lab.vip_holders()
        return None if len(found) == 1 else f"holders {found}"

    lab.wait_until_none(problem, 60, "site-c with one VIP owner")
    return found[0]


def _transitions(node: str) -> str:
    """The node's last transitions of its group (its /status, admin on its loopback)."""
    fetch = (
        "import json, urllib.request; d = json.load(urllib.request.urlopen("
        "'http://127.0.0.1:9901/status', timeout=5))['vip_group']; "
        "print(d['claims_total'], [(round(t['at'] % 1000, 2), t['action'], t['reason'])"
        " for t in d['transitions'][-8:]])"
    )
    try:
        return lab.dexec(node, "python", "-c", fetch, check=False).strip()
    except (lab.LabError, subprocess.TimeoutExpired) as error:
        return f"({error})"


def _failover(fault: str, tmp_path: Path) -> None:
    active = _one_owner()
    (standby,) = set(lab.AP_NODES) - {active}
    macs = {node: lab.segment_mac(node) for node in lab.AP_NODES}
    assert macs[active] != macs[standby]
    config = lab.write_context(tmp_path / "edgectl.yaml")
    lab.wait_for(lambda: _group_active(config) == [active], 30, f"edgectl: {active} active")

    # Client traffic reaches the active through the core and router-c.
    routers = ("core", lab.AP_ROUTER)
    before = {router: lab.forwarded_packets(router) for router in routers}
    burst = lab.ap_burst(20)
    delta = {router: lab.forwarded_packets(router) - before[router] for router in routers}
    print(f"\nclient -> {lab.AP_VIP}: {burst}; packets forwarded {delta}")
    assert burst["failed"] == 0 and burst["by_node"] == {active: 20}
    assert len(burst["by_backend"]) == 2
    assert all(count >= 4 * 20 for count in delta.values()), delta
    assert lab.router_neighbour().get("lladdr") == macs[active]

    with Sampler() as sampler:
        lab.wait_for(lambda: sampler.holders() is not None, 10, "the first sample")
        # The sampler and the containers' own `ip addr` agree before anything happens.
        assert sampler.holders() == frozenset({active}), (sampler.holders(), sampler.errors)
        load = lab.ApLoad(duration=20, per_request=0.5, pause=0.02)
        time.sleep(2.0)
        fault_at = time.time()
        CHAOS[fault](active)
        try:
            moved_at = sampler.wait_holders({standby}, 60, f"{standby} holding the VIP")
            lab.wait_for(
                lambda: lab.router_neighbour().get("lladdr") == macs[standby],
                30,
                f"router-c's neighbour entry for the VIP on {standby}'s MAC",
            )
            neighbour_at = time.time()
        except lab.LabError:
            print(_logs(standby))
            raise
        records = load.result()
        # Requests succeed again, all of them on the standby (bounded).
        lab.wait_for(lambda: _all_on(standby), 60, f"client requests served by {standby}")
        lab.wait_for(lambda: _group_active(config) == [standby], 30, f"edgectl: {standby} active")
        groups = {g["name"]: g for g in _edgectl_groups(config)}
        promoted = next(m for m in groups[lab.AP_GROUP]["members"] if m["node"] == standby)
        print(f"edgectl: group {lab.AP_GROUP}: {groups[lab.AP_GROUP]['active']}, {promoted}")
        assert promoted["fencing_token"] is not None

        gap, failed = _gap(records, fault_at)
        first = sampler.first_held_by(standby, fault_at)
        print(
            f"{fault} {active}: {standby} held the VIP {moved_at - fault_at:.2f} s after it "
            f"(first sample {-1 if first is None else first - fault_at:.2f} s), router-c's "
            f"entry on its MAC by {neighbour_at - fault_at:.2f} s; client: {len(records)} "
            f"requests, {failed} failed, longest time without a response {gap:.2f} s"
        )
        served = {r["node"] for r in records if r["ok"] and r["start"] < fault_at}
        assert served == {active}
        # The node comes back: it must not take the VIP back silently. With preemption
        # (edge-c1 outranks edge-c2) edge-c1 ends up the owner, and router-c's entry for the
        # VIP follows it before any client packet asks (a gratuitous ARP moved it).
        lab.chaos_heal()
        owner = "edge-c1"
        sampler.wait_holders({owner}, 90, f"{owner} holding the VIP after the heal")
        lab.wait_until_none(lab.ap_problem, 90, "site-c healthy after the heal")
        macs = {node: lab.segment_mac(node) for node in lab.AP_NODES}
        lab.wait_for(
            lambda: lab.router_neighbour().get("lladdr") == macs[owner],
            30,
            f"router-c's neighbour entry on {owner}'s MAC without client traffic",
        )
        after = lab.ap_burst(10)
        print(f"after the heal: {after}; neighbour {lab.router_neighbour()}")
        assert after["failed"] == 0 and after["by_node"] == {owner: 10}
        time.sleep(1.0)  # a few more samples of the settled pair
    print(
        f"sampler: {len(sampler.samples)} samples every {SAMPLE_INTERVAL_S * 1000:.0f} ms, "
        f"{len(sampler.dual)} with two owners, {len(sampler.errors)} errors"
    )
    assert sampler.dual == [], sampler.dual[:5]
    assert sampler.errors == []
    assert any(held == frozenset({standby}) for _, held in sampler.samples)


def _all_on(node: str) -> bool:
    burst = lab.ap_burst(10)
    return burst["failed"] == 0 and burst["by_node"] == {node: 10}
