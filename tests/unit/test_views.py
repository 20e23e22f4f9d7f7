"""Published views (api.views): node view fingerprints and convergence. Pure, no I/O."""

from __future__ import annotations

from datetime import UTC, datetime

from api.views import (
    build_snapshot,
    convergence_view,
    node_view,
    node_view_json,
    observed_view,
)
from contract.schemas import (
    AdminState,
    DesiredState,
    Drain,
    DrainKind,
    Heartbeat,
    Liveness,
    NodeObserved,
    NodeSpec,
    NodeState,
    SiteSpec,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
DESIRED = DesiredState(
    revision=9,
    sites={"a": SiteSpec(), "b": SiteSpec()},
    nodes={"a1": NodeSpec(site="a"), "a2": NodeSpec(site="a"), "b1": NodeSpec(site="b")},
)


def seen(node: str, applied: int, liveness: Liveness = Liveness.ALIVE) -> NodeObserved:
    return NodeObserved(
        node=node,
        liveness=liveness,
        last_seen=NOW,
        heartbeat=Heartbeat(state=NodeState.HEALTHY, applied_revision=applied),
    )


def test_fingerprint_moves_with_other_nodes_health_without_a_revision() -> None:
    all_up = {n: seen(n, 9) for n in DESIRED.nodes}
    before = node_view(build_snapshot(DESIRED, all_up, 0, 0.0), "a1")
    b1_dead = {**all_up, "b1": seen("b1", 9, Liveness.DEAD)}
    after = node_view(build_snapshot(DESIRED, b1_dead, 1, 0.0), "a1")
    assert before is not None and after is not None
    assert before.revision == after.revision
    assert after.link_bandwidth_mbps > before.link_bandwidth_mbps
    assert after.fingerprint != before.fingerprint
    same = node_view(build_snapshot(DESIRED, all_up, 2, 0.0), "a1")
    assert same == before
    assert node_view(build_snapshot(DESIRED, all_up, 0, 0.0), "nope") is None


def test_drained_site_shows_in_each_node_view() -> None:
    drained = DESIRED.model_copy(
        update={
            "drains": [
                Drain(kind=DrainKind.SITE, name="a", reason="power", author="ops", since=NOW)
            ]
        }
    )
    observed = {n: seen(n, 9) for n in DESIRED.nodes}
    view = node_view(build_snapshot(drained, observed, 0, 0.0), "a2")
    # Whether to serve and how much, apart: drained, and still the share it would have.
    assert view is not None and view.admin_state is AdminState.DRAINING
    assert view.drain_source is DrainKind.SITE and "power" in view.drain_reason
    # As if a2 served: the one serving node of a (a1 is drained with the site): a's raw
    # share 1/2 against b's 1, so a third of the fleet's 1000.
    assert view.link_bandwidth_mbps == 333.333
    # Once the node reports it is down (its drain finished), the view says drained.
    down = NodeObserved(
        node="a2", liveness=Liveness.ALIVE, last_seen=NOW,
        heartbeat=Heartbeat(state=NodeState.DOWN, applied_revision=9),
    )  # fmt: skip
    view = node_view(build_snapshot(drained, {**observed, "a2": down}, 0, 0.0), "a2")
    assert view is not None and view.admin_state is AdminState.DRAINED
    assert view.link_bandwidth_mbps == 333.333
    undrained = node_view(build_snapshot(DESIRED, observed, 0, 0.0), "a2")
    assert undrained is not None and undrained.admin_state is AdminState.ACTIVE
    assert undrained.drain_source is None and undrained.drain_reason == ""


def test_convergence_only_live_nodes_block() -> None:
    observed = {"a1": seen("a1", 9), "a2": seen("a2", 8, Liveness.DEAD)}
    report = convergence_view(build_snapshot(DESIRED, observed, 0, 0.0))
    assert report.applied == ["a1"]
    assert [(n.node, n.liveness) for n in report.lagging] == [
        ("a2", Liveness.DEAD),
        ("b1", Liveness.UNKNOWN),
    ]
    assert report.converged  # nothing alive is behind
    observed["b1"] = seen("b1", 8)
    assert not convergence_view(build_snapshot(DESIRED, observed, 0, 0.0)).converged


def test_observed_view_lists_never_seen_nodes_as_unknown() -> None:
    listed = observed_view(build_snapshot(DESIRED, {"a1": seen("a1", 9)}, 0, 0.0))
    assert [(o.node, o.liveness) for o in listed] == [
        ("a1", Liveness.ALIVE),
        ("a2", Liveness.UNKNOWN),
        ("b1", Liveness.UNKNOWN),
    ]


def test_a_rebuild_with_the_same_revision_and_health_carries_the_views_over() -> None:
    """Snapshots are rebuilt every second whatever happens: when nothing a view depends on
    moved, the previous snapshot's derivations (and rendered views) are reused, and the
    new observed data (last seen, connections) is still the new snapshot's."""
    all_up = {n: seen(n, 9) for n in DESIRED.nodes}
    first = build_snapshot(DESIRED, all_up, 0, 0.0)
    view = node_view(first, "a1")
    rendered = node_view_json(first, "a1")
    assert view is not None and rendered == view.model_dump_json().encode()
    later = {**all_up, "a1": seen("a1", 9).model_copy(update={"last_seen": NOW.replace(hour=1)})}
    second = build_snapshot(DESIRED, later, 0, 1.0, previous=first)
    assert second.observed is later and second.built_at == 1.0
    assert second.shares is first.shares
    assert node_view(second, "a1") is view
    assert node_view_json(second, "a1") is rendered


def test_a_rebuild_after_a_health_or_revision_change_derives_the_views_again() -> None:
    all_up = {n: seen(n, 9) for n in DESIRED.nodes}
    first = build_snapshot(DESIRED, all_up, 0, 0.0)
    before = node_view(first, "a1")
    b1_dead = {**all_up, "b1": seen("b1", 9, Liveness.DEAD)}
    after_death = build_snapshot(DESIRED, b1_dead, 1, 1.0, previous=first)
    moved = node_view(after_death, "a1")
    assert before is not None and moved is not None
    assert moved.fingerprint != before.fingerprint
    assert node_view_json(after_death, "a1") == moved.model_dump_json().encode()
    reweighted = DESIRED.model_copy(
        update={"revision": 10, "nodes": {**DESIRED.nodes, "a1": NodeSpec(site="a", weight=5)}}
    )
    after_write = build_snapshot(reweighted, all_up, 2, 2.0, previous=first)
    rewritten = node_view(after_write, "a1")
    assert rewritten is not None
    assert (rewritten.revision, rewritten.operator_weight) == (10, 5)
