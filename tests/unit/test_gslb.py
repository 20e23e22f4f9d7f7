"""Property tests of the effective-weight math (api.gslb)."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from api.gslb import NodeHealth, drained_nodes, effective_weights
from contract.schemas import (
    EFFECTIVE_WEIGHT_TOTAL,
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


@given(fleets())
def test_weights_are_never_negative_and_finite(
    fleet: tuple[DesiredState, dict[str, NodeHealth]],
) -> None:
    result = effective_weights(*fleet)
    assert set(result.nodes) == set(fleet[0].nodes)
    for weight in [*result.nodes.values(), *result.sites.values()]:
        assert weight >= 0
        assert math.isfinite(weight)


@given(fleets())
def test_drained_node_gets_zero(fleet: tuple[DesiredState, dict[str, NodeHealth]]) -> None:
    desired, health = fleet
    result = effective_weights(desired, health)
    for name in drained_nodes(desired):
        assert result.nodes[name] == 0


@given(fleets())
def test_sum_of_shares_is_constant_when_any_node_can_take_traffic(
    fleet: tuple[DesiredState, dict[str, NodeHealth]],
) -> None:
    result = effective_weights(*fleet)
    total = sum(result.nodes.values())
    if any(w > 0 for w in result.nodes.values()):
        assert math.isclose(total, EFFECTIVE_WEIGHT_TOTAL, rel_tol=1e-9)
    else:
        assert total == 0


@given(fleets())
def test_dead_or_unknown_nodes_get_zero(fleet: tuple[DesiredState, dict[str, NodeHealth]]) -> None:
    desired, health = fleet
    result = effective_weights(desired, health)
    for name in desired.nodes:
        observed = health.get(name)
        if observed is None or observed.liveness is not Liveness.ALIVE:
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
    all_up = {n: NodeHealth(Liveness.ALIVE, NodeState.HEALTHY) for n in nodes}
    half_a_dead = dict(all_up)
    for i in range(nodes_per_site // 2):
        half_a_dead[f"a{i}"] = NodeHealth(Liveness.DEAD, NodeState.HEALTHY)

    before = effective_weights(desired, all_up).sites
    after = effective_weights(desired, half_a_dead).sites
    # Relative to the untouched site, a's share halves (the total stays constant, so the
    # absolute numbers are renormalised).
    assert math.isclose(after["a"] / after["b"], 0.5 * before["a"] / before["b"], rel_tol=1e-9)
    # Each surviving node of a keeps the same load relative to a node of b: the half that is
    # left is not asked to carry the whole site's traffic.
    nodes_before = effective_weights(desired, all_up).nodes
    nodes_after = effective_weights(desired, half_a_dead).nodes
    last = f"a{nodes_per_site - 1}"
    assert math.isclose(
        nodes_after[last] / nodes_after["b0"], nodes_before[last] / nodes_before["b0"], rel_tol=1e-9
    )


def test_operator_weights_split_sites_proportionally() -> None:
    desired = DesiredState(
        sites={"a": SiteSpec(weight=3), "b": SiteSpec(weight=1)},
        nodes={"a1": NodeSpec(site="a"), "b1": NodeSpec(site="b"), "b2": NodeSpec(site="b")},
    )
    health = {n: NodeHealth(Liveness.ALIVE, NodeState.HEALTHY) for n in desired.nodes}
    result = effective_weights(desired, health)
    assert result.nodes == {"a1": 750.0, "b1": 125.0, "b2": 125.0}


def test_degraded_node_counts_half_within_its_site() -> None:
    desired = DesiredState(
        sites={"a": SiteSpec()}, nodes={"a1": NodeSpec(site="a"), "a2": NodeSpec(site="a")}
    )
    health = {
        "a1": NodeHealth(Liveness.ALIVE, NodeState.HEALTHY),
        "a2": NodeHealth(Liveness.ALIVE, NodeState.DEGRADED),
    }
    result = effective_weights(desired, health)
    assert math.isclose(result.nodes["a1"], 2 * result.nodes["a2"])
