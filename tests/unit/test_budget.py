"""The disruption budget (api/budget.py): examples, and the rules that must always hold."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from api.budget import FLEET, Budget, Limits, describe, judge, tallies
from contract.schemas import (
    BudgetBound,
    DesiredState,
    Drain,
    DrainKind,
    NodeSpec,
    NodeState,
    ServiceSpec,
    ServiceState,
    SiteSpec,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def drain(kind: DrainKind, name: str) -> Drain:
    return Drain(kind=kind, name=name, reason="test", author="t", since=NOW)


def fleet(**drained: DrainKind) -> DesiredState:
    """Site a: a1, a2 (1000 each); site b: b1 (1000)."""
    return DesiredState(
        sites={"a": SiteSpec(), "b": SiteSpec()},
        nodes={
            "a1": NodeSpec(site="a"),
            "a2": NodeSpec(site="a"),
            "b1": NodeSpec(site="b"),
        },
        drains=[drain(kind, name) for name, kind in drained.items()],
    )


ALL = {n: NodeState.HEALTHY for n in ("a1", "a2", "b1")}
DEFAULT = Budget()


def test_a_node_that_drains_itself_stays_counted_as_out() -> None:
    # a1 drained and reporting draining (what the agent does): still healthy capacity, out.
    alive = {**ALL, "a1": NodeState.DRAINING}
    breach, _ = judge(
        fleet(a1=DrainKind.NODE), fleet(a1=DrainKind.NODE, a2=DrainKind.NODE), alive, DEFAULT
    )
    assert (breach.scope, breach.healthy_mbps, breach.in_service_mbps) == ("site a", 2000, 1000)


def test_one_node_of_a_site_may_go_the_second_may_not() -> None:
    assert judge(fleet(), fleet(a1=DrainKind.NODE), ALL, DEFAULT) == []
    breach, fleet_breach = judge(
        fleet(a1=DrainKind.NODE), fleet(a1=DrainKind.NODE, a2=DrainKind.NODE), ALL, DEFAULT
    )
    assert fleet_breach.scope == FLEET  # 1000 of 3000 would be left
    assert breach.scope == "site a" and breach.bound is BudgetBound.MIN_SHARE
    assert (breach.healthy_mbps, breach.in_service_mbps, breach.would_leave_mbps) == (
        2000,
        1000,
        0,
    )
    assert breach.min_in_service_mbps == 1000
    assert describe(breach) == (
        "site a: 1000 of 2000 Mbit/s healthy capacity in service, this would leave 0; "
        "at least 1000 (50%) must stay"
    )


def test_a_site_drain_is_judged_by_the_fleet() -> None:
    # Site a is 2000 of 3000: draining it leaves 1000 < 1500.
    [breach] = judge(fleet(), fleet(a=DrainKind.SITE), ALL, DEFAULT)
    assert breach.scope == FLEET
    # Site b is 1000 of 3000: draining it leaves 2000, allowed; its own site bound is moot.
    assert judge(fleet(), fleet(b=DrainKind.SITE), ALL, DEFAULT) == []


def test_max_out_counts_nodes() -> None:
    budget = Budget(site=Limits(min_share=0.0), fleet=Limits(min_share=0.0, max_out=1))
    assert judge(fleet(), fleet(a1=DrainKind.NODE), ALL, budget) == []
    [breach] = judge(
        fleet(a1=DrainKind.NODE), fleet(a1=DrainKind.NODE, b1=DrainKind.NODE), ALL, budget
    )
    assert (breach.bound, breach.out, breach.would_be_out, breach.max_out) == (
        BudgetBound.MAX_OUT,
        1,
        2,
        1,
    )


def test_dead_nodes_are_not_protected_and_a_weight_of_zero_takes_a_node_out() -> None:
    assert (
        judge(
            fleet(),
            fleet(a=DrainKind.SITE),
            {"b1": NodeState.HEALTHY, "a1": NodeState.DOWN},
            DEFAULT,
        )
        == []
    )
    before = fleet(a1=DrainKind.NODE)
    nodes = {**before.nodes, "a2": NodeSpec(site="a", weight=0)}
    [site_breach, _] = judge(before, before.model_copy(update={"nodes": nodes}), ALL, DEFAULT)
    assert site_breach.scope == "site a"


def test_withdrawing_the_last_served_prefix_needs_an_override() -> None:
    web = ServiceSpec.model_validate({"prefix": "198.51.100.10/32"})
    probe = ServiceSpec.model_validate({"prefix": "198.51.100.11/32"})
    one = fleet().model_copy(update={"services": {"web": web}})
    two = fleet().model_copy(update={"services": {"web": web, "probe": probe}})
    [breach] = judge(one, fleet(), ALL, DEFAULT)
    assert breach.scope == "service web" and breach.bound is BudgetBound.SERVICE
    assert judge(one, fleet(), {}, DEFAULT) == []  # nothing in service anyway
    assert judge(two, one, ALL, DEFAULT) == []  # web still served


# --- properties ------------------------------------------------------------------------

NODES = [f"n{i}" for i in range(6)]


@st.composite
def fleets(draw: st.DrawFn) -> tuple[DesiredState, dict[str, NodeState]]:
    sites = draw(st.lists(st.sampled_from("abc"), min_size=1, max_size=3, unique=True))
    nodes = {
        name: NodeSpec(
            site=draw(st.sampled_from(sites)),
            capacity_mbps=draw(st.integers(0, 1000)),
            weight=draw(st.sampled_from([0, 1, 100])),
        )
        for name in draw(st.lists(st.sampled_from(NODES), min_size=1, unique=True))
    }
    drains = [drain(DrainKind.NODE, n) for n in nodes if draw(st.booleans())]
    drains += [drain(DrainKind.SITE, s) for s in sites if draw(st.integers(0, 4)) == 0]
    state = DesiredState(
        sites={s: SiteSpec(weight=draw(st.sampled_from([0, 100]))) for s in sites},
        nodes=nodes,
        drains=drains,
    )
    alive = {n: draw(st.sampled_from(NodeState)) for n in nodes if draw(st.booleans())}
    return state, alive


budgets = st.builds(
    Budget,
    site=st.builds(Limits, st.floats(0, 1), st.none() | st.integers(0, 3)),
    fleet=st.builds(Limits, st.floats(0, 1), st.none() | st.integers(0, 3)),
)


def _without_drain(state: DesiredState, index: int) -> DesiredState:
    drains = [d for i, d in enumerate(state.drains) if i != index]
    return state.model_copy(update={"drains": drains})


@given(fleets(), budgets)
def test_changing_nothing_is_always_allowed(
    case: tuple[DesiredState, dict[str, NodeState]], budget: Budget
) -> None:
    state, healthy = case
    assert judge(state, state, healthy, budget) == []


@given(fleets(), budgets, st.integers(0, 10))
def test_an_undrain_is_never_refused(
    case: tuple[DesiredState, dict[str, NodeState]], budget: Budget, index: int
) -> None:
    state, healthy = case
    if state.drains:
        assert judge(state, _without_drain(state, index % len(state.drains)), healthy, budget) == []


@given(fleets(), budgets, st.sampled_from(NODES))
def test_a_refused_drain_makes_a_bound_worse_and_leaves_it_broken(
    case: tuple[DesiredState, dict[str, NodeState]], budget: Budget, node: str
) -> None:
    state, healthy = case
    if node not in state.nodes:
        return
    after = state.model_copy(update={"drains": [*state.drains, drain(DrainKind.NODE, node)]})
    was, will = tallies(state, healthy), tallies(after, healthy)
    for breach in judge(state, after, healthy, budget):
        scope = FLEET if breach.scope == FLEET else breach.scope.removeprefix("site ")
        limits = budget.fleet if scope == FLEET else budget.site
        if breach.bound is BudgetBound.MIN_SHARE:
            assert will[scope].in_service_mbps < was[scope].in_service_mbps
            assert will[scope].in_service_mbps < limits.min_share * will[scope].healthy_mbps
        else:
            assert limits.max_out is not None
            assert will[scope].out > max(limits.max_out, was[scope].out)


@given(fleets(), st.floats(0.01, 1))
def test_the_fleet_cannot_be_emptied_one_drain_at_a_time(
    case: tuple[DesiredState, dict[str, NodeState]], share: float
) -> None:
    """Drain every node one after the other, keeping only what the budget allows: healthy
    capacity that was in service never all goes."""
    state, healthy = case
    budget = Budget(site=Limits(min_share=share), fleet=Limits(min_share=share))
    start = tallies(state, healthy)[FLEET]
    for node in sorted(state.nodes):
        after = state.model_copy(update={"drains": [*state.drains, drain(DrainKind.NODE, node)]})
        if not judge(state, after, healthy, budget):
            state = after
    if start.in_service_mbps > 0:
        assert tallies(state, healthy)[FLEET].in_service_mbps > 0


# -- per service ------------------------------------------------------------------------


def with_services(state: DesiredState, *drains: Drain) -> DesiredState:
    services = {
        "web": ServiceSpec(prefix="198.51.100.10/32"),
        "dns": ServiceSpec(prefix="198.51.100.53/32"),
    }
    return state.model_copy(update={"services": services, "drains": [*state.drains, *drains]})


def service_drain(kind: DrainKind, name: str, service: str) -> Drain:
    return Drain(kind=kind, name=name, reason="test", author="t", since=NOW, service=service)


def test_service_drains_count_against_that_services_budget_only() -> None:
    one = with_services(fleet(), service_drain(DrainKind.NODE, "a1", "web"))
    assert judge(with_services(fleet()), one, ALL, DEFAULT) == []
    two = with_services(
        fleet(),
        service_drain(DrainKind.NODE, "a1", "web"),
        service_drain(DrainKind.NODE, "a2", "web"),
    )
    breaches = judge(one, two, ALL, DEFAULT)
    # Site a would serve web with 0 of its 2000 Mbit/s (and the fleet with 1000 of 3000);
    # dns and the nodes themselves are untouched.
    assert [(b.scope, b.bound) for b in breaches] == [
        ("service web site a", BudgetBound.MIN_SHARE),
        ("service web", BudgetBound.MIN_SHARE),
    ]
    assert (breaches[0].in_service_mbps, breaches[0].would_leave_mbps) == (1000, 0)
    other = with_services(
        fleet(),
        service_drain(DrainKind.NODE, "a1", "web"),
        service_drain(DrainKind.NODE, "a2", "dns"),
    )
    assert judge(one, other, ALL, DEFAULT) == []


def test_a_service_site_drain_is_judged_by_the_services_fleet_bound() -> None:
    drained = with_services(fleet(), service_drain(DrainKind.SITE, "a", "web"))
    [breach] = judge(with_services(fleet()), drained, ALL, DEFAULT)
    assert (breach.scope, breach.would_leave_mbps, breach.healthy_mbps) == (
        "service web",
        1000,
        3000,
    )


def test_a_node_drain_is_one_breach_not_one_per_service() -> None:
    before = with_services(fleet(a1=DrainKind.NODE))
    after = with_services(fleet(a1=DrainKind.NODE, a2=DrainKind.NODE))
    assert [b.scope for b in judge(before, after, ALL, DEFAULT)] == ["site a", FLEET]


def test_a_service_counts_only_the_nodes_that_serve_it() -> None:
    # b1 does not carry web: web's healthy capacity is site a's 2000, and a1 alone may go.
    services = {
        "a1": {"web": ServiceState.HEALTHY, "dns": ServiceState.HEALTHY},
        "a2": {"web": ServiceState.HEALTHY, "dns": ServiceState.HEALTHY},
        "b1": {"dns": ServiceState.HEALTHY},
    }
    web = tallies(with_services(fleet()), ALL, "web", services)
    assert (web[FLEET].healthy_mbps, web[FLEET].in_service_mbps) == (2000, 2000)
    one = with_services(fleet(), service_drain(DrainKind.NODE, "a1", "web"))
    [breach] = judge(with_services(fleet()), one, ALL, Budget(site=Limits(min_share=0.6)), services)
    assert breach.scope == "service web site a"
