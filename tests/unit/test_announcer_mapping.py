"""The one mapping from the edge's node state + drain phase onto the BGP policy's input.

`bgp` may not import `edge`, so `bgp.policy.Serving` is the policy's own type and
`edge.announcer.serving` maps onto it. This pins every pair, and checks the rules the
mapping must keep whatever it becomes."""

from __future__ import annotations

import itertools

import pytest

from bgp.policy import Serving
from edge.announcer import serving
from edge.state import Drain, DrainPhase, DrainSource, NodeState

S, P = NodeState, DrainPhase
EXPECTED = {
    (S.STARTING, P.NONE): Serving.NOT_READY,
    (S.HEALTHY, P.NONE): Serving.FULL,
    (S.DEGRADED, P.NONE): Serving.REDUCED,
    (S.DRAINING, P.MOVING_TRAFFIC): Serving.LEAVING,
    (S.DRAINING, P.CLOSING_CONNECTIONS): Serving.LEFT,
    (S.DOWN, P.NONE): Serving.STOPPED,
    # A drain requested while not serving: down, and withdrawn whatever the phase.
    (S.DOWN, P.MOVING_TRAFFIC): Serving.STOPPED,
    (S.DOWN, P.CLOSING_CONNECTIONS): Serving.LEFT,
    # After a finished drain the reason reads "drained", not "node down".
    (S.DOWN, P.DONE): Serving.LEFT,
}


@pytest.mark.parametrize(("state", "phase"), sorted(EXPECTED))
def test_each_reachable_pair(state: NodeState, phase: DrainPhase) -> None:
    drain = Drain(phase, DrainSource.GSLB if phase is not P.NONE else None, "r")
    assert serving(state, drain) is EXPECTED[(state, phase)]


def test_rules_over_every_pair() -> None:
    for state, phase in itertools.product(NodeState, DrainPhase):
        got = serving(state, Drain(phase, DrainSource.LOCAL, "r"))
        # Fail closed: not ready / down never announce, whatever the drain says.
        if state in (S.STARTING, S.DOWN):
            assert got in (Serving.NOT_READY, Serving.STOPPED, Serving.LEFT)
        # Once listeners close, the routers must already be told to go.
        if phase in (P.CLOSING_CONNECTIONS, P.DONE):
            assert got is Serving.LEFT
        # GRACEFUL_SHUTDOWN only while the node drains and still accepts.
        if got is Serving.LEAVING:
            assert state is S.DRAINING and phase in (P.NONE, P.MOVING_TRAFFIC)
