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

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from contract.schemas import BgpSession, HealthSummary, Heartbeat, NodeDesired
from contract.schemas import NodeState as ReportedState
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
        self._last_positive: float | None = None
        self._announced: float | None = None
        self._reconciler: asyncio.Task[None] | None = None
        self._interval = config.heartbeat_interval
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
        self._reconciler = asyncio.get_running_loop().create_task(self._reconcile_forever())

    async def stop(self) -> None:
        if self._reconciler is not None:
            self._reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconciler
        await self.sync.stop()

    def weight_in_force(self, view: NodeDesired | None = None) -> float | None:
        """The effective weight to announce, or None before any view.

        Normally the view's; a drained view keeps the last positive weight (the drain
        choreography withdraws). And a view that gives this node 0 only because it was
        reported down (not drained, operator weight above 0) is the GSLB's reaction to
        our own old health: while no API answers it cannot be updated, so a node that
        has recovered announces its last positive weight instead of staying out.
        """
        view = view or self.sync.desired
        if view is None:
            return None
        if view.drained:
            # The GSLB's 0 for a drained node is where the drain ends, not how it starts:
            # the node's own choreography announces GRACEFUL_SHUTDOWN with the weight it
            # had, then withdraws once traffic has moved. A 0 here would withdraw at once.
            return self._last_positive if self._last_positive is not None else 0.0
        zero_for_health = (
            view.effective_weight == 0 and not view.drained and view.operator_weight > 0
        )
        if self.sync.stale and zero_for_health and self._last_positive is not None:
            return self._last_positive
        return view.effective_weight

    def _announce_weight(self, view: NodeDesired | None = None) -> None:
        weight = self.weight_in_force(view)
        if weight is None or weight == self._announced or self.announcer is None:
            return
        bgp = self.agent.config.bgp
        if bgp is None:
            return
        self._announced = weight
        self.announcer.set_weight(announced_weight(weight, bgp.capacity_mbps))

    async def _reconcile_forever(self) -> None:
        # Staleness changes with time, not with a new view: look again now and then.
        while True:
            await asyncio.sleep(self._interval)
            self._announce_weight()

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
        if view.effective_weight > 0:
            self._last_positive = view.effective_weight
        # The sync records the view as in force once this returns; announce from it now.
        self._announce_weight(view)
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
            "weight_in_force": self.weight_in_force(),
            "desired": None
            if desired is None
            else {
                "revision": desired.revision,
                "drained": desired.drained,
                "effective_weight": desired.effective_weight,
            },
        }
