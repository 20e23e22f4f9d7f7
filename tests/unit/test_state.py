"""The node state machine: exhaustive over small inputs, and properties that always hold."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.state import SERVING_STATES, NodeState, NodeStateMachine, Observation, Thresholds


def obs(
    healthy: int, total: int = 4, settled: bool = True, listeners_ok: bool = True
) -> Observation:
    return Observation(total, healthy, settled, listeners_ok, "" if listeners_ok else "web down")


def test_starts_in_starting_and_waits_for_every_verdict() -> None:
    sm = NodeStateMachine()
    assert sm.state is NodeState.STARTING
    assert sm.observe(obs(4, settled=False)) is None
    t = sm.observe(obs(4))
    assert t is not None and (t.old, t.new) == (NodeState.STARTING, NodeState.HEALTHY)
    assert "4/4 backends healthy" in t.cause


def test_degraded_and_back() -> None:
    sm = NodeStateMachine(Thresholds(degraded_below=1.0, down_below=0.5))
    sm.observe(obs(4))
    t = sm.observe(obs(3))
    assert t is not None and t.new is NodeState.DEGRADED and "3/4" in t.cause
    t = sm.observe(obs(4))
    assert t is not None and t.new is NodeState.HEALTHY


def test_down_below_threshold_and_when_listeners_fail() -> None:
    sm = NodeStateMachine(Thresholds(degraded_below=1.0, down_below=0.5))
    sm.observe(obs(4))
    t = sm.observe(obs(1))
    assert t is not None and t.new is NodeState.DOWN and "below 50%" in t.cause
    sm.observe(obs(4))
    t = sm.observe(obs(4, listeners_ok=False))
    assert t is not None and t.new is NodeState.DOWN and "web down" in t.cause


def test_drain_cycle() -> None:
    sm = NodeStateMachine()
    sm.observe(obs(4))
    t = sm.request_drain("maintenance")
    assert t is not None and t.new is NodeState.DRAINING and "maintenance" in t.cause
    # Health changes while draining do not end the drain.
    assert sm.observe(obs(2)) is None
    assert sm.state is NodeState.DRAINING
    t = sm.mark_drained()
    assert t is not None and t.new is NodeState.DOWN and "drained" in t.cause
    t = sm.cancel_drain("done")
    assert t is not None and t.new is NodeState.DEGRADED


def test_drain_of_a_node_that_never_served_goes_down() -> None:
    sm = NodeStateMachine()
    t = sm.request_drain("x")
    assert t is not None and t.new is NodeState.DOWN
    sm2 = NodeStateMachine()
    sm2.observe(obs(4, settled=False))
    t = sm2.request_drain("x")
    assert t is not None and t.new is NodeState.DOWN


def test_exhaustive_small_fleet() -> None:
    """Every observation from every reachable state gives the state the rules say."""
    th = Thresholds(degraded_below=1.0, down_below=0.5)
    for total in range(0, 5):
        for healthy, settled, ok in itertools.product(
            range(total + 1), (True, False), (True, False)
        ):
            sm = NodeStateMachine(th)
            sm.observe(obs(total, total=total))  # become healthy first when possible
            sm.observe(obs(healthy, total, settled, ok))
            share = healthy / total if total else 0.0
            if not ok or total == 0 or healthy == 0 or share < 0.5:
                assert sm.state is NodeState.DOWN
            elif share < 1.0:
                assert sm.state is NodeState.DEGRADED
            else:
                assert sm.state is NodeState.HEALTHY


events = st.one_of(
    st.tuples(st.just("obs"), st.integers(0, 4), st.booleans(), st.booleans()),
    st.tuples(st.just("drain"), st.just(0), st.just(True), st.just(True)),
    st.tuples(st.just("drained"), st.just(0), st.just(True), st.just(True)),
    st.tuples(st.just("undrain"), st.just(0), st.just(True), st.just(True)),
)


@settings(max_examples=400)
@given(st.lists(events, max_size=30))
def test_properties_hold_for_any_sequence(sequence: list[tuple[str, int, bool, bool]]) -> None:
    sm = NodeStateMachine()
    for kind, healthy, settled, ok in sequence:
        before = sm.state
        if kind == "obs":
            t = sm.observe(obs(healthy, 4, settled, ok))
        elif kind == "drain":
            t = sm.request_drain("op")
        elif kind == "drained":
            t = sm.mark_drained()
        else:
            t = sm.cancel_drain("op")
        # Every change is reported exactly once, with a cause.
        if t is None:
            assert sm.state is before
        else:
            assert (t.old, t.new) == (before, sm.state) and t.old is not t.new and t.cause
        # Fail closed: a drained node never serves; a node with no healthy backend never serves.
        if sm.drain_requested:
            assert sm.state not in SERVING_STATES
        last = sm.last_observation
        if last is not None and (last.backends_healthy == 0 or not last.listeners_ok):
            assert sm.state not in SERVING_STATES
        # Never back to starting.
        if before is not NodeState.STARTING:
            assert sm.state is not NodeState.STARTING


def test_a_degradation_holds_a_healthy_node_at_degraded_and_lifts() -> None:
    sm = NodeStateMachine()
    sm.observe(obs(4))
    bfd = "BFD down while BGP up with 198.18.0.5: fast failover lost"
    t = sm.observe(Observation(4, 4, True, True, "", (bfd,)))
    assert t is not None and t.new is NodeState.DEGRADED and bfd in t.cause
    t = sm.observe(obs(4))
    assert t is not None and t.new is NodeState.HEALTHY
    # It never lifts a worse verdict: down stays down.
    sm.observe(obs(0))
    assert sm.observe(Observation(4, 0, True, True, "", (bfd,))) is None
    assert sm.state is NodeState.DOWN
