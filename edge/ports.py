"""The agent's ports: what it offers its extensions, and what an extension offers it.

The agent (`edge.agent`) serves traffic and owns the node's state through its state
machine. Everything else a node does (announce over BGP, follow the GSLB, and next: share
flows with its peers, elect an active node) is an `AgentExtension` that the composition
root (`edge.agent.run_agent`) builds and hands to the agent as a list. An extension sees the
node only through `NodeControl`; the agent sees an extension only through this protocol.
Neither mutates the other: no registries, no back references, no import of `edge.agent`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from edge.state import Drain, DrainSource, NodeState, Transition


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


class AgentExtension(Protocol):
    """One capability plugged into the agent.

    Called by the agent, in this order of life: `start` once serving has begun,
    `on_transition` for every change of state or drain phase, `degraded_reason` and
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
