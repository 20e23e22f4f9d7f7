"""The GSLB's weight-change gate (api/flowsync.py): cases, and hypothesis for what must
always hold: never waits beyond the bound, proceeds at once when every alive node reports
its flow tables in sync, a node that reports nothing (or a dead one) never holds a change
beyond the bound, and a fleet without flow sharing never waits."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from api.flowsync import Sync, judge, moves_shares
from contract.schemas import (
    BgpSession,
    DesiredState,
    FlowSharePeerReport,
    FlowShareReport,
    Heartbeat,
    Liveness,
    NodeObserved,
    NodeSpec,
    NodeState,
    ServiceWeights,
    SiteSpec,
    VipGroupReport,
    VipRole,
)

NAMES = ("a1", "a2", "b1", "b2")


def node(
    name: str,
    peers: dict[str, bool] | None,
    liveness: Liveness = Liveness.ALIVE,
    lag_ms: float = 0.0,
) -> NodeObserved:
    report = (
        None
        if peers is None
        else FlowShareReport(
            forwarding="on",
            peers=[
                FlowSharePeerReport(peer=p, synced=s, lag_ms=0.0 if s else lag_ms)
                for p, s in peers.items()
            ],
        )
    )
    return NodeObserved(
        node=name,
        liveness=liveness,
        heartbeat=Heartbeat(state=NodeState.HEALTHY, flowshare=report),
    )


def fleet(*records: NodeObserved) -> dict[str, NodeObserved]:
    return {r.node: r for r in records}


def test_all_in_sync_proceeds_at_once() -> None:
    observed = fleet(node("a1", {"a2": True}), node("a2", {"a1": True}))
    verdict = judge(observed, 0.0, 3.0)
    assert verdict.sync is Sync.IN_SYNC and verdict.proceed
    assert verdict.sharing == ("a1", "a2")
    assert verdict.describe() == "flow tables in sync on 2 node(s) after 0.000 s: applied"


def test_out_of_sync_waits_then_proceeds_after_the_bound_naming_who() -> None:
    observed = fleet(node("a1", {"a2": False}, lag_ms=250.0), node("a2", {"a1": True}))
    waiting = judge(observed, 1.0, 3.0)
    assert waiting.sync is Sync.WAIT and not waiting.proceed
    after = judge(observed, 3.0, 3.0)
    assert after.sync is Sync.BOUND and after.proceed
    assert [str(o) for o in after.out_of_sync] == ["a1 (peers a2; lag 250 ms)"]
    assert after.describe() == (
        "flow tables not in sync after 3.000 s (bound 3 s), applied after the bound: "
        "out of sync: a1 (peers a2; lag 250 ms)"
    )


def test_no_report_anywhere_is_no_flow_sharing() -> None:
    observed = fleet(node("a1", None), node("a2", None))
    assert judge(observed, 0.0, 3.0).sync is Sync.NOT_SHARING


def test_a_node_without_a_report_among_sharing_ones_is_unknown_and_bounded() -> None:
    observed = fleet(node("a1", {"a2": True}), node("a2", None))  # e.g. a contract-2 agent
    assert judge(observed, 0.5, 3.0).sync is Sync.WAIT
    after = judge(observed, 3.5, 3.0)
    assert after.sync is Sync.BOUND and after.unknown == ("a2",)
    assert "no flow-sharing report from a2" in after.describe()


def test_an_active_passive_node_without_bgp_is_not_waited_for() -> None:
    """The lab's site-c pair (vip_group, no BGP, no flow sharing) takes no anycast flow: a
    weight change of the anycast sites does not wait the bound for it."""
    group = VipGroupReport(group="site-c", vip="198.18.40.100/24", role=VipRole.ACTIVE)
    pair = NodeObserved(
        node="c1",
        liveness=Liveness.ALIVE,
        heartbeat=Heartbeat(state=NodeState.HEALTHY, vip_group=group),
    )
    observed = fleet(node("a1", {"a2": True}), node("a2", {"a1": True}), pair)
    verdict = judge(observed, 0.0, 3.0)
    assert verdict.sync is Sync.IN_SYNC and verdict.unknown == ()
    # With BGP sessions of its own it could take anycast flows: unknown, as before.
    session = BgpSession(peer="198.18.40.1", state="Established")
    announcing = pair.model_copy(
        update={"heartbeat": pair.heartbeat.model_copy(update={"bgp_sessions": [session]})}
        if pair.heartbeat
        else {}
    )
    assert judge(fleet(node("a1", {}), announcing), 0.5, 3.0).unknown == ("c1",)


def test_dead_nodes_and_dead_peers_are_not_waited_for() -> None:
    observed = fleet(
        node("a1", {"a2": True, "b1": False}),
        node("a2", {"a1": True, "b1": False}),
        node("b1", {"a1": False}, Liveness.DEAD),
        node("b2", None, Liveness.UNKNOWN),
    )
    assert judge(observed, 0.0, 3.0).sync is Sync.IN_SYNC


def test_a_peer_the_gslb_does_not_know_counts() -> None:
    observed = fleet(node("a1", {"x9": False}))
    assert judge(observed, 0.0, 3.0).sync is Sync.WAIT


def test_what_counts_as_a_weight_change() -> None:
    base = DesiredState(sites={"a": SiteSpec()}, nodes={"a1": NodeSpec(site="a")}, services={})
    assert not moves_shares(base, base.model_copy(update={"revision": 7}))
    sites = {"a": SiteSpec(weight=300)}
    assert moves_shares(base, base.model_copy(update={"sites": sites}))
    nodes = {"a1": NodeSpec(site="a", capacity_mbps=10)}
    assert moves_shares(base, base.model_copy(update={"nodes": nodes}))
    per_service = {"web": ServiceWeights(sites={"a": 5})}
    assert moves_shares(base, base.model_copy(update={"service_weights": per_service}))
    # A new node or site is no weight change of what exists (its shares start at its join).
    grown = {"a1": NodeSpec(site="a"), "a2": NodeSpec(site="a")}
    assert not moves_shares(base, base.model_copy(update={"nodes": grown}))


peer_maps = st.dictionaries(st.sampled_from(NAMES), st.booleans(), max_size=4)
records = st.builds(
    lambda name, peers, liveness, lag: node(name, peers, liveness, lag),
    st.sampled_from(NAMES),
    st.none() | peer_maps,
    st.sampled_from(list(Liveness)),
    st.floats(0, 10_000, allow_nan=False),
)
fleets = st.lists(records, max_size=6).map(lambda rs: fleet(*rs))
times = st.floats(0, 100, allow_nan=False)
bounds = st.floats(0, 60, allow_nan=False)


@given(fleets, times, bounds)
def test_never_waits_beyond_the_bound(
    observed: dict[str, NodeObserved], t: float, b: float
) -> None:
    if t >= b:
        assert judge(observed, t, b).proceed


@given(fleets, times, bounds)
def test_waits_only_for_someone_it_can_name(
    observed: dict[str, NodeObserved], t: float, b: float
) -> None:
    verdict = judge(observed, t, b)
    if verdict.sync in (Sync.WAIT, Sync.BOUND):
        assert verdict.out_of_sync or verdict.unknown
        named = {o.node for o in verdict.out_of_sync} | set(verdict.unknown)
        assert all(observed[n].liveness is Liveness.ALIVE for n in named)


@given(st.lists(st.sampled_from(NAMES), unique=True, min_size=1), times, bounds)
def test_proceeds_at_once_when_every_alive_node_reports_in_sync(
    names: list[str], t: float, b: float
) -> None:
    observed = fleet(*(node(n, {p: True for p in names if p != n}) for n in names))
    assert judge(observed, t, b).sync is Sync.IN_SYNC


@given(fleets, times, bounds)
def test_a_fleet_where_no_alive_node_reports_never_waits(
    observed: dict[str, NodeObserved], t: float, b: float
) -> None:
    silent = {
        n: node(n, None, r.liveness) if r.liveness is Liveness.ALIVE else r
        for n, r in observed.items()
    }
    assert judge(silent, t, b).sync is Sync.NOT_SHARING


@given(fleets, times, bounds, st.sampled_from(NAMES))
def test_a_node_that_reports_nothing_delays_no_more_than_the_bound(
    observed: dict[str, NodeObserved], t: float, b: float, quiet: str
) -> None:
    observed = {**observed, quiet: node(quiet, None)}
    verdict = judge(observed, t, b)
    assert verdict.proceed or t < b
    if verdict.sync is not Sync.NOT_SHARING:
        assert verdict.sync is not Sync.IN_SYNC and quiet in verdict.unknown
