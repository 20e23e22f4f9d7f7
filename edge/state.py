"""The node state machine: pure, no I/O.

    starting ──▶ healthy ◀──▶ degraded
        │           │  ▲          │
        ▼           ▼  │          ▼
       down ◀──── draining ◀──────┘ (operator drain from any serving state)

Admin state (active or draining) is kept apart from health, as glb-director
does: a drain is an operator's decision, health is an observation, and the
node state is derived from both. Every change comes out as a `Transition`
with its cause, for the event log and for the BGP policy.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class NodeState(enum.StrEnum):
    STARTING = "starting"
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    DRAINING = "draining"
    DOWN = "down"


# The states in which the node takes new traffic from the routers.
SERVING_STATES = frozenset({NodeState.HEALTHY, NodeState.DEGRADED})


@dataclass(frozen=True, slots=True)
class Observation:
    """What the node knows about itself at one moment."""

    backends_total: int
    backends_healthy: int
    # Every backend has had at least one active check verdict.
    backends_settled: bool
    # All listeners are bound and answer their own self-check.
    listeners_ok: bool
    listeners_detail: str = ""
    # Conditions that make a node that could be healthy only degraded (e.g. BFD lost).
    degraded_by: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Transition:
    old: NodeState
    new: NodeState
    cause: str


@dataclass(frozen=True, slots=True)
class Thresholds:
    degraded_below: float = 1.0
    down_below: float = 0.5


@dataclass(slots=True)
class NodeStateMachine:
    """Derives the node state from observations and operator drain requests."""

    thresholds: Thresholds = field(default_factory=Thresholds)
    state: NodeState = NodeState.STARTING
    drain_requested: bool = False
    drain_reason: str = ""
    # Set once the drain has finished (traffic gone, connections closed).
    drain_complete: bool = False
    last_observation: Observation | None = None

    def observe(self, observation: Observation) -> Transition | None:
        self.last_observation = observation
        return self._move(*self._derive(observation))

    def request_drain(self, reason: str) -> Transition | None:
        self.drain_requested = True
        self.drain_reason = reason
        self.drain_complete = False
        return self._reevaluate()

    def mark_drained(self) -> Transition | None:
        """The drain finished: traffic left and open connections are closed."""
        if not self.drain_requested:
            return None
        self.drain_complete = True
        return self._reevaluate()

    def cancel_drain(self, reason: str) -> Transition | None:
        self.drain_requested = False
        self.drain_complete = False
        self.drain_reason = reason
        return self._reevaluate()

    def _reevaluate(self) -> Transition | None:
        if self.last_observation is None:
            if self.drain_requested:
                return self._move(
                    NodeState.DOWN, f"drain requested before start: {self.drain_reason}"
                )
            return None
        return self._move(*self._derive(self.last_observation))

    def _derive(self, obs: Observation) -> tuple[NodeState, str]:
        health_state, health_cause = self._health(obs)
        if self.drain_requested:
            if self.drain_complete:
                return NodeState.DOWN, f"drained: {self.drain_reason}"
            # Draining only makes sense from a state that was taking traffic.
            if self.state in (*SERVING_STATES, NodeState.DRAINING):
                return NodeState.DRAINING, f"drain requested: {self.drain_reason}"
            return NodeState.DOWN, f"drain requested while {self.state}: {self.drain_reason}"
        if self.state is NodeState.STARTING and health_state is NodeState.STARTING:
            return NodeState.STARTING, health_cause
        if self.state is NodeState.DRAINING:
            # Undrained: health decides again.
            return health_state, f"undrained: {self.drain_reason}; {health_cause}"
        return health_state, health_cause

    def _health(self, obs: Observation) -> tuple[NodeState, str]:
        if not obs.listeners_ok:
            return (
                NodeState.DOWN,
                f"listener self-check failed: {obs.listeners_detail or 'unknown'}",
            )
        if not obs.backends_settled and self.state is NodeState.STARTING:
            return NodeState.STARTING, "waiting for the first health verdict of every backend"
        if obs.backends_total == 0:
            return NodeState.DOWN, "no backends configured"
        share = obs.backends_healthy / obs.backends_total
        counts = f"{obs.backends_healthy}/{obs.backends_total} backends healthy"
        if share < self.thresholds.down_below or obs.backends_healthy == 0:
            return NodeState.DOWN, f"{counts}, below {self.thresholds.down_below:.0%}"
        if share < self.thresholds.degraded_below:
            return NodeState.DEGRADED, f"{counts}, below {self.thresholds.degraded_below:.0%}"
        if obs.degraded_by:
            return NodeState.DEGRADED, f"{counts}; {'; '.join(obs.degraded_by)}"
        return NodeState.HEALTHY, counts

    def _move(self, new: NodeState, cause: str) -> Transition | None:
        if new is self.state:
            return None
        transition = Transition(self.state, new, cause)
        self.state = new
        return transition
