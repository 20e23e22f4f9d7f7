"""bgp against BIRD 2 as the peer router, in network namespaces, with real ExaBGP.

BIRD runs with a kernel protocol, so its choice shows in the router namespace's FIB, and
an import filter that takes only the anycast range and honours GRACEFUL_SHUTDOWN with
local-pref 0 (what deploy/bird/bird.conf ships). Attributes are read from `birdc show
route all`. Every test builds its own lab and always tears it down; nothing asserts a
timing (those are in `make bench-bgp`).
"""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.bgp_checks import (
    announced_by,
    bird_view,
    freeze_agent_alone,
    freeze_whole_group,
    kill_agent,
    require_router,
    stop_sends_cease_with_reason,
    wrong_md5_is_no_session,
)
from tests.support.netlab import (
    LOOPBACK_SESSION_PORT,
    MULTIHOP_TTL,
    ROUTER_ASN,
    ROUTER_LOOPBACK,
    BirdRouter,
    NetLab,
    SpeakerProcess,
    bird_config,
    bird_protocol_name,
    wait_for,
)

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]


@pytest.fixture
def make_lab() -> Iterator[Callable[..., NetLab]]:
    require_router("bird")
    made: list[NetLab] = []

    def make(**options: Any) -> NetLab:
        lab = NetLab.create(1, router="bird", **options)
        made.append(lab)
        return lab

    yield make
    for lab in made:
        lab.close()


@pytest.fixture
def lab(make_lab: Callable[..., NetLab]) -> NetLab:
    return make_lab()


def bird(lab: NetLab) -> BirdRouter:
    assert lab.bird is not None
    return lab.bird


def route_seen(lab: NetLab, protocol: str, **expected: str) -> Callable[[], bool]:
    def check() -> bool:
        for route in bird(lab).routes():
            if route["protocol"] == protocol:
                return all(route.get(key) == value for key, value in expected.items())
        return False

    return check


def link_bandwidth_value(ext_community: str) -> tuple[int, float]:
    """BIRD prints our link-bandwidth as `(unknown 0x4, ASN, INT)`: subtype 4, the AS, and
    the float's 4 bytes read as an integer."""
    kind, asn, raw = (part.strip(" ()") for part in ext_community.split(","))
    assert kind == "unknown 0x4", ext_community
    return int(asn), struct.unpack(">f", int(raw).to_bytes(4, "big"))[0]


# -- announce with attributes, withdraw, drain ---------------------------------------------


def test_announces_with_attributes_withdraws_on_failure_drains_and_undrains(lab: NetLab) -> None:
    edge = lab.edges[0]
    speaker = SpeakerProcess(
        lab,
        edge,
        "--serving",
        "not-ready",
        med=70,
        communities=["65101:7"],
        large_communities=["65101:1:2"],
        capacity_mbps=400,
    )
    name = bird_protocol_name(edge)
    wait_for(lambda: bird(lab).established(edge), 30, what="session up")
    assert bird(lab).routes() == []  # fail closed: nothing before health rose

    speaker.command("serving full")
    wait_for(lambda: announced_by(lab, edge), 20, what="route in BIRD's FIB")
    route = bird(lab).route_from(edge)
    assert route is not None and route["best"] == "*"
    assert route["BGP.med"] == "70" and route["BGP.as_path"] == "65101"
    assert route["BGP.community"] == "(65101,7)"
    assert route["BGP.large_community"] == "(65101, 1, 2)"
    assert route["BGP.local_pref"] == "100"
    asn, bytes_per_s = link_bandwidth_value(route["BGP.ext_community"])
    assert asn == 65101 and bytes_per_s == pytest.approx(400e6 / 8)

    speaker.command("serving stopped")
    wait_for(lambda: bird(lab).routes() == [], 20, what="withdrawn when the node is down")
    speaker.command("serving full")
    wait_for(lambda: announced_by(lab, edge), 20, what="announced again")

    # Drain: GRACEFUL_SHUTDOWN + prepends; BIRD's import filter sets local-pref 0.
    speaker.command("serving leaving")
    wait_for(
        route_seen(lab, name, **{"BGP.local_pref": "0", "BGP.as_path": "65101 65101 65101"}),
        20,
        what="the draining route at local-pref 0 with prepends",
    )
    drained = bird(lab).route_from(edge)
    assert drained is not None and "(65535,0)" in drained["BGP.community"]
    speaker.command("serving full")
    wait_for(
        route_seen(lab, name, **{"BGP.local_pref": "100", "BGP.as_path": "65101"}),
        20,
        what="undrained: back to normal",
    )
    assert speaker.status()["sessions"][str(edge.router_address)]["counters"]["established"] == 1


# -- router config change: route refresh, no session reset ---------------------------------


def test_router_filter_change_uses_route_refresh_without_a_session_reset(lab: NetLab) -> None:
    edge = lab.edges[0]
    speaker = SpeakerProcess(lab, edge, "--serving", "full", med=70)
    name = bird_protocol_name(edge)
    wait_for(route_seen(lab, name, **{"BGP.med": "70"}), 30, what="route with MED 70")
    session = speaker.status()["sessions"][str(edge.router_address)]
    assert "route-refresh" in session["capabilities"]["negotiated"]
    since = bird(lab).protocols()[name]["since"]

    # The operator changes the import filter and reloads BIRD's config.
    changed = bird_config(bird(lab).router_id, lab.edges, extra_import="bgp_med = 999;")
    bird(lab).reconfigure(changed)
    wait_for(route_seen(lab, name, **{"BGP.med": "999"}), 20, what="route re-filtered")
    assert bird(lab).protocols()[name]["since"] == since, "the session was not reset"
    assert bird(lab).established(edge)
    session = speaker.status()["sessions"][str(edge.router_address)]
    assert session["counters"]["route_refreshes_received"] >= 1
    assert session["counters"]["established"] == 1


# -- failures of the agent ------------------------------------------------------------------


def test_sigstop_of_the_agent_alone_withdraws_and_sigcont_reannounces(lab: NetLab) -> None:
    freeze_agent_alone(lab, bird_view(bird(lab)))


def test_sigstop_of_the_whole_process_group_ends_with_the_hold_timer(lab: NetLab) -> None:
    freeze_whole_group(lab, bird_view(bird(lab)))


def test_killed_agent_takes_its_route_and_exabgp_with_it(lab: NetLab) -> None:
    kill_agent(lab)


def test_stop_sends_cease_with_an_rfc8203_message(lab: NetLab) -> None:
    stop_sends_cease_with_reason(lab, bird_view(bird(lab)))


def test_wrong_md5_is_no_session_not_announced(lab: NetLab) -> None:
    wrong_md5_is_no_session(lab, bird_view(bird(lab)))


# -- iBGP, multihop, per-neighbor attributes -----------------------------------------------


def test_ibgp_has_no_own_as_and_drains_by_local_pref(make_lab: Callable[..., NetLab]) -> None:
    lab = make_lab(ibgp=True)
    edge = lab.edges[0]
    assert edge.asn == ROUTER_ASN
    speaker = SpeakerProcess(lab, edge, "--serving", "full", neighbor_overrides={"local_pref": 150})
    name = bird_protocol_name(edge)
    wait_for(
        route_seen(lab, name, **{"BGP.local_pref": "150", "BGP.as_path": ""}),
        30,
        what="iBGP route: our LOCAL_PREF, empty AS_PATH",
    )
    assert announced_by(lab, edge)
    speaker.command("serving leaving")
    wait_for(route_seen(lab, name, **{"BGP.local_pref": "0", "BGP.as_path": ""}), 20)


def test_two_peers_get_their_own_attributes_one_of_them_multihop(
    make_lab: Callable[..., NetLab],
) -> None:
    """One edge, two sessions to BIRD: its link address (single hop) and its loopback
    (eBGP multihop, TTL 4, the edge passive on another port). Each neighbor gets its own
    MED, communities, prepends and link-bandwidth setting."""
    lab = make_lab(loopback_sessions=True)
    edge = lab.edges[0]
    direct = {
        "peer_address": str(edge.router_address),
        "peer_asn": ROUTER_ASN,
        "md5_password": edge.md5_password,
        "med": 10,
        "communities": ["65101:10"],
    }
    far = {
        "peer_address": str(ROUTER_LOOPBACK),
        "peer_asn": ROUTER_ASN,
        "md5_password": edge.md5_password,
        "multihop": True,
        "ttl": MULTIHOP_TTL,
        "passive": True,
        "port": LOOPBACK_SESSION_PORT,
        "med": 20,
        "communities": ["65101:20"],
        "large_communities": ["65101:0:20"],
        "prepends": 1,
        "link_bandwidth": "off",
    }
    speaker = SpeakerProcess(lab, edge, "--serving", "full", neighbors=[direct, far])
    name = bird_protocol_name(edge)
    wait_for(lambda: len(bird(lab).routes()) == 2, 40, what="a route from each session")
    near_route = bird(lab).route_from(edge)
    far_route = next(r for r in bird(lab).routes() if r["protocol"] == f"{name}lo")
    assert near_route is not None
    assert (near_route["BGP.med"], near_route["BGP.as_path"]) == ("10", "65101")
    assert near_route["BGP.community"] == "(65101,10)" and "BGP.large_community" not in near_route
    assert "BGP.ext_community" in near_route
    assert (far_route["BGP.med"], far_route["BGP.as_path"]) == ("20", "65101 65101")
    assert far_route["BGP.community"] == "(65101,20)"
    assert far_route["BGP.large_community"] == "(65101, 0, 20)"
    assert "BGP.ext_community" not in far_route
    prefix = speaker.status()["prefixes"]["198.51.100.10/32"]
    assert prefix["carriage"] == "sent to 2 of 2 peers"


def test_the_shipped_bird_example_parses() -> None:
    require_router("bird")
    path = Path(__file__).resolve().parents[2] / "deploy" / "bird" / "bird.conf"
    result = subprocess.run(
        ["bird", "-p", "-c", str(path)], capture_output=True, text=True, timeout=10
    )
    assert result.returncode == 0, result.stderr
