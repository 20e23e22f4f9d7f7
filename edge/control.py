"""The bridge from the GSLB control plane to the agent: desired view in, heartbeats out.

Static stability lives in `edge.sync.ControlPlaneSync`: it keeps the last known
good view in memory and on disk and only ever hands this bridge a view to
apply. Losing every API therefore changes nothing here: the node keeps serving
and announcing with what it last applied, and `/status` says the view is stale.

Weights: the GSLB publishes effective weights that add up to
`EFFECTIVE_WEIGHT_TOTAL` over the fleet (capacity and health already folded
in). The node announces its effective weight as link-bandwidth in Mbit/s, so
every router that hears the edges splits new flows in the GSLB's proportions
whatever each node's own capacity.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from api.schemas import BgpSession, HealthSummary, Heartbeat, NodeDesired
from api.schemas import NodeState as ReportedState
from edge.config import ControlPlaneConfig
from edge.sync import ControlPlaneSync

if TYPE_CHECKING:
    from edge.agent import Agent
    from edge.announcer import BgpAnnouncer

log = logging.getLogger("edge.control")


def announced_weight(effective_weight: float, capacity_mbps: float) -> float:
    """The BGP policy's weight (a fraction of capacity) that announces `effective_weight` Mbit/s."""
    return max(effective_weight, 0.0) / capacity_mbps


class ControlPlaneLink:
    def __init__(
        self, agent: Agent, config: ControlPlaneConfig, announcer: BgpAnnouncer | None
    ) -> None:
        self.agent = agent
        self.announcer = announcer
        self._drained_by_gslb = False
        verify: bool | str = str(config.ca_file) if config.ca_file else True
        self.sync = ControlPlaneSync(
            endpoints=config.endpoints,
            token=config.bearer_token(),
            node=agent.config.node.name,
            state_path=config.state_file,
            heartbeat=self._heartbeat,
            on_desired=self._apply,
            heartbeat_interval_s=config.heartbeat_interval,
            request_timeout_s=config.request_timeout,
            verify=verify,
        )

    async def start(self) -> None:
        self.agent.status_extras["control_plane"] = self.status
        self.sync.start()

    async def stop(self) -> None:
        await self.sync.stop()

    def _heartbeat(self) -> Heartbeat:
        agent = self.agent
        total, healthy, _ = agent.pool.counts()
        sessions: list[BgpSession] = []
        if self.announcer is not None:
            peers = self.announcer.speaker.status().get("sessions", {})
            sessions = [BgpSession(peer=p, state=v["state"]) for p, v in peers.items()]
        return Heartbeat(
            state=ReportedState(str(agent.state)),
            health=HealthSummary(backends_total=total, backends_healthy=healthy),
            connections=agent.ctx.open_connections(),
            bgp_sessions=sessions,
        )

    async def _apply(self, view: NodeDesired) -> None:
        agent = self.agent
        if self.announcer is not None and agent.config.bgp is not None:
            weight = announced_weight(view.effective_weight, agent.config.bgp.capacity_mbps)
            self.announcer.set_weight(weight)
        if view.drained and not agent.machine.drain_requested:
            self._drained_by_gslb = True
            agent.start_drain(f"GSLB: {view.drain_reason or 'drained'}", exit_when_done=False)
        elif not view.drained and self._drained_by_gslb:
            # Only a drain the GSLB asked for is ended by the GSLB; a local one stays.
            self._drained_by_gslb = False
            await agent.undrain("GSLB: undrained")
        log.info(
            "applied desired revision %d: weight %.1f%s",
            view.revision,
            view.effective_weight,
            ", drained" if view.drained else "",
        )

    def status(self) -> dict[str, Any]:
        sync = self.sync
        desired = sync.desired
        return {
            "endpoint": sync.endpoint,
            "stale": sync.stale,
            "last_success_age_s": None
            if sync.last_success is None
            else round(time.time() - sync.last_success, 3),
            "last_error": sync.last_error,
            "applied_revision": sync.applied_revision,
            "desired": None
            if desired is None
            else {
                "revision": desired.revision,
                "drained": desired.drained,
                "effective_weight": desired.effective_weight,
            },
        }
