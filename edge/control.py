"""The control-plane link: an agent extension that follows the GSLB.

Desired view in, heartbeats out. The view says two things, kept apart: whether to serve
(`admin_state`, acted on through `NodeControl` as a drain whose source is the GSLB) and how
much (`link_bandwidth_mbps`, handed as it is to whoever announces it, wired by the
composition root); and the same per service (`service_desired`, handed as it is to the
announcer, which drains and weighs only that service's prefixes). Neither is changed on the
way: the GSLB computes the share as if this node were serving, so it is right the moment
the node serves again, during a drain, and while no API answers; the node's own health
never reaches it (the BGP policy acts on it).

Static stability lives in `edge.sync.ControlPlaneSync`: it keeps the last known good view
in memory and on disk and only ever hands this link a view to apply. Losing every API
therefore changes nothing here: the node keeps serving and announcing with what it last
applied, and `/status` says the view is stale.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from contract.schemas import (
    AdminState,
    BgpReport,
    BgpSession,
    DrainReport,
    FlowShareReport,
    HealthSummary,
    Heartbeat,
    NodeDesired,
    ServiceDesired,
    VipGroupReport,
)
from edge.config import ControlPlaneConfig
from edge.ports import NodeControl
from edge.state import DrainSource, Transition
from edge.sync import ControlPlaneSync

log = logging.getLogger("edge.control")

LinkBandwidthSink = Callable[[float], None]
ServiceDesiredSink = Callable[[dict[str, ServiceDesired]], None]
SessionsSource = Callable[[], list[BgpSession]]
BgpReportSource = Callable[[], BgpReport]
VipGroupSource = Callable[[], VipGroupReport]
FlowShareSource = Callable[[], FlowShareReport]


class ControlPlaneLink:
    name = "control_plane"

    def __init__(
        self,
        config: ControlPlaneConfig,
        node_name: str,
        *,
        on_link_bandwidth: LinkBandwidthSink | None = None,
        on_service_desired: ServiceDesiredSink | None = None,
        bgp_sessions: SessionsSource | None = None,
        bgp_report: BgpReportSource | None = None,
        vip_group: VipGroupSource | None = None,
        flowshare: FlowShareSource | None = None,
    ) -> None:
        self._on_link_bandwidth = on_link_bandwidth
        self._on_service_desired = on_service_desired
        self._bgp_sessions = bgp_sessions
        self._bgp_report = bgp_report
        self._vip_group = vip_group
        self._flowshare = flowshare
        self._node: NodeControl | None = None
        verify: bool | str = str(config.ca_file) if config.ca_file else True
        self.sync = ControlPlaneSync(
            endpoints=config.endpoints,
            token=config.bearer_token(),
            node=node_name,
            state_path=config.state_file,
            heartbeat=self._heartbeat,
            on_desired=self._apply,
            heartbeat_interval_s=config.heartbeat_interval,
            request_timeout_s=config.request_timeout,
            verify=verify,
        )

    async def start(self, node: NodeControl) -> None:
        self._node = node
        self.sync.start()

    async def stop(self) -> None:
        await self.sync.stop()

    def on_transition(self, transition: Transition) -> None:
        pass  # the next heartbeat reports it

    def degraded_reason(self) -> str | None:
        return None

    async def before_stop_accepting(self) -> bool:
        return False

    def _heartbeat(self) -> Heartbeat:
        assert self._node is not None
        report = self._node.report()
        return Heartbeat(
            state=report.state,
            health=HealthSummary(
                backends_total=report.backends_total,
                backends_healthy=report.backends_healthy,
                detail=report.cause[:500],
            ),
            connections=report.open_connections,
            bgp_sessions=self._bgp_sessions() if self._bgp_sessions else [],
            bgp=self._bgp_report() if self._bgp_report else None,
            drain=DrainReport(
                phase=report.drain.phase, source=report.drain.source, reason=report.drain.reason
            )
            if report.drain.active
            else None,
            vip_group=self._vip_group() if self._vip_group else None,
            services=list(report.services),
            flowshare=self._flowshare() if self._flowshare else None,
        )

    async def _apply(self, view: NodeDesired) -> None:
        node = self._node
        assert node is not None
        # The sync records the view as in force once this returns; announce from it now.
        if self._on_link_bandwidth is not None:
            self._on_link_bandwidth(view.link_bandwidth_mbps)
        if self._on_service_desired is not None:
            self._on_service_desired(dict(view.service_desired))
        if view.admin_state is AdminState.ACTIVE:
            # Ends only a drain the GSLB started (the state machine's rule); a local one stays.
            await node.undrain(DrainSource.GSLB, "undrained by the GSLB")
        else:
            node.request_drain(DrainSource.GSLB, view.drain_reason or "drained by the GSLB")
        log.info(
            "applied desired revision %d: %s, link bandwidth %.1f Mbit/s",
            view.revision,
            view.admin_state,
            view.link_bandwidth_mbps,
            extra={
                "event": "desired",
                "revision": view.revision,
                "admin_state": str(view.admin_state),
                "link_bandwidth_mbps": view.link_bandwidth_mbps,
                "reason": view.drain_reason,
            },
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
                "admin_state": str(desired.admin_state),
                "drain_reason": desired.drain_reason,
                "link_bandwidth_mbps": desired.link_bandwidth_mbps,
                "services": {
                    name: view.model_dump(mode="json")
                    for name, view in desired.service_desired.items()
                },
            },
        }
