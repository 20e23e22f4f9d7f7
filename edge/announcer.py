"""The bridge from the agent to BGP: node state (+ GSLB weight) in, announcements out.

The agent's state machine and the BGP policy use the same state names, so a transition
maps one to one onto `bgp.policy.NodeCondition`. A drain goes through the BGP
choreography before the agent stops accepting: GRACEFUL_SHUTDOWN and prepends first,
withdraw once the node's own accepted-connection counter is quiet.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from bgp.config import BgpConfig
from bgp.policy import NodeCondition
from bgp.speaker import BgpSpeaker
from edge.state import NodeState, Transition

if TYPE_CHECKING:
    from edge.agent import Agent

log = logging.getLogger("edge.announcer")


class BgpAnnouncer:
    def __init__(self, agent: Agent, config: BgpConfig, workdir: Path | None = None) -> None:
        self.agent = agent
        self.speaker = BgpSpeaker(config, workdir or config.runtime_dir / agent.config.node.name)

    async def start(self) -> None:
        await self.speaker.start()
        self.agent.state_listeners.append(self._on_transition)
        self.agent.before_stop_accepting = self._move_traffic_away
        self.agent.status_extras["bgp"] = self.speaker.status
        self.agent.degradations["bgp"] = self.speaker.degraded_reason
        self._apply(self.agent.state)

    async def stop(self) -> None:
        await self.speaker.stop()

    def set_weight(self, weight: float) -> None:
        """The GSLB's desired weight for this node (0 withdraws, 1.0 = full capacity)."""
        self.speaker.update(weight=weight)

    def _on_transition(self, transition: Transition) -> None:
        self._apply(transition.new)

    def _apply(self, state: NodeState) -> None:
        condition = NodeCondition(str(state))
        if condition is NodeCondition.DRAINING:
            reason = self.speaker.update(condition=condition)
        else:
            # Leaving a drain (done or cancelled): the state alone decides again.
            reason = self.speaker.update(
                condition=condition, operator_drain=False, drain_complete=False
            )
        log.info("bgp: node %s -> %s", state, reason)

    async def _move_traffic_away(self, reason: str) -> None:
        report = await self.speaker.drain_traffic(lambda: self.agent.flows.accepted_total)
        log.info("bgp drain (%s): %s after %.1f s", reason, report.outcome, report.waited_s)
