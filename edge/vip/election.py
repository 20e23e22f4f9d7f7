"""Who owns the VIP of an active-passive group: a pure state machine (no I/O, no clock).

Time comes in as an argument (seconds of one monotonic clock); every step returns an
`Action` with a `Reason` code (MetalLB's `should_announce` is the model), whether this node
wants the fencing key, and the lifetime to give the address in the kernel.

The rules, in the order `step` applies them:

1. A node that was not scheduled for longer than the peers' dead interval (frozen,
   suspended, starved) may have been replaced: it releases and listens again (WOKE).
2. A node whose own health is bad never claims (UNHEALTHY); one that just started or woke
   listens for one dead interval before it may claim (LISTENING).
3. A peer is dead after `dead_after` missed heartbeats. Among the live *eligible* nodes the
   highest rank wins: higher priority, then the greater node id (deterministic, as VRRP
   breaks ties on the address). Eligible = healthy, not listening and, when fenced, able to
   reach the store (a node cut from the store says so and is passed over).
4. A standby never takes the VIP from a live peer that claims it (PEER_ACTIVE); with
   preemption on, the active yields (PREEMPTED) once a higher-ranked eligible peer has been
   live and eligible for `preempt_delay_s`, and the higher one claims after it heard the
   yield. Two claimants (a healed partition): the lower one releases (PEER_OUTRANKS), the
   higher one re-announces (LOWER_PEER_CLAIMING) so clients follow it; so does an owner
   that hears a peer come back (PEER_RETURNED: a healed link, a failback).
5. Fencing on: a node claims only while it holds the ownership key with more than
   `lease_margin_s` left on its lease (from its own conservative estimate: time the renewal
   was *sent* + TTL), and releases when less is left (LEASE_EXPIRING), before the store can
   hand the key to another node. The address gets a kernel lifetime that ends before the
   lease can (see `address_lifetime`), so even a frozen or killed process loses the VIP in
   time: the kernel removes it.
6. The VIP guard (a process of its own, `edge.vip.guard`) undid the ownership while this
   node was silent (`guard_fired`): whatever it knew before is stale; it releases and
   listens again for one dead interval, as after a pause (GUARD_FIRED).
7. Fencing on: a peer's claim (its last heartbeat said active, with fencing token T) is
   void once the store was seen, at a revision >= T, without that key: free (the peer's
   guard revoked its lease, the peer gave it back) or held with another token. A void
   claimant counts as not live, so a standby stops waiting out the dead interval and asks
   for the key at once, and an owner does not yield to a stale claim. It still claims only
   holding the key (rule 5): the rule only moves *when* a node asks for the key, never
   what holding it takes, so it cannot make two owners. The observation is stamped with
   the store revision it is true at, so a stale one cannot void a newer claim.
8. A node that hears neither any peer nor any of its ARP targets (the segment's gateway)
   for the tracking window is cut off from the segment: it releases and is not eligible
   (ISOLATED), so a link cut that leaves the carrier up moves the VIP as fast as a kill.
   Only losing both counts: a dead gateway alone, or silent peers alone, changes nothing.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

#: The kernel removes an expired address up to ~0.25 s late (devinet.c rounds its lifetime
#: check to the next second when within HZ/4); the rest is slack for scheduling.
KERNEL_EXPIRY_LATENESS_S = 0.35
#: Address lifetime when no store fences the group: a dead-man switch (a killed or frozen
#: node's address disappears by itself) refreshed at every step.
UNFENCED_LIFETIME_S = 1
#: The smallest lease margin that still leaves the address a 1 s kernel lifetime.
MIN_LEASE_MARGIN_S = 1 + KERNEL_EXPIRY_LATENESS_S
#: A node of a group with a witness lets go this long before its majority grant ends.
QUORUM_MARGIN_S = MIN_LEASE_MARGIN_S + 0.05


class Action(enum.StrEnum):
    CLAIM = "claim"  # add the VIP and announce it (gratuitous ARP)
    KEEP = "keep"  # stay the owner (refresh the address lifetime)
    REANNOUNCE = "reannounce"  # stay the owner and announce again (rate-limited by the driver)
    RELEASE = "release"  # remove the VIP
    STANDBY = "standby"  # stay without it


OWNING_ACTIONS = frozenset({Action.CLAIM, Action.KEEP, Action.REANNOUNCE})


class Reason(enum.StrEnum):
    ELECTED = "elected"
    ACTIVE = "active"
    LOWER_PEER_CLAIMING = "lower_peer_claiming"
    PEER_RETURNED = "peer_returned"
    UNHEALTHY = "unhealthy"
    LISTENING = "listening"
    WOKE = "woke_after_pause"
    PEER_ACTIVE = "peer_active"
    PEER_OUTRANKS = "peer_outranks"
    PREEMPTED = "preempted"
    STORE_UNREACHABLE = "store_unreachable"
    WAITING_FOR_KEY = "waiting_for_key"
    LEASE_EXPIRING = "lease_expiring"
    GUARD_FIRED = "guard_fired"
    ISOLATED = "isolated"


@dataclass(frozen=True, slots=True)
class ElectionConfig:
    node_id: str
    priority: int
    advert_interval_s: float = 0.1
    dead_after: int = 3
    preempt: bool = True
    preempt_delay_s: float = 0.0
    fenced: bool = False
    lease_margin_s: float = MIN_LEASE_MARGIN_S

    @property
    def dead_interval_s(self) -> float:
        return self.advert_interval_s * self.dead_after


@dataclass(frozen=True, slots=True)
class PeerReport:
    """What one heartbeat said (already authenticated by the heartbeat module)."""

    node_id: str
    priority: int
    eligible: bool
    active: bool
    term: int = 0
    token: int = 0


@dataclass(frozen=True, slots=True)
class FenceView:
    """The fencing driver's knowledge: can it reach the store, does it hold the key."""

    reachable: bool
    holds: bool = False
    token: int = 0
    # Monotonic time before which the lease is certainly alive in the store.
    lease_deadline: float = 0.0
    # What the store showed of the ownership key, and at which revision that was true (a
    # read's header revision, a watch event's revision; 0: never seen): the key's mod
    # revision (the holder's fencing token), 0 when the key did not exist.
    seen_revision: int = 0
    key_token: int = 0


@dataclass(slots=True)
class Peer:
    report: PeerReport
    last_heard: float
    # Start of the current streak of being live and eligible (None when not eligible).
    eligible_since: float | None


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: Reason
    # Fencing: hold (or try to get) the ownership key. False: give it back if held.
    want_key: bool
    # Whole seconds of kernel lifetime for the address when owning (None otherwise).
    lifetime_s: int | None = None

    @property
    def owning(self) -> bool:
        return self.action in OWNING_ACTIONS


def rank(priority: int, node_id: str) -> tuple[int, str]:
    return (priority, node_id)


def address_lifetime(fence: FenceView | None, now: float) -> int:
    """Kernel lifetime for the VIP: it must end (kernel lateness included) before the lease
    can. 0 means the address may not be held at all."""
    if fence is None:
        return UNFENCED_LIFETIME_S
    if not fence.holds:
        return 0
    return max(0, math.floor(fence.lease_deadline - now - KERNEL_EXPIRY_LATENESS_S))


@dataclass(slots=True)
class Election:
    config: ElectionConfig
    peers: dict[str, Peer] = field(default_factory=dict)
    fence: FenceView | None = None
    owning: bool = False
    term: int = 0
    last_step: float | None = None
    listen_until: float = 0.0
    eligible: bool = False
    last_decision: Decision | None = None
    # A peer came back (first heard, or heard again after it was dead): if we own the VIP,
    # its clients may sit on its MAC (a healed link cut, a failback): announce again.
    peer_returned: bool = False
    # The guard removed the VIP and revoked the lease: the next step releases (GUARD_FIRED).
    guard_undid: bool = False

    def __post_init__(self) -> None:
        if self.config.fenced and self.fence is None:
            self.fence = FenceView(reachable=False)

    # -- inputs ------------------------------------------------------------------------
    def heard(self, report: PeerReport, now: float) -> None:
        if report.node_id == self.config.node_id:
            return  # our own packet (multicast loop) or a duplicate id: never a peer
        previous = self.peers.get(report.node_id)
        was_live = previous is not None and self._live(previous, now)
        self.peer_returned = self.peer_returned or not was_live
        if not report.eligible:
            since = None
        elif was_live and previous is not None and previous.eligible_since is not None:
            since = previous.eligible_since
        else:
            since = now
        self.peers[report.node_id] = Peer(report, now, since)
        self.term = max(self.term, report.term)

    def fence_changed(self, fence: FenceView) -> None:
        self.fence = fence

    def guard_fired(self, now: float) -> None:
        """The guard took the VIP and the lease away: not the owner any more, and listen
        for one dead interval before claiming again."""
        self.owning = False
        self.guard_undid = True
        self.listen_until = max(self.listen_until, now + self.config.dead_interval_s)
        if self.fence is not None:
            f = self.fence
            self.fence = FenceView(
                f.reachable, seen_revision=f.seen_revision, key_token=f.key_token
            )

    # -- the decision ------------------------------------------------------------------
    def _live(self, peer: Peer, now: float) -> bool:
        return now - peer.last_heard <= self.config.dead_interval_s

    def live_peers(self, now: float) -> list[Peer]:
        return [p for p in self.peers.values() if self._live(p, now)]

    def void_claim(self, report: PeerReport) -> bool:
        """Rule 7: the store was seen, at a revision >= the peer's token, without its key."""
        fence = self.fence
        return (
            fence is not None
            and report.active
            and report.token > 0
            and fence.seen_revision >= report.token
            and fence.key_token != report.token
        )

    def last_peer_heard(self) -> float | None:
        return max((p.last_heard for p in self.peers.values()), default=None)

    def step(self, now: float, healthy: bool, isolated: bool = False) -> Decision:
        decision = self._decide(now, healthy, isolated)
        if not decision.owning:
            self.peer_returned = False
        if decision.action is Action.CLAIM:
            self.term += 1
        self.owning = decision.owning
        self.last_decision = decision
        return decision

    def _decide(self, now: float, healthy: bool, isolated: bool) -> Decision:
        cfg = self.config
        woke = self.last_step is not None and now - self.last_step > cfg.dead_interval_s
        if self.last_step is None or woke:
            self.listen_until = now + cfg.dead_interval_s
        self.last_step = now
        fence = self.fence
        reachable = fence is None or fence.reachable
        listening = now < self.listen_until
        self.eligible = healthy and not listening and reachable and not isolated

        if self.guard_undid:
            self.guard_undid = False
            return Decision(Action.RELEASE, Reason.GUARD_FIRED, False)
        if woke:
            return self._without(Reason.WOKE)
        if not healthy:
            return self._without(Reason.UNHEALTHY)
        if isolated:
            return self._without(Reason.ISOLATED)
        if listening:
            return self._without(Reason.LISTENING)

        me = rank(cfg.priority, cfg.node_id)
        live = [p for p in self.live_peers(now) if not self.void_claim(p.report)]
        claimants = [p for p in live if p.report.active]
        higher_eligible = [
            p for p in live if p.report.eligible and rank(p.report.priority, p.report.node_id) > me
        ]

        if self.owning:
            if any(rank(p.report.priority, p.report.node_id) > me for p in claimants):
                return self._without(Reason.PEER_OUTRANKS)
            if cfg.preempt and any(
                p.eligible_since is not None and now - p.eligible_since >= cfg.preempt_delay_s
                for p in higher_eligible
            ):
                return self._without(Reason.PREEMPTED)
            lifetime = address_lifetime(fence, now)
            if lifetime < 1 or (
                fence is not None and fence.lease_deadline - now < cfg.lease_margin_s
            ):
                return self._without(Reason.LEASE_EXPIRING)
            if claimants:
                return Decision(Action.REANNOUNCE, Reason.LOWER_PEER_CLAIMING, True, lifetime)
            if self.peer_returned:
                self.peer_returned = False
                return Decision(Action.REANNOUNCE, Reason.PEER_RETURNED, True, lifetime)
            return Decision(Action.KEEP, Reason.ACTIVE, True, lifetime)

        if claimants:
            return self._without(Reason.PEER_ACTIVE)
        if not reachable:
            return self._without(Reason.STORE_UNREACHABLE)
        if higher_eligible:
            return self._without(Reason.PEER_OUTRANKS)
        if fence is not None:
            if not fence.holds:
                return Decision(Action.STANDBY, Reason.WAITING_FOR_KEY, True)
            if fence.lease_deadline - now < cfg.lease_margin_s:
                return Decision(Action.STANDBY, Reason.LEASE_EXPIRING, True)
        lifetime = address_lifetime(fence, now)
        if lifetime < 1:
            return Decision(Action.STANDBY, Reason.LEASE_EXPIRING, True)
        return Decision(Action.CLAIM, Reason.ELECTED, True, lifetime)

    def _without(self, reason: Reason) -> Decision:
        return Decision(Action.RELEASE if self.owning else Action.STANDBY, reason, False)
