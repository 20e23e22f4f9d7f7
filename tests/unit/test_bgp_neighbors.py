"""Pure rules of the BGP side added with per-neighbor policy and observed state:
what each neighbor gets (bgp.neighbors), where a prefix stands and when the node is
degraded for want of a session (bgp.observed), and the metric families (bgp.metrics)."""

from __future__ import annotations

import ipaddress
import struct
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from bgp.config import BgpConfig, LinkBandwidth, by_family
from bgp.metrics import BgpCollector
from bgp.neighbors import link_bandwidth_community, route_for, routes_for
from bgp.observed import (
    Carriage,
    carriage,
    degraded_for_want_of_session,
    describe_carriage,
    no_session_reason,
    notification_reason,
)
from bgp.policy import GRACEFUL_SHUTDOWN, PolicyInputs, Serving, advertisements

ROUTER_A = IPv4Address("198.18.0.5")
ROUTER_B = IPv4Address("198.18.0.9")
VIP = IPv4Network("198.51.100.10/32")


def config(**changes: Any) -> BgpConfig:
    data: dict[str, Any] = {
        "local_asn": 65101,
        "router_id": "198.18.0.6",
        "local_address": "198.18.0.6",
        "prefixes": [str(VIP)],
        "neighbors": [
            {"peer_address": str(ROUTER_A), "peer_asn": 65000},
            {
                "peer_address": str(ROUTER_B),
                "peer_asn": 65001,
                "med": 200,
                "communities": ["65101:2"],
                "large_communities": ["65101:0:2"],
                "prepends": 2,
                "link_bandwidth": "non-transitive",
            },
        ],
        "med": 10,
        "communities": ["65101:1"],
        "large_communities": ["65101:0:1"],
        "drain_prepends": 3,
    }
    return BgpConfig.model_validate(data | changes)


def routes(cfg: BgpConfig, serving: Serving = Serving.FULL) -> list[Any]:
    (adv,) = advertisements(PolicyInputs(serving, cfg, cfg.capacity_mbps))[0]
    return [route_for(adv, neighbor, cfg) for neighbor in cfg.neighbors]


def test_each_neighbor_gets_its_own_attributes() -> None:
    plain, special = routes(config())
    assert (plain.med, plain.as_path) == (10, (65101,))
    assert plain.communities == ("65101:1",) and plain.large_communities == ("65101:0:1",)
    assert plain.extended_communities[0].startswith("0x0004")  # transitive
    assert (special.med, special.as_path) == (200, (65101, 65101, 65101))
    assert special.communities == ("65101:1", "65101:2")
    assert special.large_communities == ("65101:0:1", "65101:0:2")
    assert special.extended_communities[0].startswith("0x4004")  # non-transitive
    assert plain.local_pref is None and special.local_pref is None  # eBGP


def test_draining_adds_the_policy_prepends_to_the_neighbor_prepends() -> None:
    plain, special = routes(config(), Serving.LEAVING)
    assert plain.as_path == (65101,) * 4 and special.as_path == (65101,) * 6
    assert GRACEFUL_SHUTDOWN in plain.communities and GRACEFUL_SHUTDOWN in special.communities


def test_ibgp_has_no_own_as_and_drains_by_local_pref() -> None:
    cfg = config(neighbors=[{"peer_address": str(ROUTER_A), "peer_asn": 65101, "local_pref": 150}])
    (healthy,) = routes(cfg)
    assert healthy.as_path == () and healthy.local_pref == 150
    (draining,) = routes(cfg, Serving.LEAVING)
    assert draining.as_path == () and draining.local_pref == 0
    assert GRACEFUL_SHUTDOWN in draining.communities


def test_link_bandwidth_encodings() -> None:
    for mode, kind in ((LinkBandwidth.TRANSITIVE, 0x00), (LinkBandwidth.NON_TRANSITIVE, 0x40)):
        raw = bytes.fromhex(link_bandwidth_community(mode, 65101, 1.25e8)[2:])  # type: ignore[index]
        assert struct.unpack(">BBHf", raw) == (kind, 0x04, 65101, 1.25e8)
    raw = bytes.fromhex(link_bandwidth_community(LinkBandwidth.TRANSITIVE, 4200000000, 1.0)[2:])  # type: ignore[index]
    assert struct.unpack(">BBHf", raw)[2] == 23456  # AS_TRANS for a 4-byte ASN
    assert link_bandwidth_community(LinkBandwidth.OFF, 65101, 1.0) is None
    cfg = config(
        neighbors=[{"peer_address": str(ROUTER_A), "peer_asn": 65000, "link_bandwidth": "off"}]
    )
    (route,) = routes(cfg)
    assert route.extended_communities == ()


@given(
    st.sampled_from(list(Serving)),
    st.floats(min_value=0, max_value=1),
    st.integers(min_value=0, max_value=10),
)
def test_every_neighbor_gets_the_same_prefixes_and_ibgp_never_our_asn(
    serving: Serving, weight: float, prepends: int
) -> None:
    """Per-neighbor shaping never adds or drops a prefix (the policy alone decides that),
    an eBGP path always starts with our ASN, an iBGP path never holds it."""
    cfg = config(
        neighbors=[
            {"peer_address": str(ROUTER_A), "peer_asn": 65101},
            {"peer_address": str(ROUTER_B), "peer_asn": 65001, "prepends": prepends},
        ]
    )
    desired, _ = advertisements(PolicyInputs(serving, cfg, weight * cfg.capacity_mbps))
    ibgp, ebgp = (routes_for(desired, n, cfg) for n in cfg.neighbors)
    prefixes = {adv.prefix for adv in desired}
    assert {r.prefix for r in ibgp} == prefixes == {r.prefix for r in ebgp}
    assert all(r.as_path == () and r.local_pref is not None for r in ibgp)
    assert all(r.as_path[0] == 65101 and len(r.as_path) >= 1 + prepends for r in ebgp)


# -- bgp.observed -----------------------------------------------------------------------


def test_carriage_of_a_prefix() -> None:
    assert carriage(False, {ROUTER_A}, {ROUTER_A}) is Carriage.WITHDRAWN
    assert carriage(True, set(), set()) is Carriage.NO_SESSION
    assert carriage(True, {ROUTER_A}, set()) is Carriage.NOT_YET_SENT
    assert carriage(True, {ROUTER_A, ROUTER_B}, {ROUTER_A}) is Carriage.SENT
    assert describe_carriage(Carriage.SENT, 1, 2) == "sent to 1 of 2 peers"
    assert describe_carriage(Carriage.NO_SESSION, 0, 2) == "no session"


def test_degraded_when_it_wants_to_announce_and_no_session_carries_it() -> None:
    reason = no_session_reason({VIP}, {VIP: set()}, established=0, neighbors=2)
    assert reason == "no BGP session carries 198.51.100.10/32 (0 of 2 sessions established)"
    assert no_session_reason({VIP}, {VIP: {ROUTER_A}}, 1, 2) is None  # one carries it
    assert no_session_reason(set(), {}, 0, 2) is None  # nothing wanted: nothing missing
    # Established but not yet sent counts as not carried (yet): the grace covers it.
    assert no_session_reason({VIP}, {VIP: set()}, 1, 2) is not None
    assert not degraded_for_want_of_session(reason, since=100.0, now=103.0)
    assert degraded_for_want_of_session(reason, since=100.0, now=106.0)
    assert not degraded_for_want_of_session(None, since=100.0, now=200.0)


VIP6 = ipaddress.ip_network("2001:db8:100::10/128")
ROUTER_A6 = ipaddress.ip_address("2001:db8:18:10::1")


def test_an_ipv6_session_lost_beside_a_working_ipv4_one_is_seen() -> None:
    """Per address family: the IPv4 routes carried do not hide that no session carries
    any IPv6 prefix (before, one carried prefix of either family was enough)."""
    desired = {VIP, VIP6}
    reason = no_session_reason(desired, {VIP: {ROUTER_A}, VIP6: set()}, 1, 2)
    assert reason == (
        "no BGP session carries IPv6: 2001:db8:100::10/128 (IPv4 carried; "
        "1 of 2 sessions established)"
    )
    assert no_session_reason(desired, {VIP: set(), VIP6: {ROUTER_A6}}, 1, 2) == (
        "no BGP session carries IPv4: 198.51.100.10/32 (IPv6 carried; 1 of 2 sessions established)"
    )
    assert no_session_reason(desired, {VIP: {ROUTER_A}, VIP6: {ROUTER_A6}}, 2, 2) is None
    assert no_session_reason(desired, {}, 0, 2) == (
        "no BGP session carries 198.51.100.10/32, 2001:db8:100::10/128 "
        "(0 of 2 sessions established)"
    )


_V4 = st.integers(0, 255).map(lambda n: ipaddress.ip_network(f"198.51.100.{n}/32"))
_V6 = st.integers(0, 2**16 - 1).map(lambda n: ipaddress.ip_network(f"2001:db8:100::{n:x}/128"))


@given(
    st.sets(_V4 | _V6, max_size=6),
    st.data(),
)
def test_no_session_reason_is_none_exactly_when_every_wanted_family_is_carried(
    desired: set[ipaddress.IPv4Network | ipaddress.IPv6Network], data: st.DataObject
) -> None:
    carried = data.draw(
        st.sets(st.sampled_from(sorted(desired, key=by_family))) if desired else st.just(set())
    )
    sent_to = {prefix: ({ROUTER_A} if prefix in carried else set()) for prefix in desired}
    reason = no_session_reason(desired, sent_to, 1, 2)
    families_ok = all(
        any(p in carried for p in desired if p.version == version)
        for version in {p.version for p in desired}
    )
    assert (reason is None) == families_ok
    if reason is not None:  # it names every prefix of each family nothing carries
        for prefix in desired:
            lost = not any(p in carried for p in desired if p.version == prefix.version)
            assert (str(prefix) in reason) == lost


def test_notification_reasons_decoded() -> None:
    assert notification_reason(6, 2) == "Cease/Administrative Shutdown"
    assert notification_reason(6, 10) == "Cease/BFD Down"
    assert notification_reason(4, 0) == "Hold Timer Expired"
    assert notification_reason(2, 99) == "OPEN Message Error/Subcode 99"
    assert notification_reason(9, 1) == "Error 9/Subcode 1"


# -- bgp.metrics ------------------------------------------------------------------------


def test_metrics_render_from_the_status() -> None:
    session = {
        "state": "up",
        "uptime_s": 12.5,
        "hold_time_s": 3,
        "sent": {str(VIP): {"announced": True, "age_s": 1.0}},
        "counters": {
            "established": 2,
            "updates_sent": {"announce": 3, "withdraw": 1, "end-of-rib": 2},
            "notifications": [
                {"direction": "send", "reason": "Cease/Administrative Shutdown", "count": 1}
            ],
            "route_refreshes_received": 1,
        },
        "bfd": "up",
    }
    status = {
        "sessions": {str(ROUTER_A): session},
        "prefixes": {str(VIP): {"desired": True, "sent_to": [str(ROUTER_A)]}},
        "flap_holddowns": 4,
        "deadman": {"firings": 2},
        "watchdog_stalls": 0,
        "restarts": 1,
        "degraded_reason": None,
    }
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BgpCollector(lambda: status))
    text = generate_latest(registry).decode()
    peer = 'peer="198.18.0.5"'
    assert f"anycast_edge_bgp_peer_up{{{peer}}} 1.0" in text
    assert f"anycast_edge_bgp_peer_prefixes_advertised_count{{{peer}}} 1.0" in text
    assert f'anycast_edge_bgp_peer_updates_sent_total{{kind="withdraw",{peer}}} 1.0' in text
    assert (
        'anycast_edge_bgp_peer_notifications_total{direction="send",'
        f'{peer},reason="Cease/Administrative Shutdown"}} 1.0'
    ) in text
    assert f"anycast_edge_bgp_bfd_peer_up{{{peer}}} 1.0" in text
    assert "anycast_edge_bgp_flap_holddowns_total 4.0" in text
    assert "anycast_edge_bgp_deadman_firings_total 2.0" in text
    assert 'anycast_edge_bgp_prefix_peers{desired="true",prefix="198.51.100.10/32"} 1.0' in text
    # No speaker (yet): no series, no error.
    empty = CollectorRegistry(auto_describe=False)
    empty.register(BgpCollector(lambda: None))
    assert "anycast_edge_bgp" not in generate_latest(empty).decode()
