"""Fail-open (api/panic.py): when the GSLB cannot trust its view, nobody is turned off."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from api.panic import FLEET, Trust, decide, hold
from contract.schemas import (
    DesiredState,
    Heartbeat,
    Liveness,
    NodeObserved,
    NodeSpec,
    NodeState,
    SiteSpec,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
DESIRED = DesiredState(
    sites={"a": SiteSpec(), "b": SiteSpec()},
    nodes={n: NodeSpec(site=n[0]) for n in ("a1", "a2", "a3", "b1", "b2")},
)


def seen(liveness: Liveness, state: NodeState = NodeState.HEALTHY) -> NodeObserved:
    return NodeObserved(
        node="x", liveness=liveness, last_seen=NOW, heartbeat=Heartbeat(state=state)
    )


def view(dead: set[str]) -> dict[str, NodeObserved]:
    return {n: seen(Liveness.DEAD if n in dead else Liveness.ALIVE) for n in DESIRED.nodes}


def test_a_fresh_api_holds_everyone_for_one_ttl() -> None:
    observed = view({"a1", "a2", "a3", "b1", "b2"})  # every lease expired while it was down
    decision = decide(DESIRED, observed, threshold=0.5, up_s=1.0, heartbeat_ttl_s=5.0)
    assert [(v.scope, v.trust) for v in decision.scopes] == [(FLEET, Trust.STARTING)]
    held = hold(DESIRED, observed, decision)
    assert all(o.liveness is Liveness.ALIVE for o in held.values())
    after = decide(DESIRED, observed, threshold=0.0, up_s=6.0, heartbeat_ttl_s=5.0)
    assert after.scopes == ()


def test_a_site_below_the_threshold_keeps_its_last_weights_another_does_not() -> None:
    # a: 1 of 3 alive (panic); b: 1 of 2 and the fleet: 2 of 5 (not below 40%)
    observed = view({"a1", "a2", "b1"})
    decision = decide(DESIRED, observed, threshold=0.4, up_s=60, heartbeat_ttl_s=5)
    assert [(v.scope, v.alive, v.reported) for v in decision.scopes] == [("a", 1, 3)]
    held = hold(DESIRED, observed, decision)
    assert held["a1"].liveness is Liveness.ALIVE and held["a2"].liveness is Liveness.ALIVE
    assert held["b1"].liveness is Liveness.DEAD
    assert "only 1 of 3 nodes alive" in decision.scopes[0].describe()


def test_nodes_never_heard_from_are_never_held_and_reports_are_kept() -> None:
    observed = {"a1": seen(Liveness.DEAD, NodeState.DOWN)}
    decision = decide(DESIRED, observed, threshold=0.5, up_s=60, heartbeat_ttl_s=5)
    held = hold(DESIRED, observed, decision)
    assert set(held) == {"a1"}
    assert held["a1"].heartbeat is not None and held["a1"].heartbeat.state is NodeState.DOWN


@given(
    st.sets(st.sampled_from(sorted(DESIRED.nodes))),
    st.floats(0, 1),
    st.floats(0, 100),
)
def test_holding_only_ever_turns_dead_into_alive_never_the_reverse(
    dead: set[str], threshold: float, up_s: float
) -> None:
    observed = view(dead)
    decision = decide(DESIRED, observed, threshold=threshold, up_s=up_s, heartbeat_ttl_s=5)
    held = hold(DESIRED, observed, decision)
    for name, o in observed.items():
        assert held[name].heartbeat == o.heartbeat
        if o.liveness is Liveness.ALIVE:
            assert held[name].liveness is Liveness.ALIVE
    if up_s < 5:
        assert all(h.liveness is Liveness.ALIVE for h in held.values())
    if not decision.scopes:
        assert held == observed
