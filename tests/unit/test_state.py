"""The node state machine: exhaustive over small inputs, and properties that always hold."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from contract.schemas import NodeState as ReportedState
from edge.state import (
    SERVING_STATES,
    DrainPhase,
    DrainSource,
    NodeState,
    NodeStateMachine,
    Observation,
    Thresholds,
)


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


def test_the_node_state_is_defined_once() -> None:
    """The state machine's states are the wire's (one enum, not two joined by str())."""
    assert NodeState is ReportedState
    assert [s.value for s in NodeState] == ["starting", "healthy", "degraded", "draining", "down"]


def test_drain_cycle_goes_through_its_phases() -> None:
    sm = NodeStateMachine()
    sm.observe(obs(4))
    assert not sm.draining()
    t = sm.request_drain(DrainSource.LOCAL, "maintenance")
    assert t is not None and t.new is NodeState.DRAINING and "maintenance" in t.cause
    assert sm.draining()  # what the proxy reads per request
    assert t.drain.phase is DrainPhase.MOVING_TRAFFIC and t.drain.source is DrainSource.LOCAL
    # Health changes while draining do not end the drain.
    assert sm.observe(obs(2)) is None
    assert sm.state is NodeState.DRAINING
    # A phase change is a transition of its own (same state), so extensions see it.
    t = sm.stop_accepting()
    assert t is not None and t.old is t.new is NodeState.DRAINING
    assert t.drain.phase is DrainPhase.CLOSING_CONNECTIONS
    t = sm.mark_drained()
    assert t is not None and t.new is NodeState.DOWN and "drained" in t.cause
    assert t.drain.phase is DrainPhase.DONE
    t = sm.cancel_drain(DrainSource.LOCAL, "done")
    assert t is not None and t.new is NodeState.DEGRADED and "undrained: done" in t.cause
    assert not sm.drain.active and not sm.draining()


def test_phases_only_move_forward() -> None:
    sm = NodeStateMachine()
    sm.observe(obs(4))
    assert sm.stop_accepting() is None and sm.mark_drained() is None  # no drain
    sm.request_drain(DrainSource.GSLB, "x")
    assert sm.mark_drained() is None  # still moving traffic: not done yet
    assert sm.request_drain(DrainSource.LOCAL, "again") is None  # one drain at a time
    assert sm.drain.source is DrainSource.GSLB


def test_the_gslb_ends_only_its_own_drain_and_sigterm_takes_any_over() -> None:
    sm = NodeStateMachine()
    sm.observe(obs(4))
    sm.request_drain(DrainSource.LOCAL, "by hand")
    assert sm.cancel_drain(DrainSource.GSLB, "GSLB undrained") is None
    assert sm.drain.active and sm.drain.source is DrainSource.LOCAL
    t = sm.request_drain(DrainSource.SIGTERM, "SIGTERM")
    assert t is not None and sm.drain.source is DrainSource.SIGTERM
    assert sm.drain.phase is DrainPhase.MOVING_TRAFFIC  # taken over, not restarted
    assert sm.cancel_drain(DrainSource.GSLB, "GSLB undrained") is None
    assert sm.cancel_drain(DrainSource.LOCAL, "by hand") is not None
    assert not sm.drain.active


def test_drain_of_a_node_that_never_served_goes_down() -> None:
    sm = NodeStateMachine()
    t = sm.request_drain(DrainSource.GSLB, "x")
    assert t is not None and t.new is NodeState.DOWN
    sm2 = NodeStateMachine()
    sm2.observe(obs(4, settled=False))
    t = sm2.request_drain(DrainSource.GSLB, "x")
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


sources = st.sampled_from(list(DrainSource))
events = st.one_of(
    st.tuples(st.just("obs"), st.integers(0, 4), st.booleans(), st.booleans(), sources),
    st.tuples(st.just("drain"), st.just(0), st.just(True), st.just(True), sources),
    st.tuples(st.just("stop"), st.just(0), st.just(True), st.just(True), sources),
    st.tuples(st.just("drained"), st.just(0), st.just(True), st.just(True), sources),
    st.tuples(st.just("undrain"), st.just(0), st.just(True), st.just(True), sources),
)
PHASE_ORDER = list(DrainPhase)


@settings(max_examples=400)
@given(st.lists(events, max_size=30))
def test_properties_hold_for_any_sequence(
    sequence: list[tuple[str, int, bool, bool, DrainSource]],
) -> None:
    sm = NodeStateMachine()
    for kind, healthy, settled, ok, source in sequence:
        before, drain_before = sm.state, sm.drain
        if kind == "obs":
            t = sm.observe(obs(healthy, 4, settled, ok))
        elif kind == "drain":
            t = sm.request_drain(source, "op")
        elif kind == "stop":
            t = sm.stop_accepting()
        elif kind == "drained":
            t = sm.mark_drained()
        else:
            t = sm.cancel_drain(source, "op")
        # Every change (of state or of drain) is reported exactly once, with a cause.
        if t is None:
            assert sm.state is before and sm.drain == drain_before
        else:
            assert (t.old, t.new) == (before, sm.state) and t.cause and t.drain == sm.drain
            assert t.old is not t.new or sm.drain != drain_before
        # A drain's phase only moves forward, or back to none when it is ended.
        if sm.drain.active and drain_before.active:
            assert PHASE_ORDER.index(sm.drain.phase) >= PHASE_ORDER.index(drain_before.phase)
        # Fail closed: a draining node never serves; a node with no healthy backend never serves.
        if sm.drain.active:
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
