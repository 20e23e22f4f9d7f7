"""Scenarios shared by the FRR and the BIRD tests: the same edge behaviour, seen from
whichever router the lab runs. A router is adapted by a `RouterView` (how to tell that a
session is up, and why it went down). Waits are bounded; nothing asserts a timing."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.netlab import (
    VIP,
    BirdRouter,
    Edge,
    FrrRouter,
    NetLab,
    RouteMonitor,
    SpeakerProcess,
    bird_protocol_name,
    pids_running,
    wait_for,
)

FREEZE_S = 5.0
# Long enough that only the dead-man switch (0.8 s) can explain a withdraw while frozen.
LONG_HOLD_S = 30


def require_router(kind: str) -> None:
    """Skip when the real parts are missing; under CI=true fail instead, with the reason
    (a machine without FRR or BIRD must not pass by skipping)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces)")
    if kind == "frr" and not (Path("/usr/lib/frr/bgpd").exists() and shutil.which("vtysh")):
        missing.append("FRR (Debian package frr)")
    if kind == "bird" and not (Path("/usr/sbin/bird").exists() and shutil.which("birdc")):
        missing.append("BIRD 2 (Debian package bird2)")
    if not missing:
        return
    reason = "needs " + ", ".join(missing)
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@dataclass
class RouterView:
    session_up: Callable[[Edge], bool]
    # The router's own words for why the session with this edge went down (or "").
    last_error: Callable[[Edge], str]
    # What the router reports of the last Cease it received: reason and RFC 8203 text.
    last_cease: Callable[[Edge], str]


def frr_view(router: FrrRouter) -> RouterView:
    def session_up(edge: Edge) -> bool:
        return router.neighbor_states().get(str(edge.address)) == "Established"

    def last_error(edge: Edge) -> str:
        data = json.loads(router.vtysh(f"show bgp neighbors {edge.address} json") or "{}")
        info = data.get(str(edge.address), {})
        return f"{info.get('lastResetDueTo', '')} / {info.get('lastNotificationReason', '')}"

    def last_cease(edge: Edge) -> str:
        data = json.loads(router.vtysh(f"show bgp neighbors {edge.address} json") or "{}")
        info = data.get(str(edge.address), {})
        reason = info.get("lastNotificationReason", "")
        return f"{reason}: {info.get('lastShutdownDescription', '')}"

    return RouterView(session_up, last_error, last_cease)


def bird_view(router: BirdRouter) -> RouterView:
    def last_error(edge: Edge) -> str:
        detail = router.protocol_detail(edge)
        return " ".join(line.strip() for line in detail.splitlines() if "error" in line.lower())

    def last_cease(edge: Edge) -> str:
        # BIRD logs `edge1: Received: Administrative shutdown: "message"`.
        mark = f"{bird_protocol_name(edge)}: Received:"
        lines = [line for line in router.log().splitlines() if mark in line]
        return lines[-1] if lines else ""

    return RouterView(router.established, last_error, last_cease)


def announced_by(lab: NetLab, edge: Edge) -> bool:
    return str(edge.address) in lab.fib_nexthops()


def freeze_agent_alone(lab: NetLab, view: RouterView) -> None:
    """SIGSTOP of the agent process alone: ExaBGP (its own process) keeps the session up
    with keepalives, so only the relay's dead-man switch can take the route away. After
    SIGCONT the route comes back (the node is still healthy); a second freeze during
    which health goes: the route does not come back, not even briefly."""
    edge = lab.edges[0]
    speaker = SpeakerProcess(
        lab, edge, "--serving", "full", neighbor_overrides={"hold_time_s": LONG_HOLD_S}
    )
    wait_for(lambda: announced_by(lab, edge), 40, what="the speaker's route")
    assert speaker.status()["deadman"]["firings"] == 0

    os.kill(speaker.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        wait_for(
            lambda: lab.fib_nexthops() == {},
            LONG_HOLD_S / 4,
            what="route gone at the peer while only the agent is frozen",
        )
        assert view.session_up(edge), "the dead-man withdraws; the session stays up"
        time.sleep(max(0.0, FREEZE_S - (time.monotonic() - stopped)))
    finally:
        os.kill(speaker.pid, signal.SIGCONT)
    wait_for(lambda: announced_by(lab, edge), 20, what="route back after SIGCONT, healthy")
    status = speaker.status()
    assert status["deadman"]["firings"] == 1
    assert status["watchdog_stalls"] == 0, "a frozen process is no loop stall: no reset"
    assert view.session_up(edge)

    monitor = RouteMonitor(lab.router_netns)
    try:
        os.kill(speaker.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: lab.fib_nexthops() == {}, LONG_HOLD_S / 4, what="withdrawn again")
            assert speaker.process.stdin is not None
            # Health falls while the agent is frozen (read when it wakes).
            speaker.process.stdin.write(b"serving stopped\n")
            speaker.process.stdin.flush()
            monitor.drain_pending()
        finally:
            os.kill(speaker.pid, signal.SIGCONT)

        def reannounced(line: str) -> bool:
            return VIP in line and not line.startswith("Deleted")

        with contextlib.suppress(TimeoutError):
            monitor.wait_line(reannounced, 3)
            raise AssertionError("a node that fell while frozen announced again on waking")
    finally:
        monitor.close()
    status = speaker.status()
    assert status["reason"] == "withdraw: node down" and status["announced"] == []


def freeze_whole_group(lab: NetLab, view: RouterView) -> None:
    """SIGSTOP of the agent's whole process group (agent, ExaBGP, relay): nothing of ours
    runs, so only the router's hold timer (3 s) ends it; systemd's watchdog is what
    restarts such a node on a real host. After SIGCONT the session and route come back."""
    edge = lab.edges[0]
    speaker = SpeakerProcess(lab, edge, "--serving", "full")
    wait_for(lambda: announced_by(lab, edge), 40, what="the speaker's route")
    os.killpg(speaker.pid, signal.SIGSTOP)
    try:
        wait_for(
            lambda: lab.fib_nexthops() == {}, 15, what="route gone after the router's hold time"
        )
        assert "hold" in view.last_error(edge).lower(), view.last_error(edge)
    finally:
        os.killpg(speaker.pid, signal.SIGCONT)
    wait_for(lambda: announced_by(lab, edge), 40, what="session and route back after SIGCONT")


def stop_sends_cease_with_reason(lab: NetLab, view: RouterView) -> None:
    """A clean stop (here: the speaker's stdin closes) withdraws, then ends the session
    with Cease/Administrative Shutdown carrying an RFC 8203 message that names why."""
    edge = lab.edges[0]
    speaker = SpeakerProcess(lab, edge, "--serving", "full")
    wait_for(lambda: announced_by(lab, edge), 40, what="the speaker's route")
    assert speaker.process.stdin is not None
    speaker.process.stdin.close()
    assert speaker.process.wait(20) == 0
    assert lab.fib_nexthops() == {}
    wait_for(
        lambda: "anycast-edge agent stopping" in view.last_cease(edge),
        10,
        what="the router's record of our Cease and its message",
    )
    assert "administrative shutdown" in view.last_cease(edge).lower(), view.last_cease(edge)


def wrong_md5_is_no_session(lab: NetLab, view: RouterView) -> None:
    """A wrong TCP-MD5 password at the router: never established; /status says "no
    session" and announces nothing, and after the grace period the speaker reports why
    the node is degraded (it wants to announce and nothing carries it)."""
    edge = lab.edges[0]
    speaker = SpeakerProcess(
        lab, edge, "--serving", "full", neighbor_overrides={"md5_password": "wrong-pw"}
    )
    speaker.status()  # the speaker runs (the grace period starts at its first status)
    deadline = time.monotonic() + 6.5  # past NO_SESSION_GRACE_S (5 s)
    while time.monotonic() < deadline:
        status = speaker.status()
        prefix = status["prefixes"][f"{VIP}/32"]
        assert prefix["desired"] and prefix["carriage"] == "no session", prefix
        assert status["announced"] == [] and prefix["sent_to"] == []
        assert not view.session_up(edge)
        time.sleep(0.5)
    assert lab.fib_nexthops() == {}
    status = speaker.status()
    assert status["reason"] == "announce: node healthy"  # the intent, told apart
    assert status["degraded_reason"] == (
        f"no BGP session carries {VIP}/32 (0 of 1 sessions established)"
    )


def kill_agent(lab: NetLab) -> None:
    """kill -9 of the agent: ExaBGP dies with it (parent-death signal and the relay's
    socket), the session closes, the route goes."""
    edge = lab.edges[0]
    speaker = SpeakerProcess(lab, edge, "--serving", "full")
    wait_for(lambda: announced_by(lab, edge), 40, what="the speaker's route")
    assert pids_running(edge.netns, b"bin/exabgp")
    os.kill(speaker.pid, signal.SIGKILL)
    wait_for(lambda: lab.fib_nexthops() == {}, 20, what="route gone with the killed agent")
    wait_for(lambda: not pids_running(edge.netns, b"bin/exabgp"), 20, what="ExaBGP gone too")


__all__ = [
    "RouterView",
    "announced_by",
    "bird_view",
    "freeze_agent_alone",
    "freeze_whole_group",
    "frr_view",
    "kill_agent",
    "require_router",
    "stop_sends_cease_with_reason",
    "wrong_md5_is_no_session",
]
