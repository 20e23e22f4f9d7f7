"""Property tests of the per-service shares (api.gslb.service_shares): a service drain
touches only its service, node and site drains touch every service, service weights only
theirs, and without anything per service every service's shares are the node's."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from api.gslb import (
    NodeHealth,
    drained_nodes,
    service_drained_nodes,
    service_shares,
    shares,
)
from contract.schemas import (
    DesiredState,
    Drain,
    DrainKind,
    Liveness,
    NodeSpec,
    NodeState,
    ServiceSpec,
    ServiceState,
    ServiceWeights,
    SiteSpec,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SERVICES = ("web", "dns")
SPECS = {
    "web": ServiceSpec(prefix="198.51.100.10/32"),
    "dns": ServiceSpec(prefix="2001:db8::53/128"),
}


def drain(kind: DrainKind, name: str, service: str | None = None) -> Drain:
    return Drain(kind=kind, name=name, reason="r", author="t", since=NOW, service=service)


@st.composite
def fleets(draw: st.DrawFn) -> tuple[DesiredState, dict[str, NodeHealth]]:
    """Sites and nodes with node, site and service drains, service weights, and nodes that
    report each service in any state (or report none, or only some)."""
    site_names = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, unique=True))
    sites = {
        s: SiteSpec(weight=draw(st.integers(0, 1000)), capacity_mbps=draw(st.integers(0, 10_000)))
        for s in site_names
    }
    nodes = {
        f"n{i}": NodeSpec(
            site=draw(st.sampled_from(site_names)),
            weight=draw(st.integers(0, 1000)),
            capacity_mbps=draw(st.integers(0, 100_000)),
        )
        for i in range(draw(st.integers(0, 7)))
    }
    drains: list[Drain] = []
    for service in (None, *SERVICES):
        for n in nodes:
            if draw(st.integers(0, 4)) == 0:
                drains.append(drain(DrainKind.NODE, n, service))
        if draw(st.integers(0, 4)) == 0:
            drains.append(drain(DrainKind.SITE, draw(st.sampled_from(site_names)), service))
    service_weights = {
        s: ServiceWeights(
            sites={n: draw(st.integers(0, 1000)) for n in sites if draw(st.booleans())},
            nodes={n: draw(st.integers(0, 1000)) for n in nodes if draw(st.booleans())},
        )
        for s in SERVICES
        if draw(st.booleans())
    }
    health: dict[str, NodeHealth] = {}
    for n in nodes:
        if draw(st.integers(0, 9)) == 0:
            continue  # never heard from
        reported = None
        if draw(st.booleans()):
            reported = {
                s: draw(st.sampled_from(list(ServiceState)))
                for s in SERVICES
                if draw(st.integers(0, 3)) > 0
            }
        health[n] = NodeHealth(
            draw(st.sampled_from(list(Liveness))),
            draw(st.none() | st.sampled_from(list(NodeState))),
            reported,
        )
    desired = DesiredState(
        sites=sites,
        nodes=nodes,
        services=SPECS,
        drains=drains,
        service_weights=service_weights,
    )
    return desired, health


Fleet = tuple[DesiredState, dict[str, NodeHealth]]


def without(desired: DesiredState, keep: Callable[[Drain], bool]) -> DesiredState:
    return desired.model_copy(update={"drains": [d for d in desired.drains if keep(d)]})


def close(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(
        math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-9) for k in a
    )


@given(fleets())
def test_a_service_drain_never_touches_another_service(fleet: Fleet) -> None:
    desired, health = fleet
    for service in SERVICES:
        other = next(s for s in SERVICES if s != service)
        # Every drain of `other` removed: `service`'s shares, serving set and drains stay.
        cleared = without(desired, lambda d, other=other: d.service != other)
        before, after = (
            service_shares(desired, health, service),
            service_shares(cleared, health, service),
        )
        assert before.serving == after.serving
        assert close(before.link_bandwidth_mbps, after.link_bandwidth_mbps)
        assert service_drained_nodes(desired, service) == service_drained_nodes(cleared, service)


@given(fleets())
def test_a_service_drain_never_touches_the_nodes_own_shares(fleet: Fleet) -> None:
    desired, health = fleet
    cleared = without(desired, lambda d: d.service is None)
    before, after = shares(desired, health), shares(cleared, health)
    assert before.serving == after.serving
    assert close(before.link_bandwidth_mbps, after.link_bandwidth_mbps)
    assert drained_nodes(desired) == drained_nodes(cleared)


@given(fleets())
def test_node_and_site_drains_apply_to_every_service(fleet: Fleet) -> None:
    desired, health = fleet
    for service in SERVICES:
        drained = service_drained_nodes(desired, service)
        for name, node_drain in drained_nodes(desired).items():
            assert drained[name] == node_drain  # the node-wide drain wins, as it is
        assert not (service_shares(desired, health, service).serving & set(drained))


@given(fleets())
def test_service_shares_are_finite_and_serve_only_where_the_node_does(fleet: Fleet) -> None:
    desired, health = fleet
    node_serving = shares(desired, health).serving
    for service in SERVICES:
        result = service_shares(desired, health, service)
        assert set(result.link_bandwidth_mbps) == set(desired.nodes)
        assert all(v >= 0 and math.isfinite(v) for v in result.link_bandwidth_mbps.values())
        # A service serves on a node only where the node serves (weights aside, which
        # can only add a node the node-level weight 0 excluded).
        for name in result.serving - node_serving:
            assert desired.nodes[name].weight == 0


@given(fleets())
def test_with_nothing_per_service_every_service_shares_like_the_node(fleet: Fleet) -> None:
    desired, health = fleet
    plain = without(desired, lambda d: d.service is None).model_copy(update={"service_weights": {}})
    uniform = {n: NodeHealth(h.liveness, h.state) for n, h in health.items()}
    node = shares(plain, uniform)
    for service in SERVICES:
        result = service_shares(plain, uniform, service)
        assert result.serving == node.serving
        assert close(result.link_bandwidth_mbps, node.link_bandwidth_mbps)


@given(fleets(), st.data())
def test_a_services_own_drain_and_health_never_change_its_share_on_that_node(
    fleet: Fleet, data: st.DataObject
) -> None:
    """As for nodes: the number a node holds for a service is computed as if it served it."""
    desired, health = fleet
    if not desired.nodes:
        return
    name = data.draw(st.sampled_from(sorted(desired.nodes)))
    service = data.draw(st.sampled_from(SERVICES))
    before = service_shares(desired, health, service).link_bandwidth_mbps[name]
    undrained = without(
        desired, lambda d: not (d.kind is DrainKind.NODE and d.name == name and d.service)
    )
    observed = health.get(name)
    if observed is not None and observed.services is not None and service in observed.services:
        state = data.draw(st.sampled_from(list(ServiceState)))
        health = {
            **health,
            name: NodeHealth(
                observed.liveness, observed.state, {**observed.services, service: state}
            ),
        }
    after = service_shares(undrained, health, service).link_bandwidth_mbps[name]
    assert math.isclose(before, after, rel_tol=1e-9, abs_tol=1e-9)


def test_a_service_drain_moves_that_services_traffic_to_the_other_site() -> None:
    up = {"web": ServiceState.HEALTHY, "dns": ServiceState.HEALTHY}
    desired = DesiredState(
        sites={"a": SiteSpec(), "b": SiteSpec()},
        nodes={"a1": NodeSpec(site="a"), "b1": NodeSpec(site="b")},
        services=SPECS,
        drains=[drain(DrainKind.SITE, "a", "web")],
    )
    health = {n: NodeHealth(Liveness.ALIVE, NodeState.HEALTHY, up) for n in ("a1", "b1")}
    web, dns = service_shares(desired, health, "web"), service_shares(desired, health, "dns")
    assert web.nodes == {"a1": 0.0, "b1": 1000.0}
    assert dns.nodes == {"a1": 500.0, "b1": 500.0}
    assert shares(desired, health).nodes == {"a1": 500.0, "b1": 500.0}
    reason = service_drained_nodes(desired, "web")["a1"]
    assert (reason.source, reason.reason) == (DrainKind.SITE, "service web drained on site a: r")


def test_service_weights_split_only_their_service() -> None:
    desired = DesiredState(
        sites={"a": SiteSpec(), "b": SiteSpec()},
        nodes={"a1": NodeSpec(site="a"), "b1": NodeSpec(site="b")},
        services=SPECS,
        service_weights={"web": ServiceWeights(sites={"a": 300})},
    )
    health = {n: NodeHealth(Liveness.ALIVE, NodeState.HEALTHY) for n in ("a1", "b1")}
    assert service_shares(desired, health, "web").nodes == {"a1": 750.0, "b1": 250.0}
    assert service_shares(desired, health, "dns").nodes == {"a1": 500.0, "b1": 500.0}


def test_a_node_that_does_not_carry_a_service_counts_for_nothing_in_it() -> None:
    desired = DesiredState(
        sites={"a": SiteSpec()},
        nodes={"a1": NodeSpec(site="a"), "a2": NodeSpec(site="a")},
        services=SPECS,
    )
    health = {
        "a1": NodeHealth(Liveness.ALIVE, NodeState.HEALTHY, {"web": ServiceState.HEALTHY}),
        "a2": NodeHealth(
            Liveness.ALIVE,
            NodeState.HEALTHY,
            {"web": ServiceState.DOWN, "dns": ServiceState.HEALTHY},
        ),
    }
    assert service_shares(desired, health, "web").nodes == {"a1": 1000.0, "a2": 0.0}
    # a2's web is down: it keeps its share as if serving (the node acts on its own health)
    assert service_shares(desired, health, "web").link_bandwidth_mbps["a2"] == 500.0
    assert service_shares(desired, health, "dns").nodes == {"a1": 0.0, "a2": 1000.0}
