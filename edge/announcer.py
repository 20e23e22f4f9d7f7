"""The BGP announcer: an agent extension that turns the node's state into announcements.

The node state and drain phase are the edge's (its state machine owns them); the BGP
policy takes its own input, `bgp.policy.Serving`, and `serving()` below is the one place
that maps one onto the other (tests/unit/test_announcer_mapping.py pins it, state by
phase). The link bandwidth comes from the composition root: the GSLB's share through
`set_link_bandwidth`, or the node's configured capacity while none is in force.

A drain runs here as its step before the node stops accepting: the DRAINING transition
has already put out GRACEFUL_SHUTDOWN and prepends; this waits until that was sent and
the node's own accepted-connection rate is quiet. The agent then moves the drain to
"closing connections", which this maps to a withdraw.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from bgp.config import BgpConfig
from bgp.policy import Serving
from bgp.speaker import BgpSpeaker
from contract.schemas import BgpReport, BgpSession
from edge.ports import NodeControl
from edge.state import Drain, DrainPhase, NodeState, Transition

log = logging.getLogger("edge.announcer")

_BY_STATE = {
    NodeState.STARTING: Serving.NOT_READY,
    NodeState.HEALTHY: Serving.FULL,
    NodeState.DEGRADED: Serving.REDUCED,
    NodeState.DOWN: Serving.STOPPED,
}


def serving(state: NodeState, drain: Drain) -> Serving:
    """What the routers are told, from the node's state and its drain phase."""
    if drain.phase in (DrainPhase.CLOSING_CONNECTIONS, DrainPhase.DONE):
        return Serving.LEFT
    if state is NodeState.DRAINING:
        return Serving.LEAVING
    return _BY_STATE[state]


class BgpAnnouncer:
    name = "bgp"

    def __init__(self, config: BgpConfig, workdir: Path) -> None:
        self.speaker = BgpSpeaker(config, workdir)
        self._node: NodeControl | None = None

    async def start(self, node: NodeControl) -> None:
        self._node = node
        await self.speaker.start()
        self._apply(node.state, node.drain)

    async def stop(self) -> None:
        await self.speaker.stop()

    def set_link_bandwidth(self, mbps: float) -> None:
        """The GSLB's share for this node, in Mbit/s (what it announces at full health)."""
        reason = self.speaker.update(link_bandwidth_mbps=mbps)
        log.info(
            "bgp: link bandwidth %.1f Mbit/s -> %s",
            mbps,
            reason,
            extra={"event": "link_bandwidth", "link_bandwidth_mbps": mbps, "reason": str(reason)},
        )

    def on_transition(self, transition: Transition) -> None:
        self._apply(transition.new, transition.drain)

    def _apply(self, state: NodeState, drain: Drain) -> None:
        wanted = serving(state, drain)
        reason = self.speaker.update(serving=wanted)
        log.info(
            "bgp: node %s (drain %s) -> %s: %s",
            state,
            drain.phase,
            wanted,
            reason,
            extra={
                "event": "announcement",
                "state": str(state),
                "drain": str(drain.phase),
                "serving": str(wanted),
                "reason": str(reason),
            },
        )

    def degraded_reason(self) -> str | None:
        return self.speaker.degraded_reason()

    def status(self) -> dict[str, Any]:
        return self.speaker.status()

    def bgp_report(self) -> BgpReport:
        status = self.speaker.status()
        return BgpReport(
            reason=status["reason"][:200],
            flap_holddowns=status["flap_holddowns"],
            deadman_firings=status["deadman"]["firings"],
        )

    def sessions(self) -> list[BgpSession]:
        peers = self.speaker.status().get("sessions", {})
        return [BgpSession(peer=p, state=v["state"]) for p, v in peers.items()]

    async def before_stop_accepting(self) -> bool:
        node = self._node
        assert node is not None, "started before a drain"
        report = await self.speaker.wait_traffic_moved(lambda: node.report().accepted_total)
        log.info(
            "bgp drain: %s after %.1f s",
            report.outcome,
            report.waited_s,
            extra={"event": "drain", "outcome": str(report.outcome), "waited_s": report.waited_s},
        )
        return True
