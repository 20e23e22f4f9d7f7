"""edgectl's pure core: argument parsing, target resolution, diffs, the fleet view and the
drain-wait verdict. (The binary itself is tested against the real API in integration.)"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from contract.schemas import (
    Convergence,
    ConvergenceNode,
    DesiredState,
    Drain,
    DrainKind,
    EffectiveWeights,
    Heartbeat,
    Liveness,
    NodeObserved,
    NodeSpec,
    NodeState,
    SiteSpec,
    VipGroupReport,
    VipRole,
)
from edgectl.core import (
    Change,
    CliError,
    Exit,
    Fleet,
    affected_nodes,
    build_fleet,
    build_groups,
    diff_states,
    drain_reasons,
    parse_assignments,
    parse_endpoints,
    planned_changes,
    resolve_target,
    wait_progress,
)
from edgectl.render import groups_table

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def state(revision: int = 5, drains: list[Drain] | None = None, **weights: int) -> DesiredState:
    sites = {"site-a": SiteSpec(weight=weights.get("site_a", 100)), "site-b": SiteSpec()}
    nodes = {
        "a1": NodeSpec(site="site-a", weight=weights.get("a1", 100)),
        "a2": NodeSpec(site="site-a"),
        "b1": NodeSpec(site="site-b"),
    }
    return DesiredState(revision=revision, sites=sites, nodes=nodes, drains=drains or [])


def drain(kind: DrainKind, name: str, reason: str = "why") -> Drain:
    return Drain(kind=kind, name=name, reason=reason, author="alice", since=NOW)


def seen(node: str, state_: NodeState, applied: int, alive: bool = True) -> NodeObserved:
    return NodeObserved(
        node=node,
        liveness=Liveness.ALIVE if alive else Liveness.DEAD,
        last_seen=NOW,
        heartbeat=Heartbeat(state=state_, applied_revision=applied),
    )


def test_assignments() -> None:
    assert parse_assignments(["site-a=3", "site-b = 1", "x=+0"], "site") == {
        "site-a": 3,
        "site-b": 1,
        "x": 0,
    }
    assert parse_assignments(["a=1", "a=1"], "node") == {"a": 1}
    for bad, words in [
        ("site-a=x", "'site-a=x' is not NAME=WEIGHT with an integer weight"),
        ("site-a", "is not NAME=WEIGHT"),
        ("site-a=-1", "is not NAME=WEIGHT"),
        ("site-a=1.5", "is not NAME=WEIGHT"),
        ("Site_A=1", "not a valid site name"),
        ("site-a=1001", "between 0 and 1000"),
    ]:
        with pytest.raises(CliError) as error:
            parse_assignments([bad], "site")
        assert error.value.code is Exit.USAGE and words in error.value.message
    with pytest.raises(CliError, match="two different weights"):
        parse_assignments(["a=1", "a=2"], "node")


@given(
    st.dictionaries(st.from_regex(r"[a-z0-9][a-z0-9-]{0,10}", fullmatch=True), st.integers(0, 1000))
)
def test_assignments_round_trip(weights: dict[str, int]) -> None:
    assert parse_assignments([f"{n}={w}" for n, w in weights.items()], "site") == weights


def test_endpoints() -> None:
    assert parse_endpoints(["http://a:1/, https://b:2", "http://c:3"]) == [
        "http://a:1",
        "https://b:2",
        "http://c:3",
    ]
    assert parse_endpoints([]) == []
    with pytest.raises(CliError) as error:
        parse_endpoints(["a:1"])
    assert error.value.code is Exit.USAGE


def test_targets_resolve_to_node_or_site() -> None:
    s = state()
    assert resolve_target(s, "a1", None) is DrainKind.NODE
    assert resolve_target(s, "site-b", None) is DrainKind.SITE
    assert affected_nodes(s, DrainKind.SITE, "site-a") == ["a1", "a2"]
    assert affected_nodes(s, DrainKind.NODE, "b1") == ["b1"]
    for name, kind, code in [
        ("zz", None, Exit.NOT_FOUND),
        ("a1", DrainKind.SITE, Exit.NOT_FOUND),
        ("site-a", DrainKind.NODE, Exit.NOT_FOUND),
    ]:
        with pytest.raises(CliError) as error:
            resolve_target(s, name, kind)
        assert error.value.code is code
    both = s.model_copy(update={"sites": {**s.sites, "a1": SiteSpec()}})
    with pytest.raises(CliError) as error:
        resolve_target(both, "a1", None)
    assert error.value.code is Exit.USAGE and "--kind" in error.value.message
    assert resolve_target(both, "a1", DrainKind.SITE) is DrainKind.SITE


def test_planned_changes_and_diffs() -> None:
    s = state(site_a=3)
    assert planned_changes(s, {"site-a": 3, "site-b": 1}, {"a1": 2}) == [
        Change("site", "site-b", "100", "1"),
        Change("node", "a1", "100", "2"),
    ]
    with pytest.raises(CliError) as error:
        planned_changes(s, {"a1": 1}, {})
    assert error.value.code is Exit.USAGE and "--node a1=WEIGHT" in error.value.message
    with pytest.raises(CliError) as error:
        planned_changes(s, {}, {"nope": 1})
    assert error.value.code is Exit.NOT_FOUND

    after = state(revision=6, site_a=7, drains=[drain(DrainKind.NODE, "a2", "disk")])
    after = after.model_copy(update={"nodes": {k: v for k, v in after.nodes.items() if k != "b1"}})
    moved = diff_states(s, after)
    assert [c.describe() for c in moved] == [
        "site site-a weight 3 -> 7",
        "node b1 removed (weight was 100)",
        "node a2 drained: disk (alice)",
    ]
    assert diff_states(s, s) == []


def test_fleet_view_and_drain_reasons() -> None:
    s = state(drains=[drain(DrainKind.SITE, "site-b", "fiber"), drain(DrainKind.NODE, "a1")])
    assert drain_reasons(s) == {"a1": "why (alice)", "b1": "site: fiber (alice)"}
    weights = EffectiveWeights(revision=5, nodes={"a2": 1000.0}, sites={"site-a": 1000.0})
    convergence = Convergence(
        revision=5,
        converged=False,
        applied=["a2"],
        lagging=[
            ConvergenceNode(node="a1", applied_revision=4, liveness=Liveness.ALIVE),
            ConvergenceNode(node="b1", applied_revision=None, liveness=Liveness.UNKNOWN),
        ],
    )
    observed = [seen("a1", NodeState.DRAINING, 4), seen("a2", NodeState.HEALTHY, 5)]
    fleet = build_fleet(s, observed, weights, convergence)
    assert not fleet.converged and fleet.behind == ["a1"] and fleet.silent == ["b1"]
    data = fleet.as_json()
    assert list(data) == ["revision", "converged", "lagging", "sites", "nodes", "groups"]
    nodes = {n.name: n.as_json() for n in fleet.nodes}
    assert nodes["a1"]["state"] == "draining" and nodes["a1"]["drained"] is True
    assert nodes["b1"]["state"] == "-" and nodes["b1"]["liveness"] == "unknown"
    assert nodes["a2"]["effective_weight"] == 1000.0
    assert fleet.sites[1].drained and fleet.sites[1].nodes == ["b1"]


def test_drain_wait_verdict() -> None:
    s = state(revision=7, drains=[drain(DrainKind.NODE, "a1")])
    targets = ["a1"]
    # a1 has not applied 7 yet; b1 is behind too; a2 is dead and not waited for.
    observed = [
        seen("a1", NodeState.HEALTHY, 6),
        seen("a2", NodeState.HEALTHY, 1, alive=False),
        seen("b1", NodeState.HEALTHY, 6),
    ]
    p = wait_progress(7, s, observed, targets, draining=True)
    assert not p.done and p.pending == ["a1 applied revision 6", "b1 applied revision 6"]
    # Applied everywhere, but a1 still reports healthy.
    observed = [seen("a1", NodeState.HEALTHY, 7), seen("b1", NodeState.HEALTHY, 8)]
    p = wait_progress(7, s, observed, targets, draining=True)
    assert p.pending == ["a1 reports healthy"] and (p.applied, p.alive) == (2, 2)
    observed[0] = seen("a1", NodeState.DRAINING, 7)
    assert wait_progress(7, s, observed, targets, draining=True).done
    # A target that is not alive takes no traffic: nothing to wait for.
    assert wait_progress(
        7, s, [seen("a1", NodeState.HEALTHY, 1, alive=False)], targets, draining=True
    ).done

    # Undrain: done when a1 no longer reports draining, unless its site is still drained.
    free = state(revision=8)
    observed = [seen("a1", NodeState.DRAINING, 8)]
    assert not wait_progress(8, free, observed, targets, draining=False).done
    site_drained = state(revision=8, drains=[drain(DrainKind.SITE, "site-a")])
    assert wait_progress(8, site_drained, observed, targets, draining=False).done
    observed = [seen("a1", NodeState.HEALTHY, 8)]
    assert wait_progress(8, free, observed, targets, draining=False).done


def _member(node: str, role: VipRole, liveness: Liveness = Liveness.ALIVE) -> NodeObserved:
    report = VipGroupReport(group="g1", vip="198.18.2.100/24", role=role, term=3, fencing_token=41)
    return NodeObserved(
        node=node, liveness=liveness, heartbeat=Heartbeat(state=NodeState.HEALTHY, vip_group=report)
    )


def test_groups_show_the_active_member_and_a_split_brain_is_not_hidden() -> None:
    active, standby = VipRole.ACTIVE, VipRole.STANDBY
    (g1,) = build_groups([_member("n2", standby), _member("n1", active)])
    assert g1.active == ["n1"] and [m.node for m in g1.members] == ["n1", "n2"]
    assert g1.members[0].fencing_token == 41 and g1.as_json()["active"] == ["n1"]
    # A dead member that last said "active" is not an owner.
    (g1,) = build_groups([_member("n1", active, Liveness.DEAD), _member("n2", active)])
    assert g1.active == ["n2"]
    # Two live owners: both listed, and styled as an alarm.
    split = build_groups([_member("n1", active), _member("n2", active)])
    assert split[0].active == ["n1", "n2"]
    fleet = Fleet(revision=1, converged=True, lagging=[], sites=[], nodes=[], groups=split)
    console = Console(record=True, width=160)
    console.print(groups_table(fleet))
    assert "\x1b[31m" in console.export_text(styles=True)  # red
    assert build_groups([]) == []
