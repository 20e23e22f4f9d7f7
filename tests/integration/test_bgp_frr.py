"""bgp against the real parts: FRR 8.4 (zebra, bgpd, bfdd) and ExaBGP 5 in namespaces.

Every test builds its own lab (names `ae-<random>-...`) and always tears it down. Waits
poll with generous bounds; nothing asserts on a timing (timings are in `make bench-bgp`).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from bgp.bfd import BfdDaemon
from bgp.config import BgpConfig
from bgp.drain import DrainOutcome, drain
from bgp.exabgp import ExaBgpDriver
from bgp.policy import PolicyInputs, Serving, advertisements
from bgp.speaker import BgpSpeaker
from tests.support.bgp_checks import (
    RouterView,
    freeze_agent_alone,
    freeze_whole_group,
    frr_view,
    kill_agent,
    require_router,
    stop_sends_cease_with_reason,
    wrong_md5_is_no_session,
)
from tests.support.netlab import (
    MULTIHOP_TTL,
    ROUTER_ASN,
    ROUTER_LOOPBACK,
    VIP,
    Edge,
    NetLab,
    SpeakerProcess,
    netns_command,
)
from tests.support.netlab import edge_bgp_config as edge_config
from tests.support.procs import run, wait_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.needs("root", "frr"),
    pytest.mark.timeout(120),
]

VIP_PREFIX = f"{VIP}/32"


@dataclass
class Speaker:
    """One edge's BGP side, run in this process: driver (+ bfdd) in the edge namespace."""

    edge: Edge
    config: BgpConfig
    driver: ExaBgpDriver
    bfd: BfdDaemon | None = None

    async def announce(self, serving: Serving, weight: float = 1.0) -> None:
        """Announce at `weight` times the configured capacity."""
        desired, _ = advertisements(
            PolicyInputs(serving, self.config, weight * self.config.capacity_mbps)
        )
        self.driver.set_desired(desired)
        await asyncio.wait_for(self.driver.wait_sent(), 15)

    def established(self) -> set[Any]:
        return {peer for peer, s in self.driver.neighbors().items() if s.state == "up"}


async def until(predicate: Callable[[], bool], what: str, bound_s: float = 20) -> None:
    """Poll `predicate` off the event loop (vtysh blocks), so the drivers keep running."""
    await asyncio.to_thread(wait_for, predicate, bound_s, 0.05, what)


@pytest.fixture
def labs() -> Iterator[list[NetLab]]:
    require_router("frr")
    made: list[NetLab] = []
    yield made
    for lab in made:
        lab.close()


@pytest.fixture
async def speakers() -> AsyncIterator[list[Speaker]]:
    started: list[Speaker] = []
    yield started
    for speaker in started:
        if speaker.bfd:
            await speaker.bfd.stop()
        await speaker.driver.stop(withdraw_first=False)


def make_lab(labs: list[NetLab], edge_count: int, **kwargs: Any) -> NetLab:
    lab = NetLab.create(edge_count, **kwargs)
    labs.append(lab)
    return lab


async def start_speaker(
    lab: NetLab, edge: Edge, speakers: list[Speaker], **overrides: Any
) -> Speaker:
    config = edge_config(edge, **overrides)
    workdir = lab.workdir / f"edge{edge.index}"
    driver = ExaBgpDriver(config, workdir, netns=edge.netns, restart_backoff_s=(0.2, 2.0))
    speaker = Speaker(edge, config, driver)
    speakers.append(speaker)
    await driver.start()
    if config.bfd.enabled:
        speaker.bfd = BfdDaemon(
            config,
            workdir / "bfd",
            speaker.established,
            netns=edge.netns,
            report_after_s=5,
            repair_after_s=8,
        )
        await speaker.bfd.start()
    await asyncio.wait_for(driver.wait_established(), 30)
    return speaker


def paths(lab: NetLab, prefix: str = VIP_PREFIX) -> list[dict[str, Any]]:
    assert lab.router
    found: list[dict[str, Any]] = lab.router.bgp_route_detail(prefix).get("paths", [])
    return found


def path_from(lab: NetLab, edge: Edge) -> dict[str, Any] | None:
    for path in paths(lab):
        if path.get("peer", {}).get("peerId") == str(edge.address):
            return path
    return None


def fib(lab: NetLab) -> dict[str, int]:
    assert lab.router
    return lab.router.fib_nexthops(VIP)


# -- announce / withdraw ------------------------------------------------------------------


async def test_announces_only_when_healthy_and_withdraws_when_not(
    labs: list[NetLab], speakers: list[Speaker]
) -> None:
    lab = make_lab(labs, 1)
    (edge,) = lab.edges
    speaker = await start_speaker(lab, edge, speakers)
    nexthop = str(edge.address)

    await speaker.announce(Serving.NOT_READY)  # fail closed: nothing yet
    await asyncio.sleep(0.5)
    assert fib(lab) == {} and paths(lab) == []

    await speaker.announce(Serving.FULL)
    await until(lambda: nexthop in fib(lab), "route in the router's FIB")

    await speaker.announce(Serving.STOPPED)
    await until(lambda: fib(lab) == {} and paths(lab) == [], "route gone from RIB and FIB")

    await speaker.announce(Serving.REDUCED)
    await until(lambda: nexthop in fib(lab), "route back while degraded")
    await speaker.announce(Serving.FULL, weight=0.0)
    await until(lambda: fib(lab) == {}, "weight 0 withdraws")


async def test_med_prepends_and_graceful_shutdown_then_drain_withdraws(
    labs: list[NetLab], speakers: list[Speaker]
) -> None:
    lab = make_lab(labs, 2)
    first, second = lab.edges
    steady = await start_speaker(lab, first, speakers, med=50)
    draining = await start_speaker(lab, second, speakers, med=50, communities=["65102:7"])
    await steady.announce(Serving.FULL)
    await draining.announce(Serving.FULL)
    await until(lambda: len(fib(lab)) == 2, "both edges in the FIB (ECMP)")
    path = path_from(lab, second)
    assert path is not None
    assert path["metric"] == 50
    assert path["aspath"]["string"] == "65102"
    assert path["community"]["string"] == "65102:7"

    await draining.announce(Serving.LEAVING)

    def drained_path_seen() -> bool:
        drained = path_from(lab, second)
        return drained is not None and "graceful-shutdown" in drained.get("community", {}).get(
            "string", ""
        )

    await until(drained_path_seen, "the draining path with GRACEFUL_SHUTDOWN")
    drained = path_from(lab, second)
    assert drained is not None
    assert drained["aspath"]["string"] == "65102 65102 65102"  # own ASN + 2 prepends
    assert "65102:7" in drained["community"]["string"]
    # The router's policy lowers GSHUT routes: new flows go to the steady edge only.
    await until(lambda: fib(lab) == {str(first.address): 1}, "FIB without the draining edge")

    # The choreography: GSHUT already out, no new connections arrive -> withdraw.
    report = await drain(
        lambda: draining.announce(Serving.LEAVING),
        lambda: 0,
        lambda: draining.announce(Serving.STOPPED),
        quiet_rate_per_s=1.0,
        quiet_window_s=0.3,
        deadline_s=10,
    )
    assert report.outcome is DrainOutcome.TRAFFIC_MOVED
    await until(lambda: path_from(lab, second) is None, "drained edge withdrawn")
    assert path_from(lab, first) is not None


# -- weights ------------------------------------------------------------------------------


async def test_weights_become_kernel_nexthop_weights_and_traffic_shares(
    labs: list[NetLab], speakers: list[Speaker]
) -> None:
    lab = make_lab(labs, 3, client=True)
    e1, e2, e3 = lab.edges
    s1 = await start_speaker(lab, e1, speakers, capacity_mbps=300)
    s2 = await start_speaker(lab, e2, speakers, capacity_mbps=100)
    s3 = await start_speaker(lab, e3, speakers, capacity_mbps=200)
    await s1.announce(Serving.FULL)
    await s2.announce(Serving.FULL)
    await s3.announce(Serving.FULL, weight=0.5)  # 100 Mbit/s effective
    await until(lambda: len(fib(lab)) == 3, "three weighted next-hops")
    weights = fib(lab)
    share = {hop: w / sum(weights.values()) for hop, w in weights.items()}
    assert share[str(e1.address)] == pytest.approx(0.6, abs=0.02)
    assert share[str(e2.address)] == pytest.approx(0.2, abs=0.02)
    assert share[str(e3.address)] == pytest.approx(0.2, abs=0.02)

    # A GSLB weight change reaches the kernel: 300 : 100 : 200 -> shares 1/2, 1/6, 1/3.
    await s3.announce(Serving.FULL, weight=1.0)

    def reweighted() -> bool:
        hops = fib(lab)
        total = sum(hops.values())
        return len(hops) == 3 and abs(hops.get(str(e3.address), 0) / total - 1 / 3) < 0.02

    await until(reweighted, "next-hop weights following the new GSLB weight")

    # Real connections through the router split in proportion (bounded: 1200 connects).
    lab.start_name_servers()
    counts = await asyncio.to_thread(lab.count_connections, 1200)
    assert counts.get("failed", 0) == 0
    served = {int(k): v for k, v in counts.items() if k.isdigit()}
    total = sum(served.values())
    assert total == 1200
    # Generous bound for a test (binomial noise); the benchmark reports the exact shares.
    assert served.get(1, 0) / total == pytest.approx(0.5, abs=0.07)
    assert served.get(2, 0) / total == pytest.approx(1 / 6, abs=0.07)
    assert served.get(3, 0) / total == pytest.approx(1 / 3, abs=0.07)


async def test_weight_changes_are_no_flaps_but_a_reannounce_still_is(
    labs: list[NetLab],
) -> None:
    """The whole speaker (policy, flap budget, ExaBGP) with a budget of one change and a
    one-hour hold-down: every link-bandwidth change after it still reaches FRR (the
    router shows each new value, in order, and nothing was held), while a withdraw and
    re-announce of the same route is damped (the re-announce never reaches ExaBGP)."""
    lab = make_lab(labs, 1)
    (edge,) = lab.edges
    router = lab.router
    assert router
    flap = {"max_changes_per_minute": 1, "initial_backoff_s": 3600, "max_backoff_s": 3600}
    config = edge_config(edge, capacity_mbps=1000, flap=flap)
    speaker = BgpSpeaker(config, lab.workdir / "speaker", netns=edge.netns, watchdog_s=0)
    await speaker.start()
    try:
        await asyncio.wait_for(speaker.driver.wait_established(), 30)
        speaker.update(serving=Serving.FULL, link_bandwidth_mbps=100)  # spends the budget
        await until(lambda: router.link_bandwidth_mbps(str(edge.address)) == 100, "100 Mbit/s")
        for mbps in (200.0, 300.0, 50.0, 400.0):  # GSLB shares, DEGRADED's half: no flaps
            speaker.update(link_bandwidth_mbps=mbps)
            assert speaker.announcer.held_until == 0.0, f"{mbps} Mbit/s held by the budget"

            def shown(want: float = mbps) -> bool:
                return router.link_bandwidth_mbps(str(edge.address)) == pytest.approx(want)

            await until(shown, f"FRR showing {mbps} Mbit/s from the edge")
        speaker.update(serving=Serving.REDUCED)
        await until(lambda: router.link_bandwidth_mbps(str(edge.address)) == 200, "DEGRADED half")
        assert speaker.announcer.holddowns == 0

        # Reachability flapping is still damped: the withdraw goes at once, the
        # re-announce is held (one hour) and is never handed to ExaBGP.
        speaker.update(serving=Serving.STOPPED)
        await until(lambda: path_from(lab, edge) is None, "the withdraw at the router")
        speaker.update(serving=Serving.FULL)
        assert speaker.announcer.holddowns == 1
        assert speaker.announcer.held_until > 0
        assert speaker.driver.desired == frozenset()
        speaker.update(link_bandwidth_mbps=500)  # a new share does not jump the hold
        assert speaker.driver.desired == frozenset()
    finally:
        await speaker.stop()


# -- failure: agent, ExaBGP, frozen edge --------------------------------------------------


async def on_frr(labs: list[NetLab], scenario: Callable[[NetLab, RouterView], None]) -> None:
    """A shared scenario (tests/support/bgp_checks.py) against a one-edge FRR lab."""
    lab = make_lab(labs, 1)
    assert lab.router
    await asyncio.to_thread(scenario, lab, frr_view(lab.router))


async def test_sigstop_of_the_agent_alone_withdraws_and_sigcont_reannounces(
    labs: list[NetLab],
) -> None:
    await on_frr(labs, freeze_agent_alone)


async def test_sigstop_of_the_whole_process_group_ends_with_the_hold_timer(
    labs: list[NetLab],
) -> None:
    await on_frr(labs, freeze_whole_group)


async def test_killed_agent_takes_its_route_and_exabgp_with_it(labs: list[NetLab]) -> None:
    await asyncio.to_thread(kill_agent, make_lab(labs, 1))


async def test_stalled_event_loop_withdraws(labs: list[NetLab]) -> None:
    """The loop blocks (the process runs): the relay's dead-man withdraws first (0.8 s),
    the in-process watchdog thread kills ExaBGP after its own deadline (2 s); both
    recover on their own."""
    lab = make_lab(labs, 1)
    (edge,) = lab.edges
    agent = SpeakerProcess(lab, edge, "--serving", "full", "--watchdog-s", "2")
    await until(lambda: str(edge.address) in fib(lab), "the agent's route", bound_s=30)
    assert agent.process.stdin is not None
    agent.process.stdin.write(b"stall 8\n")  # the agent's loop hangs for 8 s, the process lives
    agent.process.stdin.flush()
    await until(lambda: fib(lab) == {}, "route gone while the agent's loop is stalled", bound_s=7)
    assert agent.process.poll() is None
    # When the loop recovers, the supervisor restarts ExaBGP and re-announces.
    await until(lambda: str(edge.address) in fib(lab), "route back after the stall", bound_s=30)
    status = await asyncio.to_thread(agent.status)
    assert status["watchdog_stalls"] == 1 and status["deadman"]["firings"] == 1


async def test_exabgp_crash_is_restarted_and_desired_set_reannounced(
    labs: list[NetLab], speakers: list[Speaker]
) -> None:
    lab = make_lab(labs, 1)
    (edge,) = lab.edges
    speaker = await start_speaker(lab, edge, speakers)
    await speaker.announce(Serving.FULL, weight=0.5)
    await until(lambda: str(edge.address) in fib(lab), "route in FIB")
    old_pid = speaker.driver.pid
    speaker.driver.kill_now()
    await until(lambda: fib(lab) == {}, "route gone with ExaBGP")
    await until(
        lambda: speaker.driver.pid not in (None, old_pid) and str(edge.address) in fib(lab),
        "ExaBGP restarted and the route re-announced",
    )
    path = path_from(lab, edge)
    assert path is not None
    assert speaker.driver.restarts >= 1


async def test_bfd_drops_a_frozen_edge_and_bfdd_loss_is_repaired(
    labs: list[NetLab], speakers: list[Speaker]
) -> None:
    lab = make_lab(labs, 2, bfd=True)
    first, second = lab.edges
    bfd = {"enabled": True, "transmit_interval_ms": 100, "receive_interval_ms": 100}
    s1 = await start_speaker(lab, first, speakers, bfd=bfd)
    s2 = await start_speaker(lab, second, speakers, bfd=bfd)
    await s1.announce(Serving.FULL)
    await s2.announce(Serving.FULL)
    assert lab.router

    def bfd_up(count: int) -> bool:
        assert lab.router
        peers = lab.router.bfd_peers()
        return sum(p["status"] == "up" for p in peers) == count

    await until(lambda: len(fib(lab)) == 2 and bfd_up(2), "two routes, two BFD sessions up")

    # Freeze the first edge: everything it sends is dropped, no TCP close, no FIN.
    lab.blackhole(first)
    await until(lambda: fib(lab) == {str(second.address): 1}, "frozen edge out of the FIB")
    neighbor = json.loads(lab.router.vtysh(f"show bgp neighbors {first.address} json"))
    reason = neighbor[str(first.address)].get("lastNotificationReason", "")
    assert reason == "Cease/BFD Down", f"session not torn down by BFD: {reason!r}"
    lab.unblackhole(first)
    # The session comes back and the edge's desired set is announced again.
    await until(lambda: len(fib(lab)) == 2, "the thawed edge back in the FIB", bound_s=40)

    # The edge's bfdd hangs: the router drops BGP, brings it back without BFD, fast
    # failover is silently gone -> we report it as degraded and repair it (restart).
    assert s2.bfd is not None and s2.bfd.pid is not None
    degraded_reports: list[Any] = []
    s2.bfd.on_degraded = degraded_reports.append
    os.kill(s2.bfd.pid, signal.SIGSTOP)
    await until(lambda: bool(degraded_reports), "BFD-down-while-BGP-up reported", bound_s=40)
    await until(
        lambda: s2.bfd is not None and s2.bfd.status.restarts >= 1 and bfd_up(2),
        "bfdd restarted and both BFD sessions up again",
        bound_s=40,
    )


# -- refusals -----------------------------------------------------------------------------


async def test_wrong_md5_is_no_session_not_announced(labs: list[NetLab]) -> None:
    await on_frr(labs, wrong_md5_is_no_session)


async def test_stop_sends_cease_with_an_rfc8203_message(labs: list[NetLab]) -> None:
    await on_frr(labs, stop_sends_cease_with_reason)


# -- session features -----------------------------------------------------------------------


async def test_per_neighbor_attributes_and_route_refresh_without_reset(
    labs: list[NetLab], speakers: list[Speaker]
) -> None:
    """The neighbor's own MED and large community reach FRR; FRR asking for a route
    refresh (`clear bgp ... soft in`, what a filter change does) re-sends our routes on
    the same session."""
    lab = make_lab(labs, 1)
    (edge,) = lab.edges
    neighbor = {"med": 55, "large_communities": ["65101:3:4"], "link_bandwidth": "non-transitive"}
    speaker = await start_speaker(lab, edge, speakers, med=5, neighbor_overrides=neighbor)
    await speaker.announce(Serving.FULL)
    await until(lambda: path_from(lab, edge) is not None, "the route at FRR")
    path = path_from(lab, edge)
    assert path is not None
    assert path["metric"] == 55
    assert path["largeCommunity"]["string"] == "65101:3:4"
    assert "LB:65101:" in path.get("extendedCommunity", {}).get("string", "")
    session = speaker.driver.status()["sessions"][str(edge.router_address)]
    assert "route-refresh" in session["capabilities"]["negotiated"]
    assert session["hold_time_s"] == 3 and session["uptime_s"] is not None
    assert lab.router
    lab.router.vtysh(f"clear bgp ipv4 unicast {edge.address} soft in")

    def refreshed() -> bool:
        counters = speaker.driver.status()["sessions"][str(edge.router_address)]["counters"]
        return bool(counters["route_refreshes_received"] >= 1)

    await until(refreshed, "FRR's ROUTE-REFRESH seen by the edge")
    counters = speaker.driver.status()["sessions"][str(edge.router_address)]["counters"]
    assert counters["established"] == 1, "no session reset"
    assert path_from(lab, edge) is not None


async def test_ibgp_has_no_own_as_and_drains_by_local_pref(
    labs: list[NetLab], speakers: list[Speaker]
) -> None:
    lab = make_lab(labs, 1, ibgp=True)
    (edge,) = lab.edges
    assert edge.asn == ROUTER_ASN
    speaker = await start_speaker(lab, edge, speakers, neighbor_overrides={"local_pref": 150})
    await speaker.announce(Serving.FULL)
    await until(lambda: str(edge.address) in fib(lab), "the iBGP route in FRR's FIB")
    path = path_from(lab, edge)
    assert path is not None
    assert path["aspath"]["length"] == 0 and path["locPrf"] == 150
    assert path["peer"]["type"] == "internal"
    await speaker.announce(Serving.LEAVING)

    def drained() -> bool:
        found = path_from(lab, edge)
        return found is not None and found.get("locPrf") == 0

    await until(drained, "the draining iBGP route at local-pref 0")
    found = path_from(lab, edge)
    assert found is not None and found["aspath"]["length"] == 0
    assert "graceful-shutdown" in found["community"]["string"]


def nft_ttl_counter(netns: str, source: str, ttl: int) -> None:
    """Count, in the router's namespace, packets from `source` to the router's loopback
    that arrive with IP TTL `ttl` (the table goes with the namespace)."""
    rule = f"ip saddr {source} ip daddr {ROUTER_LOOPBACK} ip ttl {ttl} counter"
    for command in (
        "add table inet ae_ttl",
        "add chain inet ae_ttl input { type filter hook input priority 0 ; }",
        f"add rule inet ae_ttl input {rule}",
    ):
        run(*netns_command(netns, "nft", command))


def nft_ttl_packets(netns: str) -> int:
    data = json.loads(run(*netns_command(netns, "nft", "-j", "list table inet ae_ttl")))
    return sum(
        expr["counter"]["packets"]
        for item in data["nftables"]
        if "rule" in item
        for expr in item["rule"]["expr"]
        if "counter" in expr
    )


async def test_ebgp_multihop_sends_its_ttl(labs: list[NetLab], speakers: list[Speaker]) -> None:
    """The edge peers with the router's loopback (not a connected subnet) with eBGP
    multihop: the session comes up and the router counts our packets at TTL 4."""
    lab = make_lab(labs, 1, multihop=True)
    (edge,) = lab.edges
    assert lab.router
    netns = lab.router.netns
    nft_ttl_counter(netns, str(edge.address), MULTIHOP_TTL)
    neighbor = {
        "peer_address": str(ROUTER_LOOPBACK),
        "multihop": True,
        "ttl": MULTIHOP_TTL,
    }
    speaker = await start_speaker(lab, edge, speakers, neighbor_overrides=neighbor)
    await speaker.announce(Serving.FULL)
    await until(lambda: str(edge.address) in fib(lab), "the multihop route in FRR's FIB")
    assert nft_ttl_packets(netns) > 0


async def test_router_import_filter_refuses_prefix_outside_anycast_range(
    labs: list[NetLab], speakers: list[Speaker]
) -> None:
    lab = make_lab(labs, 1)
    (edge,) = lab.edges
    speaker = await start_speaker(lab, edge, speakers)
    # Our config refuses such a prefix; go around it to prove the router refuses it too.
    assert await speaker.driver.send_raw(f"announce route 203.0.113.1/32 next-hop {edge.address}")
    await speaker.announce(Serving.FULL)  # sent after the bad one
    await until(lambda: str(edge.address) in fib(lab), "the in-range route")
    assert lab.router
    assert "203.0.113.1/32" not in lab.router.bgp_routes()


def test_bad_config_exits_2_with_one_line_and_starts_nothing(tmp_path: Path) -> None:
    base = {
        "local_asn": 65101,
        "router_id": "198.18.0.2",
        "local_address": "198.18.0.2",
        "prefixes": [VIP_PREFIX],
        "neighbors": [{"peer_address": "198.18.0.1", "peer_asn": 65000}],
    }
    cases = {
        "local_asn": base | {"local_asn": 0},
        "prefixes": base | {"prefixes": ["203.0.113.0/24"]},
        "md5_password": base
        | {"neighbors": [{"peer_address": "198.18.0.1", "peer_asn": 1, "md5_password": "a b"}]},
        "local_address": base,  # 198.18.0.2 is on no interface of this namespace
    }
    for field, body in cases.items():
        path = tmp_path / f"{field}.yaml"
        path.write_text(yaml.safe_dump({"bgp": body}))
        result = subprocess.run(
            [
                sys.executable, "-m", "bgp.speaker",
                "--config", str(path), "--workdir", str(tmp_path / "w"),
            ],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and field in result.stderr
        assert not (tmp_path / "w" / "exabgp.conf").exists()


def test_the_shipped_frr_example_parses() -> None:
    require_router("frr")
    path = Path(__file__).resolve().parents[2] / "deploy" / "frr" / "edge-peering.conf"
    result = subprocess.run(
        ["/usr/lib/frr/bgpd", "-C", "-f", str(path)], capture_output=True, text=True, timeout=20
    )
    # bgpd -C exits 0 either way: the refused lines are in its output.
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Config Failed" not in output, output
    assert "No such command" not in output and "Unknown command" not in output, output
