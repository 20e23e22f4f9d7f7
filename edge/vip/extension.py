"""The active-passive group as an agent extension: heartbeats, election, VIP, fencing.

The shape the agent's extensions share: `async start()`, `async stop()`, `status()` (a
section of /status), `degraded_reason()`, and `before_stop_accepting(reason)` (the step of
a drain before listeners close: hand the VIP over first). It reads the node's health
through the callable it is given and owns nothing of the agent.

Every decision is the election's (`edge.vip.election`); this module only feeds it time,
health, heartbeats and the fence, and applies what it returns:

- one loop steps the election every `advert_interval` (and at once when a heartbeat or
  the fence changes the picture), applies the decision to the address, and sends a
  heartbeat to every other member;
- with fencing, a second loop renews or acquires the ownership key (what the election
  wants) and feeds the resulting view back, and a watch on the key feeds the election
  what the store shows of it as soon as it changes (election rule 7);
- with an `arp_monitor`, a loop probes its targets by ARP every `interval` and tells the
  election whether this node is cut off from the segment (`edge.vip.track`, rule 8);
- a third beats to the VIP guard (`edge.vip.guard`, a process of its own started here)
  every 100 ms and reads what it says: the guard is armed (VIP and lease id) before the
  VIP is added and disarmed after it is removed; when it fired (this loop was silent for
  `guard_bound`), the election goes through again (`Election.guard_fired`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from contract.schemas import VipGroupReport, VipRole
from edge.config import VipGroupConfig
from edge.ports import ExtensionSetupError, NodeControl
from edge.state import SERVING_STATES, NodeState, Transition
from edge.vip.address import Announcer, ArpProber, VipAddress, check_vip_interface
from edge.vip.election import (
    QUORUM_MARGIN_S,
    Action,
    Decision,
    Election,
    ElectionConfig,
    PeerReport,
    address_lifetime,
)
from edge.vip.fence import EtcdFence, EtcdLeaseClient
from edge.vip.heartbeat import (
    MAX_SESSION_BYTES,
    MAX_VOTE_BYTES,
    Counter,
    Heartbeat,
    HeartbeatRefused,
    Receiver,
    encode,
)
from edge.vip.quorum import Grants, Vote, Voter
from edge.vip.sessions import SessionTable
from edge.vip.track import ReachTrack

_KEEPING = frozenset({str(Action.KEEP), str(Action.REANNOUNCE)})

log = logging.getLogger("edge.vip")
# httpx logs every request at INFO: the fence makes several a second.
logging.getLogger("httpx").setLevel(logging.WARNING)

HANDOVER_TIMEOUT_S = 3.0
STOP_RELEASE_BUDGET_S = 1.0
GUARD_BEAT_S = 0.1
GUARD_START_TIMEOUT_S = 10.0
#: A gap between two beats of this share of guard_bound while armed: the guard may have
#: fired (it fires only when it saw no beat for the whole bound).
GUARD_SUSPECT = 0.8
#: Linux's IP_MULTICAST_ALL (not in the socket module): 0 delivers only the groups this
#: socket joined.
_IP_MULTICAST_ALL = 49


class VipSetupError(ExtensionSetupError):
    """The group cannot run on this host as configured (one line for the operator)."""


class _HeartbeatProtocol(asyncio.DatagramProtocol):
    def __init__(self, on_packet: Callable[[bytes, str], None]) -> None:
        self.on_packet = on_packet

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.on_packet(data, str(addr[0]))

    def error_received(self, exc: Exception) -> None:
        log.debug("heartbeat socket: %s", exc)


class VipExtension:
    name = "vip_group"

    def __init__(
        self,
        config: VipGroupConfig,
        node_name: str,
        health: Callable[[], NodeState] | None = None,
        sessions: SessionTable | None = None,
        set_med_penalty: Callable[[int], None] | None = None,
    ) -> None:
        """`health`: the node's state, for a group run without an agent; under an agent the
        extension reads it from the agent's NodeControl once started."""
        self.config = config
        # announce: bgp: the role is a MED penalty on the node's BGP announcement (the
        # bgp extension's), not an address on the segment.
        self.bgp_mode = config.announce == "bgp"
        self._set_med_penalty = set_med_penalty
        # Sticky mappings: the active sends its table in the heartbeats, a standby applies
        # the active's (the data path records and looks up through the same object).
        self.sessions = sessions
        self.node_id = config.node_id or node_name
        self.health: Callable[[], NodeState] = health or (lambda: NodeState.STARTING)
        self.members = {m.id: m.address for m in config.members}
        self.address = self.members[self.node_id]
        fencing = config.fencing
        margin = fencing.lease_margin if fencing else QUORUM_MARGIN_S
        self.election = Election(
            ElectionConfig(
                node_id=self.node_id,
                priority=config.priority,
                advert_interval_s=config.advert_interval,
                dead_after=config.dead_after,
                preempt=config.preempt,
                preempt_delay_s=config.preempt_delay,
                # a witness's majority grant fences like the store's key (edge.vip.quorum)
                fenced=fencing is not None or config.quorum,
                **({"lease_margin_s": margin} if fencing or config.quorum else {}),
            )
        )
        # With a witness among the members: every member votes; this node's majority grant
        # is the election's fence view.
        self.witnesses = frozenset(m.id for m in config.members if m.witness)
        self.voter: Voter | None = None
        self.grants: Grants | None = None
        if config.quorum:
            self.voter = Voter.of_group(self.node_id, config, time.monotonic())
            self.grants = Grants(
                self.node_id, frozenset(m.id for m in config.members), config.quorum_hold
            )
        self.key = config.shared_key()
        self.receiver = Receiver(
            self.key, config.name, self.members, self.node_id, config.replay_window
        )
        self.counter = Counter()
        self.fence: EtcdFence | None = None
        self.vip: VipAddress | None = None
        self.announcer: Announcer | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._mcast_transport: asyncio.DatagramTransport | None = None
        group = config.multicast
        # where a heartbeat goes: the group, or every other member
        self.destinations = (
            [group]
            if group is not None
            else [a for i, a in self.members.items() if i != self.node_id]
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._fence_wake = asyncio.Event()
        self._handing_over = False
        #: The VIP may be in this node's kernel: set before it is put there, cleared only
        #: once its removal returned. The fence keeps the key while it is set, so the key
        #: is never given back (and claimed by a peer) while the address is still here.
        self._vip_may_be_held = False
        self._last_burst = float("-inf")
        self._peer_health: dict[str, tuple[NodeState, float]] = {}
        self.transitions: deque[dict[str, Any]] = deque(maxlen=20)
        self.claims_total = 0
        self.heartbeats_sent = 0
        self.heartbeats_accepted = 0
        self.crash_leftover_removed = False
        self._guard: asyncio.subprocess.Process | None = None
        self._guard_reader: asyncio.StreamReader | None = None
        self._guard_writer: asyncio.StreamWriter | None = None
        self._guard_armed: int | None = None  # the lease id the guard holds (None: disarmed)
        self._last_guard_beat = float("-inf")
        self._guard_suspect = False  # silent for ~the bound while armed (see _beat_guard)
        self.guard_fired_total = 0
        self.guard_lost = False
        self.prober: ArpProber | None = None
        monitor = config.arp_monitor
        self.track = ReachTrack(monitor.missed, monitor.interval) if monitor else None
        self._was_isolated = False

    # -- life cycle --------------------------------------------------------------------
    async def start(self, node: NodeControl | None = None) -> None:
        if node is not None:
            self.health = lambda: node.state
        if self.bgp_mode:
            await self._start_bgp_mode()
            return
        problem = await check_vip_interface(self.config.interface, self.config.vip)
        if problem:
            raise VipSetupError(problem)
        self.vip = await VipAddress.open(self.config.interface, self.config.vip)
        # Whatever is on the interface now is not ours: we own nothing before we are elected
        # (a previous run that crashed, or an operator's leftover).
        if await self.vip.remove():
            self.crash_leftover_removed = True
            log.warning("removed %s found on %s at start", self.config.vip, self.vip.interface)
        self.announcer = Announcer(self.config.interface, self.config.vip, self.vip.mac)
        loop = asyncio.get_running_loop()
        await self._open_heartbeats()
        await self._start_guard()
        self._start_fence(loop)
        if self.config.arp_monitor is not None:
            targets = self.config.arp_monitor.targets
            self.prober = ArpProber(self.config.interface, self.vip.mac, self.address, targets)
            self._tasks.append(loop.create_task(self._arp_loop()))
        self._tasks.append(loop.create_task(self._tick_loop()))
        self._tasks.append(loop.create_task(self._guard_beat_loop()))
        self._tasks.append(loop.create_task(self._guard_read_loop()))
        log.info(
            "vip group %s: %s on %s as %s (priority %d)%s",
            self.config.name,
            self.config.vip,
            self.config.interface,
            self.node_id,
            self.config.priority,
            ", fenced by etcd" if self.fence else ", unfenced",
        )

    async def _start_bgp_mode(self) -> None:
        """announce: bgp: heartbeats, election and fence as always; the VIP stays on every
        member's loopback and the role only sets the MED penalty (no address to move, no
        gratuitous ARP, no guard: a dead or frozen active's BGP session or BFD takes its
        route, and the standby's is already in the routers)."""
        if self._set_med_penalty is None:
            raise VipSetupError("vip_group.announce: bgp needs the node's bgp: section")
        self._set_med_penalty(self.config.standby_med_penalty)
        loop = asyncio.get_running_loop()
        await self._open_heartbeats()
        self._start_fence(loop)
        self._tasks.append(loop.create_task(self._tick_loop()))
        log.info(
            "vip group %s: %s announced by BGP as %s (priority %d, standby MED +%d)%s",
            self.config.name,
            self.config.vip,
            self.node_id,
            self.config.priority,
            self.config.standby_med_penalty,
            ", fenced by etcd" if self.fence else "",
        )

    async def _open_heartbeats(self) -> None:
        """The heartbeat socket on the member address (and the group's, with multicast)."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _HeartbeatProtocol(self._received), local_addr=(self.address, self.config.port)
        )
        self._transport = transport
        if self.config.multicast is not None:
            self._mcast_transport = await self._join_multicast(transport, self.config.multicast)

    def _start_fence(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.config.fencing is None:
            return
        f = self.config.fencing
        client = EtcdLeaseClient(f.endpoints, f.request_timeout)
        key = f"{f.prefix}{self.config.name}/owner"
        # the election sees every view the moment the fence takes it: a release sets
        # "not held" before its txn leaves, so no step can claim on the key meanwhile
        self.fence = EtcdFence(
            client, key, self.node_id, f.lease_ttl, on_view=self.election.fence_changed
        )
        self._tasks.append(loop.create_task(self._fence_loop()))
        self._tasks.append(loop.create_task(self.fence.watch(self._key_changed)))

    async def _join_multicast(
        self, unicast: asyncio.DatagramTransport, group: str
    ) -> asyncio.DatagramTransport:
        """Send from the member address to `group` on the group's interface only (TTL 1, no
        loop back), and receive the group's datagrams on a socket bound to the group."""
        ifindex = socket.if_nametoindex(self.config.interface)
        sender = unicast.get_extra_info("socket")
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(self.address))
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # only the group joined on this socket, not every group of every socket
            sock.setsockopt(socket.IPPROTO_IP, _IP_MULTICAST_ALL, 0)
            sock.bind((group, self.config.port))
            membership = struct.pack(
                "=4s4si", socket.inet_aton(group), socket.inet_aton(self.address), ifindex
            )
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _HeartbeatProtocol(self._received), sock=sock
        )
        return transport

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        was_owning = self.election.owning
        if self.vip is not None:
            with contextlib.suppress(Exception):
                await self.vip.remove()
        self.election.owning = False
        self.election.eligible = False
        if was_owning:
            self._record(False, Action.RELEASE, "stopping")
        for _ in range(2):  # tell the peers at once rather than after their dead interval
            self._send_heartbeat(NodeState.DOWN)
        if self.fence is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.fence.release(), STOP_RELEASE_BUDGET_S)
            await self.fence.client.close()
        await self._stop_guard()
        if self._transport is not None:
            self._transport.close()
        if self._mcast_transport is not None:
            self._mcast_transport.close()
        if self.announcer is not None:
            self.announcer.close()
        if self.prober is not None:
            self.prober.close()
        if self.vip is not None:
            self.vip.close()

    def on_transition(self, transition: Transition) -> None:
        """The node's health changed: decide at once rather than at the next tick."""
        self._wake.set()

    async def before_stop_accepting(self) -> bool:
        """A drain: give the VIP to a peer before listeners close (bounded). True once a
        peer holds it (traffic has moved: the agent's fixed accept grace is not needed)."""
        self._handing_over = True
        self._wake.set()
        deadline = time.monotonic() + HANDOVER_TIMEOUT_S
        while time.monotonic() < deadline:
            now = time.monotonic()
            if not self.election.owning and any(
                p.report.active for p in self.election.live_peers(now)
            ):
                return True
            await asyncio.sleep(self.config.advert_interval / 2)
        log.warning("drain: no peer took the VIP within %.0f s", HANDOVER_TIMEOUT_S)
        return False

    # -- the guard ---------------------------------------------------------------------
    async def _start_guard(self) -> None:
        ours, theirs = socket.socketpair()
        f = self.config.fencing
        endpoints = [a for e in (f.endpoints if f else []) for a in ("--endpoint", str(e))]
        # fmt: off
        command = [
            sys.executable, "-m", "edge.vip.guard", "--fd", str(theirs.fileno()),
            "--interface", self.config.interface, "--vip", self.config.vip,
            "--bound-ms", str(round(self.config.guard_bound * 1000)), *endpoints,
        ]
        # fmt: on
        try:
            self._guard = await asyncio.create_subprocess_exec(
                *command, pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL
            )
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        self._guard_reader, self._guard_writer = reader, writer
        try:
            async with asyncio.timeout(GUARD_START_TIMEOUT_S):
                ready = await reader.readline()
        except TimeoutError:
            ready = b""
        if not ready.startswith(b"#guard ready"):
            await self._stop_guard()
            raise VipSetupError("vip_group: the VIP guard (edge.vip.guard) did not start")
        self._beat_guard()

    async def _stop_guard(self) -> None:
        if self._guard_writer is not None:
            with contextlib.suppress(OSError, RuntimeError):
                self._guard_writer.write(b"bye\n")
                self._guard_writer.close()
        if self._guard is not None and self._guard.returncode is None:
            try:
                async with asyncio.timeout(2.0):
                    await self._guard.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self._guard.kill()
                await self._guard.wait()
        self._guard = None

    def _tell_guard(self, line: bytes) -> None:
        if self._guard_writer is not None and not self._guard_writer.is_closing():
            self._guard_writer.write(line + b"\n")

    def _beat_guard(self) -> None:
        now = time.monotonic()
        gap = now - self._last_guard_beat
        if self._guard_armed is not None and gap >= GUARD_SUSPECT * self.config.guard_bound:
            # This loop was silent for about the guard's bound: the guard may have fired
            # (removed the VIP, revoked the lease) and its word may still be on the way. A
            # beat now does not undo that: never put the VIP back on this ownership, step
            # down as if it fired (a standby may hold the key already).
            if not self._guard_suspect:
                log.warning(
                    "vip group %s: silent %.0f ms while owning: stepping down",
                    self.config.name,
                    gap * 1000,
                )
            self._guard_suspect = True
            self.election.guard_fired(now)
            self._wake.set()
        self._tell_guard(b"#beat")
        self._last_guard_beat = now

    def _guard_current(self) -> bool:
        """The guard cannot have fired: we beat to it well within its bound. Checked just
        before the kernel is asked to (re)add the VIP."""
        if self.guard_lost:
            return True  # no guard any more: the lease and the address lifetime as without one
        if self._guard_suspect:
            return False  # it may have fired: not before the VIP was removed and disarmed
        return time.monotonic() - self._last_guard_beat < self.config.guard_bound / 2

    def _arm_guard(self) -> None:
        lease = self.fence.lease_id if self.fence is not None else 0
        if self._guard_armed != lease:
            self._tell_guard(f"arm {lease}".encode())
            self._guard_armed = lease

    def _disarm_guard(self) -> None:
        self._guard_suspect = False
        if self._guard_armed is not None:
            self._tell_guard(b"disarm")
            self._guard_armed = None

    async def _guard_beat_loop(self) -> None:
        while True:
            self._beat_guard()
            await asyncio.sleep(GUARD_BEAT_S)

    async def _guard_read_loop(self) -> None:
        assert self._guard_reader is not None
        while True:
            line = await self._guard_reader.readline()
            if not line:
                break
            if line.startswith(b"#guard fired"):
                self.guard_fired_total += 1
                self._guard_armed = None
                log.warning("vip group %s: %s", self.config.name, line.decode().strip())
                if self.fence is not None:
                    self.fence.lost()
                self.election.guard_fired(time.monotonic())
                self._wake.set()
        # the guard died: undo as if it fired (it may have), then run without one
        log.error("vip group %s: the VIP guard exited", self.config.name)
        self.guard_lost = True
        self._guard_armed = None
        if self.fence is not None and self.election.owning:
            self.fence.lost()
        self.election.guard_fired(time.monotonic())
        self._wake.set()

    # -- the loops ---------------------------------------------------------------------
    async def _tick_loop(self) -> None:
        while True:
            try:
                await self._step()
            except Exception:
                log.exception("vip group step failed")
            # asyncio.timeout, not wait_for: 3.11's wait_for swallows a cancellation that
            # arrives as the event is set, and this loop would then never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.advert_interval):
                    await self._wake.wait()
            self._wake.clear()

    async def _fence_loop(self) -> None:
        assert self.fence is not None and self.config.fencing is not None
        renew_every = min(0.25, self.config.fencing.lease_ttl / 8)
        margin = self.config.fencing.lease_margin
        while True:
            decision = self.election.last_decision
            # a decision to let go is taken before the VIP's removal returns: until it has,
            # a key we hold stays ours (this loop may run in between); it never makes us
            # ask for a key we do not hold
            keep = self._vip_may_be_held and self.fence.view.holds
            want = (decision is not None and decision.want_key) or keep
            before = self.fence.view
            view = await self.fence.update(want)
            self.election.fence_changed(view)
            if (view.holds, view.reachable) != (before.holds, before.reachable):
                self._wake.set()
            # a standby that wants the key asks every 50 ms, or, while the watch shows
            # another holder, when the watch sees the key go (it wakes this loop)
            held_elsewhere = self.fence.watching and view.key_token != 0
            # (a standby also keeps its own lease alive: within fence.LEASE_FRESH_S)
            pause = renew_every if view.holds else (0.05 if want and not held_elsewhere else 0.25)
            if view.holds:
                # renew while half the time above the election's margin is left, so that
                # the renewal lands before the owner would have to let go (LEASE_EXPIRING)
                above = view.lease_deadline - time.monotonic() - margin
                pause = max(0.01, min(pause, above / 2))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._fence_wake.wait()
            self._fence_wake.clear()

    def _key_changed(self) -> None:
        """The watch saw the ownership key change holder: decide now (rule 7). The fence
        loop is woken by the step, once it decided whether it wants the key."""
        assert self.fence is not None
        self.election.fence_changed(self.fence.view)
        self._wake.set()

    def _isolated(self, now: float) -> bool:
        if self.track is None:
            return False
        return self.track.isolated(now, self.election.last_peer_heard())

    async def _arp_loop(self) -> None:
        assert self.prober is not None and self.track is not None
        interval = self.track.interval_s
        while True:
            if self.prober.answers():
                self.track.answered()
            self.track.new_round()
            self.prober.send()
            isolated = self._isolated(time.monotonic())
            if isolated != self._was_isolated:
                self._was_isolated = isolated
                log.warning(
                    "vip group %s: %s",
                    self.config.name,
                    "cut off: no ARP target and no peer answers"
                    if isolated
                    else "the segment answers again",
                )
                self._wake.set()
            await asyncio.sleep(interval)

    async def _step(self) -> None:
        state = self.health()
        healthy = state in SERVING_STATES and not self._handing_over
        before = self.election.last_decision
        now = time.monotonic()
        if self.grants is not None:
            self.election.fence_changed(self.grants.view(now))
        decision = self.election.step(now, healthy, self._isolated(now))
        await self._apply(decision)
        if before is None or before.want_key != decision.want_key:
            self._fence_wake.set()
        if before is None or (before.owning, before.reason) != (decision.owning, decision.reason):
            self._record(decision.owning, decision.action, decision.reason)
        self._send_heartbeat(state)

    async def _apply(self, decision: Decision) -> None:
        if self.bgp_mode:
            assert self._set_med_penalty is not None
            self._set_med_penalty(0 if decision.owning else self.config.standby_med_penalty)
            if decision.action is Action.CLAIM:
                self.claims_total += 1
            return
        assert self.vip is not None
        if decision.owning:
            assert decision.lifetime_s is not None
            decided = decision.lifetime_s
            self._arm_guard()  # before the VIP is in the kernel
            self._vip_may_be_held = True

            def lifetime() -> int:
                if not self._guard_current():
                    return 0  # the guard may be firing: wait for its word
                # the fence as it is now (the put waits for the netlink thread, and the
                # fence may have lost or begun to give back the key since the decision)
                return min(decided, address_lifetime(self.election.fence, time.monotonic()))

            if not await self.vip.put(lifetime):
                log.warning("vip group %s: no lease time left to refresh the VIP", self.config.name)
            if decision.action is Action.CLAIM:
                self.claims_total += 1
                self._burst()
            elif decision.action is Action.REANNOUNCE and (
                time.monotonic() - self._last_burst >= self.config.reannounce_min_interval
            ):
                self._burst()
        elif decision.action is Action.RELEASE or await self.vip.present():
            await self.vip.remove()
            self._vip_may_be_held = False
            self._disarm_guard()
        else:
            self._vip_may_be_held = False
            self._disarm_guard()

    def _burst(self) -> None:
        """`garp_count` announcements, the first now, each only while we still own it."""
        self._last_burst = time.monotonic()
        loop = asyncio.get_running_loop()
        for i in range(self.config.garp_count):
            loop.call_later(i * self.config.garp_interval, self._announce_if_owning)

    def _announce_if_owning(self) -> None:
        if self.election.owning and self.announcer is not None:
            self.announcer.send()

    # -- heartbeats --------------------------------------------------------------------
    def _send_heartbeat(self, state: NodeState) -> None:
        if self._transport is None:
            return
        fence = self.election.fence
        counter = self.counter.next(time.time_ns())
        vote = Vote(None)
        if self.voter is not None and self.grants is not None:
            now = time.monotonic()
            election = self.election
            self.voter.heard(
                self.node_id, self.config.priority, election.eligible, election.owning, counter, now
            )
            vote = self.voter.vote(now)
            self.grants.sent_counter(counter, now)
            self.grants.voted(self.node_id, vote)
        budget = MAX_SESSION_BYTES - (MAX_VOTE_BYTES if self.voter is not None else 0)
        beat = Heartbeat(
            node_id=self.node_id,
            group=self.config.name,
            priority=self.config.priority,
            health=state,
            active=self.election.owning,
            eligible=self.election.eligible,
            term=self.election.term,
            token=fence.token if fence is not None and fence.holds else 0,
            counter=counter,
            sessions=self.sessions.next_delta(budget)
            if self.sessions is not None and self.election.owning
            else (),
            voting=self.voter is not None,
            vote_for=vote.candidate,
            vote_echo=vote.echo,
        )
        packet = encode(beat, self.key)
        for address in self.destinations:
            self._transport.sendto(packet, (address, self.config.port))
        self.heartbeats_sent += 1

    def _received(self, packet: bytes, source: str) -> None:
        try:
            beat = self.receiver.accept(packet, time.time_ns(), source)
        except HeartbeatRefused as refused:
            log.debug("heartbeat from %s refused: %s", source, refused)
            return
        self.heartbeats_accepted += 1
        now = time.monotonic()
        if self.voter is not None and self.grants is not None:
            self.voter.heard(
                beat.node_id, beat.priority, beat.eligible, beat.active, beat.counter, now
            )
            if beat.voting:
                self.grants.voted(beat.node_id, Vote(beat.vote_for, beat.vote_echo))
            before = self.election.fence
            view = self.grants.view(now)
            self.election.fence_changed(view)
            if before is None or before.holds != view.holds:
                self._wake.set()  # a majority granted, or stopped granting: decide now
        if beat.node_id in self.witnesses:
            self._peer_health[beat.node_id] = (beat.health, time.time())
            return  # a witness only votes: never a claimant, never a candidate
        previous = self.election.peers.get(beat.node_id)
        self.election.heard(
            PeerReport(
                beat.node_id, beat.priority, beat.eligible, beat.active, beat.term, beat.token
            ),
            now,
        )
        self._peer_health[beat.node_id] = (beat.health, time.time())
        if self.sessions is not None and beat.active and not self.election.owning:
            self.sessions.apply(beat.sessions)
        was_active = previous is not None and previous.report.active
        if (beat.active and self.election.owning) or (was_active and not beat.active):
            self._wake.set()  # two claimants, or the active let go: decide now

    # -- views -------------------------------------------------------------------------
    def _record(self, owning: bool, action: Action, reason: str) -> None:
        entry = {
            "at": time.time(),
            "role": "active" if owning else "standby",
            "action": str(action),
            "reason": str(reason),
            "term": self.election.term,
        }
        self.transitions.append(entry)
        level = logging.WARNING if action in (Action.CLAIM, Action.RELEASE) else logging.INFO
        log.log(level, "vip group %s: %s (%s)", self.config.name, action, reason)

    def report(self) -> VipGroupReport:
        """What the node's heartbeats tell the GSLB of this group."""
        decision = self.election.last_decision
        fence = self.election.fence
        # The last change of role (a claim, a release, going standby), not a reason change
        # while keeping the VIP.
        changes = [t for t in self.transitions if t["action"] not in _KEEPING]
        last = changes[-1] if changes else None
        return VipGroupReport(
            group=self.config.name,
            vip=str(self.config.vip),
            role=VipRole.ACTIVE if self.election.owning else VipRole.STANDBY,
            term=self.election.term,
            fencing_token=fence.token if fence is not None and fence.holds else None,
            reason=str(decision.reason)[:200] if decision else "",
            last_transition=""
            if last is None
            else f"{last['action']}: {last['reason']} (term {last['term']})"[:300],
            last_transition_at=None if last is None else datetime.fromtimestamp(last["at"], UTC),
        )

    def _quorum_status(self, now: float) -> dict[str, Any]:
        assert self.grants is not None and self.voter is not None
        deadline = self.grants.deadline()
        return {
            "members": len(self.grants.voters),
            "majority": self.grants.majority,
            "witnesses": sorted(self.witnesses),
            "granted": deadline > now,
            "grant_left_s": round(max(0.0, deadline - now), 3),
            "votes": {v: vote.candidate for v, vote in sorted(self.grants.votes.items())},
            "hold_s": self.grants.hold_s,
        }

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        decision = self.election.last_decision
        fence = self.election.fence
        return {
            "group": self.config.name,
            "node_id": self.node_id,
            "vip": self.config.vip,
            "interface": self.config.interface,
            "role": "active" if self.election.owning else "standby",
            "reason": str(decision.reason) if decision else None,
            "eligible": self.election.eligible,
            "priority": self.config.priority,
            "term": self.election.term,
            "heartbeats_to": self.destinations,
            "quorum": None if self.grants is None else self._quorum_status(now),
            "fencing": None
            if fence is None or self.fence is None
            else {
                "reachable": fence.reachable,
                "holds_key": fence.holds,
                "token": fence.token,
                "lease_left_s": round(fence.lease_deadline - now, 3) if fence.holds else None,
                "owner": self.fence.owner,
                "last_error": self.fence.last_error,
                "watching": self.fence.watching,
                "watch_events": self.fence.watch_events,
                "seen_revision": fence.seen_revision,
                "key_token": fence.key_token,
            },
            "arp_monitor": None
            if self.track is None or self.prober is None
            else {
                "targets": sorted(self.prober.targets),
                "isolated": self._isolated(now),
                "unanswered_rounds": self.track.unanswered,
                "sent": self.prober.sent_total,
                "answered": self.prober.answered_total,
            },
            "peers": [
                {
                    "node_id": peer_id,
                    "priority": peer.report.priority,
                    "active": peer.report.active,
                    "eligible": peer.report.eligible,
                    "live": now - peer.last_heard <= self.election.config.dead_interval_s,
                    "term": peer.report.term,
                    "token": peer.report.token,
                    "health": str(self._peer_health.get(peer_id, (None,))[0]),
                    "last_heard_s": round(now - peer.last_heard, 3),
                }
                for peer_id, peer in sorted(self.election.peers.items())
            ],
            "last_transition": self.transitions[-1] if self.transitions else None,
            "transitions": list(self.transitions),
            "claims_total": self.claims_total,
            "announcements_sent": self.announcer.sent_total if self.announcer else 0,
            "announcement_errors": self.announcer.send_errors if self.announcer else 0,
            "heartbeats_sent": self.heartbeats_sent,
            "heartbeats_accepted": self.heartbeats_accepted,
            "heartbeats_refused": {str(k): v for k, v in self.receiver.refused.items()},
            "crash_leftover_removed": self.crash_leftover_removed,
            "guard": {
                "bound_s": self.config.guard_bound,
                "armed": self._guard_armed is not None,
                "fired_total": self.guard_fired_total,
                "lost": self.guard_lost,
            },
            "sessions": None if self.sessions is None else len(self.sessions.entries),
        }

    def degraded_reason(self) -> str | None:
        if self.guard_lost:
            return f"vip group {self.config.name}: the VIP guard exited"
        if self.fence is not None and self.fence.last_error is not None:
            return f"vip group {self.config.name}: fencing store unreachable"
        return None
