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
from pathlib import Path
from typing import Any

from bgp.config import BgpConfig
from bgp.policy import Serving
from bgp.speaker import BgpSpeaker
from contract.schemas import BgpSession
from edge.ports import BeforeRouteChange, NodeControl
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


def is_held(wanted: Serving) -> bool:
    """Whether a change to `wanted` waits for the planned-change hold: every change but
    the withdraw of a node that is down (nothing of it is planned, and it must not wait)."""
    return wanted is not Serving.STOPPED


class BgpAnnouncer:
    name = "bgp"

    def __init__(
        self, config: BgpConfig, workdir: Path, before_change: BeforeRouteChange | None = None
    ) -> None:
        self.speaker = BgpSpeaker(config, workdir)
        self._node: NodeControl | None = None
        self._before_change = before_change
        # What the node wants announced, and what the speaker was last given.
        self._wanted: tuple[Serving, float | None] = (Serving.NOT_READY, None)
        self._applied: tuple[Serving, float | None] = (Serving.NOT_READY, None)
        self._why = ""
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._worker: asyncio.Task[None] | None = None

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

    def on_transition(self, transition: Transition) -> None:
        state, drain = transition.new, transition.drain
        self._want(serving(state, drain), None, f"node {state} (drain {drain.phase})")

    def _want(self, wanted: Serving, mbps: float | None, why: str) -> None:
        self._wanted = (wanted, mbps if mbps is not None else self._wanted[1])
        self._why = why
        if self._worker is None or not is_held(wanted):
            self._apply()
        elif self._wanted != self._applied:
            self._idle.clear()
            self._wake.set()

    def _apply(self) -> None:
        wanted, mbps = self._wanted
        changed_mbps = mbps if mbps != self._applied[1] else None
        reason = self.speaker.update(serving=wanted, link_bandwidth_mbps=changed_mbps)
        self._applied = self._wanted
        log.info("bgp: %s -> %s: %s", self._why, wanted, reason)

    async def _apply_held(self) -> None:
        """Planned changes, in order: hold, then hand the latest wanted state over."""
        assert self._before_change is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._wanted != self._applied:
                try:
                    await self._before_change(f"{self._why} -> {self._wanted[0]}")
                except Exception:
                    log.exception("bgp: the hold before a route change failed; going ahead")
                if self._wanted != self._applied:
                    self._apply()
            if not self._wake.is_set():
                self._idle.set()

    def degraded_reason(self) -> str | None:
        return self.speaker.degraded_reason()

    def status(self) -> dict[str, Any]:
        return self.speaker.status()

    def sessions(self) -> list[BgpSession]:
        peers = self.speaker.status().get("sessions", {})
        return [BgpSession(peer=p, state=v["state"]) for p, v in peers.items()]

    async def before_stop_accepting(self) -> bool:
        node = self._node
        assert node is not None, "started before a drain"
        await self._idle.wait()  # the draining announcement may still be held
        report = await self.speaker.wait_traffic_moved(lambda: node.report().accepted_total)
        log.info("bgp drain: %s after %.1f s", report.outcome, report.waited_s)
        return True
