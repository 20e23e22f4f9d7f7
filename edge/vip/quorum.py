"""Majority grants for a group without a store: a witness breaks the tie. Pure (no I/O).

Without fencing a heartbeat cut leaves two owners (VRRP's split brain). With a witness (a
member that never owns the VIP, `anycast-edge witness`) every member votes in its
heartbeats, and a node may hold the VIP only while a majority of the members grants it:
in a pair with a witness, itself and its peer, or itself and the witness. The grant is a
lease counted from the sender's side, so no clocks are compared:

- A vote names a candidate and *echoes* the candidate's own heartbeat counter it answers.
  The candidate knows when it sent that counter (its monotonic clock): the vote is good
  until then + `hold_s`.
- A voter that granted X may grant anyone else only `hold_s` after it *received* the last
  counter of X it echoed (the switch rule); it says "no vote" meanwhile. The counter was
  sent before it was received, so every grant X holds has ended by then: two nodes never
  hold a majority at once (any two majorities share a voter, and that voter's grants never
  overlap in time).
- A voter that (re)starts grants nobody for `hold_s`: it may have granted someone before.

What a voter wants: the current holder while it is live and eligible or active (sticky, so a
healed link does not move the VIP), else the highest-ranked live eligible member; with
preemption, a higher-ranked member eligible for `preempt_delay_s`. The node turns its
majority grant into the election's `FenceView` (holds, lease_deadline), so the election's
fenced rules (claim only holding, let go before the end, a kernel lifetime that ends first)
apply unchanged: `hold_s` must leave the lease margin plus room to renew.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

from edge.vip.election import FenceView, rank

#: How many of its own sent counters a node remembers (a vote echoes a recent one).
SENT_LOG = 256


@dataclass(frozen=True, slots=True)
class Vote:
    candidate: str | None  # None: no vote (nobody eligible, or waiting out a grant)
    echo: int = 0  # the candidate's heartbeat counter this vote answers


@dataclass(slots=True)
class Member:
    priority: int
    eligible: bool
    active: bool
    counter: int  # its last heartbeat's counter
    received: float  # when that heartbeat arrived (monotonic)
    eligible_since: float | None


class VoteSettings(Protocol):
    """What a voter reads of its group's config (vip_group's and the witness's fields)."""

    @property
    def quorum_hold(self) -> float: ...
    @property
    def advert_interval(self) -> float: ...
    @property
    def dead_after(self) -> int: ...
    @property
    def preempt(self) -> bool: ...
    @property
    def preempt_delay(self) -> float: ...


@dataclass(slots=True)
class Voter:
    """One member's vote: the witness's, or a node's own (which counts for it too)."""

    self_id: str
    hold_s: float
    dead_interval_s: float
    started: float
    preempt: bool = True
    preempt_delay_s: float = 0.0
    members: dict[str, Member] = field(default_factory=dict)
    holder: str | None = None
    # When the last counter of `holder` this voter echoed arrived (its grants end by then
    # + hold_s); at start: the start (it may have granted someone before a restart).
    last_echo_received: float = 0.0

    def __post_init__(self) -> None:
        self.last_echo_received = self.started

    @classmethod
    def of_group(cls, self_id: str, settings: VoteSettings, started: float) -> Voter:
        return cls(
            self_id,
            settings.quorum_hold,
            settings.advert_interval * settings.dead_after,
            started=started,
            preempt=settings.preempt,
            preempt_delay_s=settings.preempt_delay,
        )

    def heard(
        self, node_id: str, priority: int, eligible: bool, active: bool, counter: int, now: float
    ) -> None:
        """A member's heartbeat (a node's own, too, before it sends it)."""
        old = self.members.get(node_id)
        live = old is not None and now - old.received <= self.dead_interval_s
        since = (old.eligible_since if live and old is not None else None) if eligible else None
        if eligible and since is None:
            since = now
        self.members[node_id] = Member(priority, eligible, active, counter, now, since)

    def _live(self, member: Member, now: float) -> bool:
        return now - member.received <= self.dead_interval_s

    def wanted(self, now: float) -> str | None:
        live = {i: m for i, m in self.members.items() if self._live(m, now)}
        eligible = {i: m for i, m in live.items() if m.eligible}
        best = max(eligible, key=lambda i: rank(eligible[i].priority, i), default=None)
        holder = self.holder
        current = live.get(holder) if holder is not None else None
        if holder is None or current is None or not (current.eligible or current.active):
            return best
        if self.preempt and best is not None and best != holder:
            b = eligible[best]
            outranks = rank(b.priority, best) > rank(current.priority, holder)
            since = b.eligible_since
            if outranks and since is not None and now - since >= self.preempt_delay_s:
                return best
        return holder

    def vote(self, now: float) -> Vote:
        want = self.wanted(now)
        if want is not None and want == self.holder:
            member = self.members[want]
            self.last_echo_received = member.received
            return Vote(want, member.counter)
        if now < self.last_echo_received + self.hold_s:
            return Vote(None)  # the last grant may still be held: wait it out
        self.holder = want
        if want is None:
            return Vote(None)
        member = self.members[want]
        self.last_echo_received = member.received
        return Vote(want, member.counter)


@dataclass(slots=True)
class Grants:
    """A node's view of the votes for it: a majority of the members' grants, and until
    when they all hold (by its own clock, from when it sent the echoed counters)."""

    self_id: str
    voters: frozenset[str]  # every member's id, the node's own and the witnesses' included
    hold_s: float
    sent: OrderedDict[int, float] = field(default_factory=OrderedDict)
    votes: dict[str, Vote] = field(default_factory=dict)

    @property
    def majority(self) -> int:
        return len(self.voters) // 2 + 1

    def sent_counter(self, counter: int, now: float) -> None:
        self.sent[counter] = now
        while len(self.sent) > SENT_LOG:
            self.sent.popitem(last=False)

    def voted(self, voter: str, vote: Vote) -> None:
        if voter in self.voters:
            self.votes[voter] = vote

    def deadline(self) -> float:
        """Until when a majority grants this node (0.0: it does not)."""
        ends = sorted(
            (
                self.sent[v.echo] + self.hold_s
                for v in self.votes.values()
                if v.candidate == self.self_id and v.echo in self.sent
            ),
            reverse=True,
        )
        return ends[self.majority - 1] if len(ends) >= self.majority else 0.0

    def view(self, now: float) -> FenceView:
        """The grant as the election's fence: held while a majority's grants last."""
        deadline = self.deadline()
        return FenceView(reachable=True, holds=deadline > now, lease_deadline=deadline)
