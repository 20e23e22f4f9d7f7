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

The GSLB may also speak per service (`set_service_desired`): a service drained there
announces only its own prefixes with GRACEFUL_SHUTDOWN and prepends (routers move its new
flows to other nodes; its other prefixes, and the node's other services, are untouched,
and with no other node to go to the traffic stays rather than fail), and each service
announces its own link bandwidth. A service the GSLB does not name announces by the
node's fields alone.

A reload that starts or removes services (`edge.reload_plan`) calls `set_services`: a
started service's prefixes join, withdrawn until its own state has risen; a removed one is
`leaving` (announced as the GSLB's per-service drain does: GRACEFUL_SHUTDOWN and prepends)
until the agent has drained it, then no longer named, so withdrawn.

A planned change (anything but a withdraw because the node is down) can be held: the
composition root may wire a `BeforeRouteChange` (flow sharing: peers hold this node's
flows) that the announcer awaits before it hands the change to the speaker. Changes are
applied in order, the latest wanted state winning; a withdraw of a failed node never
waits (fail closed toward the network).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence, Set
from pathlib import Path
from typing import Any

from bgp.config import BgpConfig
from bgp.policy import PrefixGroup, Serving
from bgp.speaker import BgpSpeaker
from contract.schemas import AdminState, BgpReport, BgpSession, ServiceDesired
from edge.config import ServiceConfig
from edge.ports import BeforeRouteChange, NodeControl
from edge.services import ServiceState
from edge.state import Drain, DrainPhase, NodeState, Transition

log = logging.getLogger("edge.announcer")

_BY_STATE = {
    NodeState.STARTING: Serving.NOT_READY,
    NodeState.HEALTHY: Serving.FULL,
    NodeState.DEGRADED: Serving.REDUCED,
    NodeState.DOWN: Serving.STOPPED,
}


_BY_SERVICE_STATE = {
    ServiceState.STARTING: Serving.NOT_READY,
    ServiceState.HEALTHY: Serving.FULL,
    ServiceState.DEGRADED: Serving.REDUCED,
    ServiceState.DOWN: Serving.STOPPED,
}


def serving(state: NodeState, drain: Drain) -> Serving:
    """What the routers are told, from the node's state and its drain phase."""
    if drain.phase in (DrainPhase.CLOSING_CONNECTIONS, DrainPhase.DONE):
        return Serving.LEFT
    if state is NodeState.DRAINING:
        return Serving.LEAVING
    return _BY_STATE[state]


def service_serving(state: ServiceState, admin: AdminState = AdminState.ACTIVE) -> Serving:
    """What the routers are told of one service's prefixes, by its own state and the GSLB's
    admin state for it (the policy combines it with the node's): a drained service that
    would serve is LEAVING (GRACEFUL_SHUTDOWN), and stays so while the drain is in force."""
    own = _BY_SERVICE_STATE[state]
    if admin is not AdminState.ACTIVE and own in (Serving.FULL, Serving.REDUCED):
        return Serving.LEAVING
    return own


def prefix_groups(services: Sequence[ServiceConfig]) -> tuple[PrefixGroup, ...]:
    """The services' prefixes and attributes for the BGP policy (none, for today's
    single-service shape: the node's own `bgp.prefixes`, by the node's state alone)."""
    return tuple(
        PrefixGroup(
            name=service.name,
            prefixes=tuple(service.prefixes),
            med=service.bgp.med,
            communities=tuple(service.bgp.communities),
            large_communities=tuple(service.bgp.large_communities),
        )
        for service in services
    )


def is_held(wanted: Serving) -> bool:
    """Whether a change to `wanted` waits for the planned-change hold: every change but
    the withdraw of a node that is down (nothing of it is planned, and it must not wait)."""
    return wanted is not Serving.STOPPED


# The node's serving, its link bandwidth, each service's serving and link bandwidth.
_Wanted = tuple[Serving, float | None, dict[str, Serving] | None, dict[str, float]]


class BgpAnnouncer:
    name = "bgp"

    def __init__(
        self,
        config: BgpConfig,
        workdir: Path,
        services: Sequence[ServiceConfig] = (),
        before_change: BeforeRouteChange | None = None,
        med_penalty: int = 0,
    ) -> None:
        """`med_penalty`: added to every MED from the start (an active-passive standby's,
        until its group makes it active: `set_med_penalty`)."""
        self.groups = prefix_groups(services)
        self.speaker = BgpSpeaker(config, workdir, groups=self.groups, med_penalty=med_penalty)
        self._node: NodeControl | None = None
        self._before_change = before_change
        # What the node wants announced (node, link bandwidth, each service), and what
        # the speaker was last given.
        self._wanted: _Wanted = (Serving.NOT_READY, None, None, {})
        self._applied: _Wanted = (Serving.NOT_READY, None, None, {})
        # The GSLB's per-service view (services of this node it names), and all of it.
        self._service_desired: dict[str, ServiceDesired] = {}
        self._service_desired_all: dict[str, ServiceDesired] = {}
        # Services a reload removed, being drained: announced as leaving.
        self._leaving: frozenset[str] = frozenset()
        # The groups changed since the speaker was last given a state (a reload).
        self._groups_changed = False
        self._why = ""
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._worker: asyncio.Task[None] | None = None
        # The planned-change holds awaited: how many, and the last one's and the longest
        # wait (for /status: a slow hold delays every weight change that goes through it).
        self._holds = 0
        self._hold_last_s = 0.0
        self._hold_max_s = 0.0

    async def start(self, node: NodeControl) -> None:
        self._node = node
        await self.speaker.start()
        if self._before_change is not None:
            self._worker = asyncio.get_running_loop().create_task(self._apply_held())
        self._want(serving(node.state, node.drain), None, f"start: node {node.state}")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        await self.speaker.stop()

    def set_link_bandwidth(self, mbps: float) -> None:
        """The GSLB's share for this node, in Mbit/s (what it announces at full health)."""
        self._want(self._wanted[0], mbps, f"link bandwidth {mbps:.1f} Mbit/s")

    def set_med_penalty(self, penalty: int) -> None:
        """The vip_group's role (announce: bgp): 0 while active, the standby's penalty
        otherwise. Goes at once: it moves traffic to the new active (no planned hold)."""
        if penalty == self.speaker.announcer.inputs.med_penalty:
            return
        reason = self.speaker.update(med_penalty=penalty)
        log.info(
            "bgp: MED penalty %d (%s): %s",
            penalty,
            "standby" if penalty else "active",
            reason,
            extra={"event": "announcement", "why": "vip group role", "med_penalty": penalty},
        )

    def set_service_desired(self, services: dict[str, ServiceDesired]) -> None:
        """The GSLB's admin state and share per service (contract 3); services of this node
        it does not name go by the node's fields."""
        self._service_desired_all = dict(services)
        mine = {g.name for g in self.groups}
        wanted = {name: view for name, view in services.items() if name in mine}
        if wanted == self._service_desired:
            return
        self._service_desired = wanted
        summary = ", ".join(
            f"{name} {view.admin_state} {view.link_bandwidth_mbps:.1f} Mbit/s"
            for name, view in sorted(wanted.items())
        )
        self._want(self._wanted[0], None, f"services: {summary or 'none named'}")

    def set_services(self, services: Sequence[ServiceConfig], leaving: Set[str]) -> None:
        """A reload's services (`edge.ports.ServiceAnnouncer`)."""
        groups = prefix_groups(services)
        if groups == self.groups and leaving == self._leaving:
            return
        self.groups = groups
        self._leaving = frozenset(leaving)
        self.speaker.set_groups(groups)
        self._groups_changed = True
        mine = {g.name for g in groups}
        self._service_desired = {
            name: view for name, view in self._service_desired_all.items() if name in mine
        }
        names = ", ".join(g.name + (" (leaving)" if g.name in leaving else "") for g in groups)
        self._want(self._wanted[0], None, f"reload: services {names or 'none'}")

    async def before_service_stops_accepting(
        self, service: str, accepted_total: Callable[[], int]
    ) -> bool:
        await self._idle.wait()  # the leaving announcement may still be held
        report = await self.speaker.wait_traffic_moved(accepted_total)
        log.info(
            "bgp drain of service %s: %s after %.1f s",
            service,
            report.outcome,
            report.waited_s,
            extra={
                "event": "drain",
                "service": service,
                "outcome": str(report.outcome),
                "waited_s": report.waited_s,
            },
        )
        return True

    def on_transition(self, transition: Transition) -> None:
        state, drain = transition.new, transition.drain
        self._want(serving(state, drain), None, f"node {state} (drain {drain.phase})")

    def _want(self, wanted: Serving, mbps: float | None, why: str) -> None:
        groups = self._group_serving()
        before = self._applied[2] or {}
        group_mbps = {n: v.link_bandwidth_mbps for n, v in self._service_desired.items()}
        node_mbps = mbps if mbps is not None else self._wanted[1]
        self._wanted = (wanted, node_mbps, groups, group_mbps)
        self._why = why
        # A service going down withdraws its prefixes at once, like a node going down.
        service_lost = any(
            s is Serving.STOPPED and before.get(name) is not Serving.STOPPED
            for name, s in (groups or {}).items()
        )
        if self._worker is None or not is_held(wanted) or service_lost:
            self._apply()
        elif self._wanted != self._applied or self._groups_changed:
            self._idle.clear()
            self._wake.set()

    def _group_serving(self) -> dict[str, Serving] | None:
        if not self.groups or self._node is None:
            return None
        admin = {n: v.admin_state for n, v in self._service_desired.items()}
        admin.update(dict.fromkeys(self._leaving, AdminState.DRAINING))
        return {
            name: service_serving(s, admin.get(name, AdminState.ACTIVE))
            for name, s in self._node.service_states().items()
        }

    def _apply(self) -> None:
        wanted, mbps, groups, group_mbps = self._wanted
        changed_mbps = mbps if mbps != self._applied[1] else None
        reason = self.speaker.update(
            serving=wanted,
            link_bandwidth_mbps=changed_mbps,
            group_serving=groups,
            group_link_bandwidth_mbps=group_mbps,
        )
        self._applied = self._wanted
        self._groups_changed = False
        log.info(
            "bgp: %s -> %s: %s; services %s",
            self._why,
            wanted,
            reason,
            groups,
            extra={
                "event": "announcement",
                "why": self._why,
                "serving": str(wanted),
                "link_bandwidth_mbps": mbps,
                "service_link_bandwidth_mbps": group_mbps,
                "reason": str(reason),
            },
        )

    async def _apply_held(self) -> None:
        """Planned changes, in order: hold, then hand the latest wanted state over."""
        assert self._before_change is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._wanted != self._applied or self._groups_changed:
                started = time.monotonic()
                try:
                    await self._before_change(f"{self._why} -> {self._wanted[0]}")
                except Exception:
                    log.exception("bgp: the hold before a route change failed; going ahead")
                self._holds += 1
                self._hold_last_s = time.monotonic() - started
                self._hold_max_s = max(self._hold_max_s, self._hold_last_s)
                if self._wanted != self._applied or self._groups_changed:
                    self._apply()
            if not self._wake.is_set():
                self._idle.set()

    def degraded_reason(self) -> str | None:
        return self.speaker.degraded_reason()

    def status(self) -> dict[str, Any]:
        holds = {
            "count": self._holds,
            "last_s": round(self._hold_last_s, 4),
            "max_s": round(self._hold_max_s, 4),
        }
        return {**self.speaker.status(), "planned_change_holds": holds}

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
        await self._idle.wait()  # the draining announcement may still be held
        report = await self.speaker.wait_traffic_moved(lambda: node.report().accepted_total)
        log.info(
            "bgp drain: %s after %.1f s",
            report.outcome,
            report.waited_s,
            extra={"event": "drain", "outcome": str(report.outcome), "waited_s": report.waited_s},
        )
        return True
