"""The service state machine: pure, no I/O. One per service, beside the node's.

A node may carry several services (node.yaml `services:`), each with its own listeners,
backends, health checks and prefixes. Each service's health is its own:

    starting ──▶ healthy ◀──▶ degraded
        │           │            │
        └─────────▶ down ◀───────┘

A service that is down withdraws its own prefixes only (the BGP policy combines each
service's state with the node's, `bgp.policy.group_decision`); the node's state and its
drain still apply to every service. What the services mean for the node is
`node_verdict`: the node serves while any service serves, and is down when none does.
Every change comes out as a `ServiceTransition` with its cause.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from contract.schemas import ServiceState
from edge.state import NodeState, Observation, Thresholds, health_verdict

__all__ = [
    "ServiceState",
    "ServiceStateMachine",
    "ServiceTransition",
    "node_verdict",
]


_FROM_HEALTH = {
    NodeState.STARTING: ServiceState.STARTING,
    NodeState.HEALTHY: ServiceState.HEALTHY,
    NodeState.DEGRADED: ServiceState.DEGRADED,
    NodeState.DOWN: ServiceState.DOWN,
}


@dataclass(frozen=True, slots=True)
class ServiceTransition:
    service: str
    old: ServiceState
    new: ServiceState
    cause: str


@dataclass(slots=True)
class ServiceStateMachine:
    """Derives one service's state from observations of its listeners and backends (the
    same rule as a node of one service: `edge.state.health_verdict`)."""

    name: str
    thresholds: Thresholds
    state: ServiceState = ServiceState.STARTING
    cause: str = "waiting for the first health verdict of every backend"

    def observe(self, observation: Observation) -> ServiceTransition | None:
        starting = self.state is ServiceState.STARTING
        health, self.cause = health_verdict(observation, self.thresholds, starting)
        new = _FROM_HEALTH[health]
        if new is self.state:
            return None
        transition = ServiceTransition(self.name, self.state, new, self.cause)
        self.state = new
        return transition


def node_verdict(services: Sequence[ServiceStateMachine]) -> tuple[NodeState, str]:
    """What a node's services mean for the node's health: healthy while any service serves
    (one service down is that service's, not the node's), starting while none serves and
    one has yet to rise, down when none serves."""
    serving = [s for s in services if s.state.serving]
    if serving:
        others = [f"{s.name} {s.state}" for s in services if not s.state.serving]
        suffix = f" ({', '.join(others)})" if others else ""
        return NodeState.HEALTHY, f"{len(serving)}/{len(services)} services serving{suffix}"
    starting = [s.name for s in services if s.state is ServiceState.STARTING]
    if starting:
        return NodeState.STARTING, f"waiting for services to rise: {', '.join(starting)}"
    causes = "; ".join(f"{s.name}: {s.cause}" for s in services)
    return NodeState.DOWN, f"no service serving: {causes}" if services else "no services"
