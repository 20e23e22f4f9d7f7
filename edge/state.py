"""The node state machine: pure, no I/O. It owns the node state and the drain.

    starting ──▶ healthy ◀──▶ degraded
        │           │  ▲          │
        ▼           ▼  │          ▼
       down ◀──── draining ◀──────┘ (drain from any serving state)

Admin state (the drain) is kept apart from health, as glb-director does: a drain is
someone's decision, health is an observation, and the node state is derived from both.
The drain has one owner, this machine: its phase (none, moving traffic, closing
connections, done), its source (the local admin API, the GSLB, SIGTERM) and its reason.
Everything else (the BGP policy, the proxy's keep-alive, the heartbeat) reads them here.
Every change comes out as a `Transition` with its cause, for the event log and the
extensions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from contract.schemas import DrainPhase, DrainSource, NodeState

__all__ = [
    "SERVING_STATES",
    "Drain",
    "DrainPhase",
    "DrainSource",
    "NodeState",
    "NodeStateMachine",
    "Observation",
    "Thresholds",
    "Transition",
    "health_verdict",
]

# The states in which the node takes new traffic from the routers.
SERVING_STATES = frozenset({NodeState.HEALTHY, NodeState.DEGRADED})


@dataclass(frozen=True, slots=True)
class Drain:
    phase: DrainPhase = DrainPhase.NONE
    source: DrainSource | None = None
    reason: str = ""

    @property
    def active(self) -> bool:
        return self.phase is not DrainPhase.NONE

    def snapshot(self) -> dict[str, str | None]:
        source = None if self.source is None else str(self.source)
        return {"phase": str(self.phase), "source": source, "reason": self.reason}


NO_DRAIN = Drain()


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
    # A node of several services: their verdict for the node (`edge.services`), which
    # replaces the backend counts above (a service's backends are that service's).
    services_verdict: tuple[NodeState, str] | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    old: NodeState
    new: NodeState
    cause: str
    # The drain after the change (a phase change alone is a transition too).
    drain: Drain = NO_DRAIN


@dataclass(frozen=True, slots=True)
class Thresholds:
    degraded_below: float = 1.0
    down_below: float = 0.5


@dataclass(slots=True)
class NodeStateMachine:
    """Derives the node state from observations and the drain it owns."""

    thresholds: Thresholds = field(default_factory=Thresholds)
    state: NodeState = NodeState.STARTING
    drain: Drain = NO_DRAIN
    last_observation: Observation | None = None
    #: Why the node is in its state, as last derived (kept current between transitions).
    cause: str = "not started"

    def draining(self) -> bool:
        """Whether a drain is under way (read per request by the proxy: one call)."""
        return self.drain.phase is not DrainPhase.NONE

    def observe(self, observation: Observation) -> Transition | None:
        self.last_observation = observation
        return self._move(*self._derive(observation))

    def request_drain(self, source: DrainSource, reason: str) -> Transition | None:
        """Start a drain. A drain already under way keeps its phase; SIGTERM takes it over
        (the process exits when it is done), other sources leave it as it is."""
        if self.drain.active:
            if source is not DrainSource.SIGTERM or self.drain.source is DrainSource.SIGTERM:
                return None
            return self._set_drain(Drain(self.drain.phase, source, reason))
        return self._set_drain(Drain(DrainPhase.MOVING_TRAFFIC, source, reason))

    def stop_accepting(self) -> Transition | None:
        """Traffic has moved away: listeners close, open connections finish."""
        if self.drain.phase is not DrainPhase.MOVING_TRAFFIC:
            return None
        return self._set_drain(Drain(DrainPhase.CLOSING_CONNECTIONS, *self._who()))

    def mark_drained(self) -> Transition | None:
        """The drain finished: traffic left and open connections are closed."""
        if self.drain.phase is not DrainPhase.CLOSING_CONNECTIONS:
            return None
        return self._set_drain(Drain(DrainPhase.DONE, *self._who()))

    def cancel_drain(self, source: DrainSource, reason: str) -> Transition | None:
        """End the drain. The GSLB ends only a drain it started; the local API ends any."""
        if not self.drain.active:
            return None
        if source is DrainSource.GSLB and self.drain.source is not DrainSource.GSLB:
            return None
        return self._set_drain(NO_DRAIN, f"undrained: {reason}")

    def _who(self) -> tuple[DrainSource | None, str]:
        return self.drain.source, self.drain.reason

    def _set_drain(self, drain: Drain, undrain_cause: str = "") -> Transition | None:
        old_drain = self.drain
        self.drain = drain
        if self.last_observation is None:
            # Nothing observed yet: no health to go back to, so down until the first look.
            cause = (
                f"drain requested before start: {drain.reason}" if drain.active else undrain_cause
            )
            return self._move(NodeState.DOWN, cause, phase_changed=old_drain != drain)
        state, cause = self._derive(self.last_observation)
        if undrain_cause:
            cause = f"{undrain_cause}; {cause}"
        return self._move(state, cause, phase_changed=old_drain != drain)

    def _derive(self, obs: Observation) -> tuple[NodeState, str]:
        health_state, health_cause = self._health(obs)
        drain = self.drain
        if drain.phase is DrainPhase.DONE:
            return NodeState.DOWN, f"drained: {drain.reason} ({drain.source})"
        if drain.active:
            # Draining only makes sense from a state that was taking traffic.
            if self.state in (*SERVING_STATES, NodeState.DRAINING):
                return NodeState.DRAINING, f"drain requested: {drain.reason} ({drain.source})"
            return NodeState.DOWN, f"drain requested while {self.state}: {drain.reason}"
        if self.state is NodeState.STARTING and health_state is NodeState.STARTING:
            return NodeState.STARTING, health_cause
        return health_state, health_cause

    def _health(self, obs: Observation) -> tuple[NodeState, str]:
        starting = self.state is NodeState.STARTING
        if obs.services_verdict is None:
            state, cause = health_verdict(obs, self.thresholds, starting)
        else:
            state, cause = obs.services_verdict
            if not obs.listeners_ok:
                state, cause = health_verdict(obs, self.thresholds, starting)
            elif state is NodeState.STARTING and not starting:
                state, cause = NodeState.DOWN, f"no service serving: {cause}"
        if state is NodeState.HEALTHY and obs.degraded_by:
            return NodeState.DEGRADED, f"{cause}; {'; '.join(obs.degraded_by)}"
        return state, cause

    def _move(self, new: NodeState, cause: str, phase_changed: bool = False) -> Transition | None:
        self.cause = cause
        if new is self.state and not phase_changed:
            return None
        transition = Transition(self.state, new, cause, self.drain)
        self.state = new
        return transition


def health_verdict(
    obs: Observation, thresholds: Thresholds, starting: bool
) -> tuple[NodeState, str]:
    """Listeners and backends -> a health state (never DRAINING) and its cause: the rule a
    node of one service and each service of a node apply (`starting`: not yet risen)."""
    if not obs.listeners_ok:
        return NodeState.DOWN, f"listener self-check failed: {obs.listeners_detail or 'unknown'}"
    if not obs.backends_settled and starting:
        return NodeState.STARTING, "waiting for the first health verdict of every backend"
    if obs.backends_total == 0:
        return NodeState.DOWN, "no backends configured"
    share = obs.backends_healthy / obs.backends_total
    counts = f"{obs.backends_healthy}/{obs.backends_total} backends healthy"
    if share < thresholds.down_below or obs.backends_healthy == 0:
        return NodeState.DOWN, f"{counts}, below {thresholds.down_below:.0%}"
    if share < thresholds.degraded_below:
        return NodeState.DEGRADED, f"{counts}, below {thresholds.degraded_below:.0%}"
    return NodeState.HEALTHY, counts
