"""The agent's ports: what it offers its extensions, and what an extension offers it.

The agent (`edge.agent`) serves traffic and owns the node's state through its state
machine. Everything else a node does (announce over BGP, follow the GSLB, share flows
with its peers, elect an active node) is an `AgentExtension` that the composition
root (`edge.agent.run_agent`) builds and hands to the agent as a list. An extension sees the
node only through `NodeControl`; the agent sees an extension only through this protocol.
Neither mutates the other: no registries, no back references, no import of `edge.agent`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence, Set
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from contract.schemas import ServiceReport
from edge.config import ServiceConfig
from edge.flows import FlowTable
from edge.services import ServiceState
from edge.state import Drain, DrainSource, NodeState, Transition

#: What an extension that moves traffic awaits before a planned route change goes out
#: (a drain, an undrain, a weight change, a join): it is given what the change is, and
#: returns once whatever must hold before it does (peers hold this node's flows), bounded
#: by its own timeout. The composition root wires one extension's into another's.
BeforeRouteChange = Callable[[str], Awaitable[None]]


class ExtensionSetupError(Exception):
    """An extension cannot run on this host as configured: its message is the one line for
    the operator (the agent then exits 2, having claimed and announced nothing)."""


@dataclass(frozen=True, slots=True)
class NodeReport:
    """What the node reports about itself at one moment (for heartbeats and drains)."""

    node: str
    site: str
    state: NodeState
    #: Why it is in that state (the state machine's cause).
    cause: str
    drain: Drain
    backends_total: int
    backends_healthy: int
    open_connections: int
    # Monotonic count of accepted client connections (a drain watches its rate).
    accepted_total: int
    # Each service's own state (one, "default", in today's single-service shape).
    services: tuple[ServiceReport, ...] = ()


class NodeControl(Protocol):
    """What the agent offers: its state, its drain, and a report."""

    @property
    def state(self) -> NodeState: ...

    @property
    def drain(self) -> Drain: ...

    def request_drain(self, source: DrainSource, reason: str) -> None:
        """Start a drain (the state machine decides what an overlapping request does)."""

    async def undrain(self, source: DrainSource, reason: str) -> None:
        """End the drain, if `source` may end it (the GSLB ends only its own)."""

    def report(self) -> NodeReport: ...

    @property
    def flows(self) -> FlowTable:
        """The node's established client flows and their accept/close stream."""
        ...

    def service_states(self) -> dict[str, ServiceState]:
        """Each service's own state, by name (one, "default", in today's shape)."""


class AgentExtension(Protocol):
    """One capability plugged into the agent.

    Called by the agent, in this order of life: `start` once serving has begun,
    `on_transition` for every change of state or drain phase (and of a service's state:
    then old and new may be the same, the node's), `degraded_reason` and
    `status` whenever the agent evaluates or reports, `before_stop_accepting` once per
    drain (after the drain started, before listeners close), `stop` at the end.
    """

    #: Its section in /status.
    name: str

    async def start(self, node: NodeControl) -> None: ...

    async def stop(self) -> None: ...

    def on_transition(self, transition: Transition) -> None: ...

    def degraded_reason(self) -> str | None:
        """Why a node that could be healthy is only degraded, or None."""

    def status(self) -> dict[str, Any]: ...

    async def before_stop_accepting(self) -> bool:
        """The drain's step before listeners close. True when this extension moved the
        traffic away (then the agent's fixed `drain.accept_grace` is not needed)."""


@runtime_checkable
class ServiceAnnouncer(Protocol):
    """An extension that announces each service's own prefixes (the BGP announcer). A
    reload that starts or removes services tells it which to announce (`set_services`:
    every service with a runtime, those `leaving` included) and runs, per removed
    service, the same step as a node's drain before that service's listeners close."""

    name: str

    def set_services(self, services: Sequence[ServiceConfig], leaving: Set[str]) -> None:
        """The services announced from now on: a new one by its own state (withdrawn until
        it has risen), one `leaving` with GRACEFUL_SHUTDOWN and prepends (the per-service
        drain), one no longer named withdrawn."""

    async def before_service_stops_accepting(
        self, service: str, accepted_total: Callable[[], int]
    ) -> bool:
        """A removed service's step before its listeners close (its leaving announcement
        sent, its new-connection rate quiet, bounded). True when it moved the traffic."""
