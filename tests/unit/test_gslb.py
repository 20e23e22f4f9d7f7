"""Property tests of the share math (api.gslb): one unit (link-bandwidth Mbit/s), as if serving."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from api.gslb import SERVING_STATES, NodeHealth, drained_nodes, serving_nodes, shares
from contract.schemas import (
    FLEET_LINK_BANDWIDTH_MBPS,
    DesiredState,
    Drain,
    DrainKind,
    Liveness,
    NodeSpec,
    NodeState,
    SiteSpec,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
healths = st.builds(
    NodeHealth,
    liveness=st.sampled_from(list(Liveness)),
    state=st.none() | st.sampled_from(list(NodeState)),
)


@st.composite
def fleets(draw: st.DrawFn) -> tuple[DesiredState, dict[str, NodeHealth]]:
    site_names = draw(st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, unique=True))
    sites = {
        s: SiteSpec(weight=draw(st.integers(0, 1000)), capacity_mbps=draw(st.integers(0, 10_000)))
        for s in site_names
    }
    nodes: dict[str, NodeSpec] = {}
    for i in range(draw(st.integers(0, 8))):
        nodes[f"n{i}"] = NodeSpec(
            site=draw(st.sampled_from(site_names)),
            weight=draw(st.integers(0, 1000)),
            capacity_mbps=draw(st.integers(0, 100_000)),
        )
    drains = [
        Drain(kind=DrainKind.NODE, name=n, reason="r", author="t", since=NOW)
        for n in nodes
        if draw(st.booleans()) and draw(st.booleans())
    ]
    if draw(st.booleans()) and draw(st.booleans()):
        drains.append(
            Drain(
                kind=DrainKind.SITE,
                name=draw(st.sampled_from(site_names)),
                reason="r",
                author="t",
                since=NOW,
            )
        )
    health = {n: draw(healths) for n in nodes if draw(st.integers(0, 9)) > 0}
    return DesiredState(sites=sites, nodes=nodes, drains=drains), health


Fleet = tuple[DesiredState, dict[str, NodeHealth]]
UP = NodeHealth(Liveness.ALIVE, NodeState.HEALTHY)


@given(fleets())
def test_shares_are_never_negative_and_finite(fleet: Fleet) -> None:
    desired, health = fleet
    result = shares(desired, health)
    assert set(result.link_bandwidth_mbps) == set(desired.nodes)
    for mbps in [*result.link_bandwidth_mbps.values(), *result.sites(desired).values()]:
        assert mbps >= 0
        assert math.isfinite(mbps)


@given(fleets(), st.data())
def test_a_nodes_own_health_and_drain_never_change_its_share(
    fleet: Fleet, data: st.DataObject
) -> None:
    """The node acts on its own health (and drain); the number it holds stays put."""
    desired, health = fleet
    if not desired.nodes:
        return
    name = data.draw(st.sampled_from(sorted(desired.nodes)))
    other = data.draw(healths)
    undrained = desired.model_copy(
        update={"drains": [d for d in desired.drains if (d.kind, d.name) != (DrainKind.NODE, name)]}
    )
    before = shares(desired, health).link_bandwidth_mbps[name]
    assert math.isclose(
        shares(undrained, {**health, name: other}).link_bandwidth_mbps[name], before, abs_tol=1e-9
    )


@given(fleets())
def test_each_share_is_the_fleet_computed_with_that_node_serving(fleet: Fleet) -> None:
    """The closed form equals the brute force: make the node serve, recompute, read its part."""
    desired, health = fleet
    site_drains = {d.name for d in desired.drains if d.kind is DrainKind.SITE}
    result = shares(desired, health)
    for name, spec in desired.nodes.items():
        if spec.site in site_drains:
            continue
        serving = desired.model_copy(
            update={
                "drains": [d for d in desired.drains if (d.kind, d.name) != (DrainKind.NODE, name)]
            }
        )
        brute = shares(serving, {**health, name: UP}).nodes[name]
        assert math.isclose(result.link_bandwidth_mbps[name], brute, rel_tol=1e-9, abs_tol=1e-9)


@given(fleets())
def test_serving_nodes_announce_the_fleet_total_between_them(fleet: Fleet) -> None:
    result = shares(*fleet)
    total = sum(result.nodes.values())
    if result.serving:
        assert math.isclose(total, FLEET_LINK_BANDWIDTH_MBPS, rel_tol=1e-9)
    else:
        assert total == 0


@given(fleets())
def test_only_live_undrained_serving_nodes_take_traffic_now(fleet: Fleet) -> None:
    desired, health = fleet
    result = shares(desired, health)
    drained = drained_nodes(desired)
    assert result.serving == serving_nodes(desired, health, drained)
    for name in desired.nodes:
        observed = health.get(name)
        if (
            name in drained
            or observed is None
            or observed.liveness is not Liveness.ALIVE
            or observed.state not in SERVING_STATES
        ):
            assert result.nodes[name] == 0


@settings(max_examples=60)
@given(
    nodes_per_site=st.integers(1, 6).map(lambda n: 2 * n),
    weight_a=st.integers(1, 1000),
    weight_b=st.integers(1, 1000),
)
def test_site_that_loses_half_its_nodes_gets_half_its_share(
    nodes_per_site: int, weight_a: int, weight_b: int
) -> None:
    sites = {"a": SiteSpec(weight=weight_a), "b": SiteSpec(weight=weight_b)}
    nodes = {f"{s}{i}": NodeSpec(site=s) for s in sites for i in range(nodes_per_site)}
    desired = DesiredState(sites=sites, nodes=nodes)
    all_up = dict.fromkeys(nodes, UP)
    half_a_dead = dict(all_up)
    for i in range(nodes_per_site // 2):
        half_a_dead[f"a{i}"] = NodeHealth(Liveness.DEAD, NodeState.HEALTHY)

    before = shares(desired, all_up).sites(desired)
    after = shares(desired, half_a_dead).sites(desired)
    # Relative to the untouched site, a's share halves (the total stays constant, so the
    # absolute numbers are renormalised).
    assert math.isclose(after["a"] / after["b"], 0.5 * before["a"] / before["b"], rel_tol=1e-9)
    # Each surviving node of a keeps the same load relative to a node of b: the half that is
    # left is not asked to carry the whole site's traffic.
    nodes_before = shares(desired, all_up).nodes
    nodes_after = shares(desired, half_a_dead).nodes
    last = f"a{nodes_per_site - 1}"
    assert math.isclose(
        nodes_after[last] / nodes_after["b0"], nodes_before[last] / nodes_before["b0"], rel_tol=1e-9
    )


def test_operator_weights_split_sites_proportionally() -> None:
    desired = DesiredState(
        sites={"a": SiteSpec(weight=3), "b": SiteSpec(weight=1)},
        nodes={"a1": NodeSpec(site="a"), "b1": NodeSpec(site="b"), "b2": NodeSpec(site="b")},
    )
    health = dict.fromkeys(desired.nodes, UP)
    result = shares(desired, health)
    assert result.nodes == {"a1": 750.0, "b1": 125.0, "b2": 125.0}


def test_a_down_node_keeps_its_share_and_the_others_take_its_traffic() -> None:
    """edge1 300 : edge2 100. edge1 down: edge2 carries everything (1000), edge1 holds 750
    (what it announces the moment it is back, API or not)."""
    desired = DesiredState(
        sites={"lab": SiteSpec()},
        nodes={"e1": NodeSpec(site="lab", weight=300), "e2": NodeSpec(site="lab", weight=100)},
    )
    result = shares(desired, {"e1": NodeHealth(Liveness.ALIVE, NodeState.DOWN), "e2": UP})
    assert result.link_bandwidth_mbps == {"e1": 750.0, "e2": 1000.0}
    assert result.nodes == {"e1": 0.0, "e2": 1000.0}


def test_degraded_counts_as_serving_in_full_the_edge_reduces_it() -> None:
    desired = DesiredState(
        sites={"a": SiteSpec()}, nodes={"a1": NodeSpec(site="a"), "a2": NodeSpec(site="a")}
    )
    health = {"a1": UP, "a2": NodeHealth(Liveness.ALIVE, NodeState.DEGRADED)}
    result = shares(desired, health)
    assert result.nodes == {"a1": 500.0, "a2": 500.0}


def test_serving_sites_that_all_weigh_0_still_carry_the_fleet() -> None:
    """Hypothesis found it: site a weighs 0 (meant to take no traffic) and the only other
    site's nodes are dead. The serving nodes split the fleet by capacity instead of all
    announcing 0 Mbit/s (a withdraw: the whole prefix dark); once b serves, a takes none."""
    desired = DesiredState(
        sites={"a": SiteSpec(weight=0, capacity_mbps=0), "b": SiteSpec(weight=1)},
        nodes={
            "a1": NodeSpec(site="a", capacity_mbps=300),
            "a2": NodeSpec(site="a", capacity_mbps=100),
            "b1": NodeSpec(site="b", capacity_mbps=100),
        },
    )
    dead = NodeHealth(Liveness.DEAD, NodeState.HEALTHY)
    alone = shares(desired, {"a1": UP, "a2": UP, "b1": dead})
    assert alone.nodes == {"a1": 750.0, "a2": 250.0, "b1": 0.0}
    assert shares(desired, {"a1": UP, "a2": UP, "b1": UP}).nodes == {
        "a1": 0.0,
        "a2": 0.0,
        "b1": 1000.0,
    }
