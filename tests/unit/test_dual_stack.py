"""Dual stack and services per node, the pure parts: node.yaml's services (and the bad
input it refuses), the service state machine, the policy's per-service groups, IPv6 in
ExaBGP's config, commands and messages, bfdd's config, the client address form."""

from __future__ import annotations

from ipaddress import IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bgp.bfd import degraded_peers, parse_bfd_peers, render_bfdd_config
from bgp.config import BgpConfig
from bgp.exabgp import SentUpdate, diff_commands, parse_message, render_config
from bgp.policy import (
    GRACEFUL_SHUTDOWN,
    PolicyInputs,
    PrefixGroup,
    Reason,
    Serving,
    advertisements,
    group_reasons,
)
from edge.announcer import prefix_groups, service_serving
from edge.config import IMPLICIT_SERVICE, ConfigError, parse_config
from edge.proxy.common import client_address
from edge.services import ServiceState, ServiceStateMachine, node_verdict
from edge.state import NodeState, NodeStateMachine, Observation, Thresholds

VIP6 = "2001:db8:100::10"
BGP: dict[str, Any] = {
    "local_asn": 65101,
    "router_id": "198.18.0.6",
    "local_address": "198.18.0.6",
    "local_address_v6": "2001:db8:ff00:1::2",
    "neighbors": [
        {"peer_address": "198.18.0.5", "peer_asn": 65000},
        {"peer_address": "2001:db8:ff00:1::1", "peer_asn": 65000},
    ],
}


def service(name: str, prefix: str, address: str, port: int = 80) -> dict[str, Any]:
    return {
        "name": name,
        "prefixes": [prefix],
        "listeners": [{"name": f"{name}-l", "kind": "http", "address": address, "port": port}],
        "backends": [{"name": "b1", "address": "::1", "port": 8080}],
    }


def node(*services: dict[str, Any], bgp: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "node": {"name": "edge-a1", "site": "site-a"},
        "services": list(services),
        "bgp": BGP if bgp is None else bgp,
    }


TWO = node(
    service("web4", "198.51.100.10/32", "198.51.100.10"),
    service("web6", f"{VIP6}/128", VIP6),
)


# -- node.yaml ----------------------------------------------------------------------------


def test_two_services_load_with_their_own_sections() -> None:
    config = parse_config(TWO)
    assert not config.implicit_service
    web4, web6 = config.service_list()
    assert [str(p) for p in web6.prefixes] == [f"{VIP6}/128"]
    assert web4.pool == config.pool and web6.health == config.health  # inherited
    view = config.for_service(web6)
    assert [listener.address for listener in view.listeners] == [VIP6]
    groups = prefix_groups(config.service_list())
    assert [group.name for group in groups] == ["web4", "web6"]


def test_todays_shape_is_one_implicit_service() -> None:
    config = parse_config(
        {
            "node": {"name": "edge-a1", "site": "site-a"},
            "listeners": [{"name": "web", "kind": "http", "address": "198.51.100.10", "port": 80}],
            "backends": [{"name": "b1", "address": "127.0.0.1", "port": 8080}],
            "bgp": BGP | {"prefixes": ["198.51.100.10/32", f"{VIP6}/128"]},
        }
    )
    assert config.implicit_service
    (only,) = config.service_list()
    assert only.name == IMPLICIT_SERVICE and len(only.prefixes) == 2
    assert [b.name for b in only.backends] == ["b1"]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            node(service("web", "203.0.113.1/32", "0.0.0.0")),
            "services.0.prefixes: prefix 203.0.113.1/32 is outside the anycast range "
            "198.51.100.0/24",
        ),
        (
            node(service("web", "2001:db9::1/128", "::")),
            "services.0.prefixes: prefix 2001:db9::1/128 is outside the anycast range "
            "2001:db8::/32",
        ),
        (
            node(
                service("a", "198.51.100.10/32", "198.51.100.10"),
                service("b", "198.51.100.11/32", "198.51.100.10"),
            ),
            "services.1.listeners.0: 198.51.100.10 port 80 is already a listener of service a",
        ),
        (
            node(service("web", "198.51.100.10/32", VIP6)),
            f"services.0.listeners.0.address: {VIP6} is IPv6 but service web announces no "
            "IPv6 prefix",
        ),
        (
            node(service("web", f"{VIP6}/128", "2001:db8:100::11")),
            "services.0.listeners.0.address: 2001:db8:100::11 is not one of service web's",
        ),
        (
            node(service("web", "198.51.100.10/32", "198.51.100.10") | {"backends": []}),
            "services.0.backends: List should have at least 1 item",
        ),
        (
            node(
                service("web", "198.51.100.10/32", "198.51.100.10"),
                service("web", "198.51.100.11/32", "198.51.100.11"),
            ),
            "services.1.name: duplicate service name 'web'",
        ),
        (
            node(
                service("a", "198.51.100.10/32", "198.51.100.10"),
                service("b", "198.51.100.10/32", "198.51.100.10", port=81),
            ),
            "services.1.prefixes: 198.51.100.10/32 is already service a's",
        ),
        (
            node(
                service("web", f"{VIP6}/128", VIP6),
                bgp={k: v for k, v in BGP.items() if k != "local_address_v6"}
                | {"neighbors": BGP["neighbors"][:1]},
            ),
            "bgp.local_address_v6: service web announces 2001:db8:100::10/128",
        ),
        (
            node(service("web", "198.51.100.10/32", "198.51.100.10"))
            | {"listeners": [{"name": "x", "kind": "tcp", "address": "127.0.0.1", "port": 1}]},
            "listeners: give listeners inside each service",
        ),
    ],
)
def test_bad_services_are_one_line_naming_the_field(data: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    message = str(info.value)
    assert message.startswith(expected), message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("bgp", "field"),
    [
        (BGP | {"local_address_v6": None}, "bgp.local_address_v6:"),
        (
            BGP | {"neighbors": [{"peer_address": "198.18.0.5", "peer_asn": 1, "families": []}]},
            "bgp.neighbors.0.families:",
        ),
    ],
)
def test_ipv6_neighbors_need_an_ipv6_address(bgp: dict[str, Any], field: str) -> None:
    data = node(service("web", "198.51.100.10/32", "198.51.100.10"), bgp=bgp)
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert str(info.value).startswith(field), str(info.value)


def test_listeners_may_share_a_port_in_different_vrfs() -> None:
    a = service("a", "198.51.100.10/32", "0.0.0.0") | {"vrf": "blue"}
    b = service("b", "198.51.100.11/32", "0.0.0.0") | {"vrf": "red"}
    b["listeners"][0]["name"] = "b-l"
    assert [s.vrf for s in parse_config(node(a, b)).service_list()] == ["blue", "red"]


# -- the service state machine --------------------------------------------------------------


def look(total: int, healthy: int, settled: bool = True, ok: bool = True) -> Observation:
    return Observation(total, healthy, settled, ok)


def test_a_service_rises_degrades_and_falls_with_causes() -> None:
    machine = ServiceStateMachine("web", Thresholds(1.0, 0.5))
    assert machine.observe(look(2, 0, settled=False)) is None
    up = machine.observe(look(2, 2))
    assert up is not None and up.new is ServiceState.HEALTHY and up.cause == "2/2 backends healthy"
    degraded = machine.observe(look(2, 1))
    assert degraded is not None and degraded.new is ServiceState.DEGRADED
    down = machine.observe(look(2, 0))
    assert down is not None and (down.old, down.new) == (ServiceState.DEGRADED, ServiceState.DOWN)
    assert "0/2 backends healthy" in down.cause and down.service == "web"
    listener = machine.observe(look(2, 2, ok=False))
    assert listener is None and machine.cause.startswith("listener self-check failed")


@given(
    st.lists(
        st.tuples(st.integers(0, 4), st.integers(0, 4), st.booleans(), st.booleans()),
        min_size=1,
        max_size=30,
    )
)
def test_service_state_never_returns_to_starting_and_down_means_no_healthy_share(
    looks: list[tuple[int, int, bool, bool]],
) -> None:
    machine = ServiceStateMachine("s", Thresholds(1.0, 0.5))
    risen = False
    for total, up, settled, ok in looks:
        healthy = min(up, total)
        transition = machine.observe(look(total, healthy, settled, ok))
        if transition is not None:
            assert transition.old is not transition.new and transition.cause
        risen = risen or machine.state is not ServiceState.STARTING
        if risen:
            assert machine.state is not ServiceState.STARTING
        if machine.state.serving:
            assert ok and total and healthy / total >= 0.5


@given(st.lists(st.sampled_from(list(ServiceState)), min_size=1, max_size=6))
def test_the_node_serves_while_any_service_does(states: list[ServiceState]) -> None:
    machines = [ServiceStateMachine(f"s{i}", Thresholds(), state=s) for i, s in enumerate(states)]
    verdict, cause = node_verdict(machines)
    if any(s.serving for s in states):
        assert verdict is NodeState.HEALTHY
    elif ServiceState.STARTING in states:
        assert verdict is NodeState.STARTING
    else:
        assert verdict is NodeState.DOWN and "no service serving" in cause


def test_a_risen_node_whose_services_all_fall_is_down_not_starting() -> None:
    node_machine = NodeStateMachine()
    serving = (NodeState.HEALTHY, "1/1 services serving")
    node_machine.observe(Observation(0, 0, True, True, services_verdict=serving))
    assert node_machine.state is NodeState.HEALTHY
    rising = (NodeState.STARTING, "waiting for services to rise: b")
    node_machine.observe(Observation(0, 0, True, True, services_verdict=rising))
    assert node_machine.state is NodeState.DOWN
    bfd = Observation(0, 0, True, True, degraded_by=("BFD down",), services_verdict=serving)
    node_machine.observe(bfd)
    assert node_machine.state is NodeState.DEGRADED


# -- the policy: per-service groups, both families -------------------------------------------

CONFIG = BgpConfig.model_validate(BGP | {"communities": ["65101:1"]})
GROUPS = (
    PrefixGroup("web4", (ip_network("198.51.100.10/32"),), med=40),
    PrefixGroup("web6", (IPv6Network(f"{VIP6}/128"),), large_communities=("65101:6:6",)),
)


def policy(node: Serving, web4: Serving, web6: Serving) -> PolicyInputs:
    return PolicyInputs(node, CONFIG, 1000.0, GROUPS, {"web4": web4, "web6": web6})


def test_a_service_down_withdraws_only_its_own_prefixes() -> None:
    inputs = policy(Serving.FULL, Serving.FULL, Serving.STOPPED)
    desired, reason = advertisements(inputs)
    assert reason is Reason.ANNOUNCE_HEALTHY
    assert {str(adv.prefix) for adv in desired} == {"198.51.100.10/32"}
    (adv,) = desired
    assert adv.med == 40 and str(adv.next_hop) == "198.18.0.6"
    assert group_reasons(inputs) == {
        "web4": Reason.ANNOUNCE_HEALTHY,
        "web6": Reason.WITHDRAW_SERVICE_DOWN,
    }


def test_ipv6_prefixes_take_the_ipv6_next_hop_and_the_node_drain_applies_to_all() -> None:
    desired, reason = advertisements(policy(Serving.LEAVING, Serving.FULL, Serving.FULL))
    assert reason is Reason.ANNOUNCE_DRAINING
    by_prefix = {str(adv.prefix): adv for adv in desired}
    six = by_prefix[f"{VIP6}/128"]
    assert six.next_hop == IPv6Address("2001:db8:ff00:1::2")
    assert six.large_communities == ("65101:6:6",)
    assert all(GRACEFUL_SHUTDOWN in adv.communities for adv in desired)
    assert all(adv.as_path_prepends == CONFIG.drain_prepends for adv in desired)


@given(
    st.sampled_from(list(Serving)), st.sampled_from(list(Serving)), st.sampled_from(list(Serving))
)
def test_a_group_is_announced_only_when_node_and_service_both_say_so(
    node_serving: Serving, web4: Serving, web6: Serving
) -> None:
    desired, _ = advertisements(policy(node_serving, web4, web6))
    announced = {adv.prefix.version for adv in desired}
    serving = {Serving.FULL, Serving.REDUCED, Serving.LEAVING}
    for version, own in ((4, web4), (6, web6)):
        assert (version in announced) == (node_serving in serving and own in serving)
    # A degraded service announces less bandwidth than a healthy one, never more.
    full = advertisements(policy(node_serving, Serving.FULL, Serving.FULL))[0]
    for adv in desired:
        same = next(f for f in full if f.prefix == adv.prefix)
        assert adv.link_bandwidth_bytes_per_s <= same.link_bandwidth_bytes_per_s


def test_service_states_map_onto_serving() -> None:
    assert {s: service_serving(s) for s in ServiceState} == {
        ServiceState.STARTING: Serving.NOT_READY,
        ServiceState.HEALTHY: Serving.FULL,
        ServiceState.DEGRADED: Serving.REDUCED,
        ServiceState.DOWN: Serving.STOPPED,
    }


# -- ExaBGP and bfdd: IPv6 sessions, IPv6 NLRI over IPv4 ---------------------------------------

OVER_V4 = BgpConfig.model_validate(
    BGP
    | {
        "prefixes": ["198.51.100.10/32", f"{VIP6}/128"],
        "neighbors": [
            {"peer_address": "198.18.0.5", "peer_asn": 65000, "families": ["ipv4", "ipv6"]},
            {"peer_address": "2001:db8:ff00:1::1", "peer_asn": 65000},
        ],
    }
)


def test_render_binds_each_session_to_its_family_and_carries_what_it_is_told() -> None:
    text = render_config(OVER_V4, "relay")
    v4, v6 = text.split("neighbor ")[1:]
    assert "local-address 198.18.0.6;" in v4
    assert "ipv4 unicast;" in v4 and "ipv6 unicast;" in v4
    assert v6.startswith("2001:db8:ff00:1::1 {")
    assert "local-address 2001:db8:ff00:1::2;" in v6
    assert "ipv6 unicast;" in v6 and "ipv4 unicast;" not in v6


def test_commands_go_to_the_sessions_that_carry_the_family() -> None:
    desired, _ = advertisements(PolicyInputs(Serving.FULL, OVER_V4, 1000.0))
    commands = diff_commands(frozenset(), desired, OVER_V4)
    to_v4 = [c for c in commands if c.startswith("neighbor 198.18.0.5 ")]
    to_v6 = [c for c in commands if c.startswith("neighbor 2001:db8:ff00:1::1 ")]
    assert len(to_v4) == 2 and len(to_v6) == 1
    assert f"announce route {VIP6}/128 next-hop 2001:db8:ff00:1::2" in to_v6[0]
    assert any(f"route {VIP6}/128 next-hop 2001:db8:ff00:1::2" in c for c in to_v4)
    withdraws = diff_commands(desired, frozenset(), OVER_V4)
    assert f"neighbor 2001:db8:ff00:1::1 withdraw route {VIP6}/128" in withdraws


def test_ipv6_updates_and_peers_are_parsed() -> None:
    line = (
        '{"type": "update", "neighbor": {"address": {"peer": "2001:db8:ff00:1::1"}, '
        '"direction": "send", "message": {"update": {"announce": {"ipv6 unicast": '
        '{"2001:db8:ff00:1::2": [{"nlri": "2001:db8:100::10/128"}]}}, '
        '"withdraw": {"ipv4 unicast": [{"nlri": "198.51.100.10/32"}]}}}}}'
    )
    message = parse_message(line)
    assert isinstance(message, SentUpdate)
    assert message.peer == IPv6Address("2001:db8:ff00:1::1")
    assert message.announced == {IPv6Network(f"{VIP6}/128")}
    assert {str(p) for p in message.withdrawn} == {"198.51.100.10/32"}


def test_bfdd_peers_over_ipv6_from_the_ipv6_address() -> None:
    text = render_bfdd_config(OVER_V4)
    assert " peer 2001:db8:ff00:1::1 local-address 2001:db8:ff00:1::2" in text
    peers = parse_bfd_peers('[{"peer": "2001:db8:ff00:1::1", "status": "up"}]')
    assert degraded_peers(peers, {IPv6Address("2001:db8:ff00:1::1")}) == []
    mixed = {IPv6Address("2001:db8:ff00:1::1"), ip_address("198.18.0.5")}
    assert [str(p) for p in degraded_peers({}, mixed)] == ["198.18.0.5", "2001:db8:ff00:1::1"]


# -- the client address, as X-Forwarded-For and Maglev take it ----------------------------------


@pytest.mark.parametrize(
    ("peername", "expected"),
    [
        (("2001:db8:ff00:ffff::2", 40000, 0, 0), ("2001:db8:ff00:ffff::2", 40000)),
        (("::ffff:198.19.0.2", 40000, 0, 0), ("198.19.0.2", 40000)),
        (("fe80::1%eth0", 1, 0, 2), ("fe80::1", 1)),
        (("198.19.0.2", 5), ("198.19.0.2", 5)),
        (None, ("?", 0)),
    ],
)
def test_client_address_form(peername: Any, expected: tuple[str, int]) -> None:
    assert client_address(peername) == expected
