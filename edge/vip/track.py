"""Is this node cut off from its segment? A pure rule (no I/O, no clock).

A link cut that leaves the carrier up (a dead switch port, a blackholing middlebox, a
`tc` cut) shows nowhere in the kernel: the node keeps the VIP and answers nobody. As Linux
bonding's ARP monitor (`arp_ip_target`) does, the driver sends an ARP request to each
configured target (the segment's gateway or router) every `interval_s` and feeds the
answers in; a round is one probe of every target.

The node is isolated when the last `missed` rounds all went unanswered *and* no peer of
the group was heard for as long (`missed * interval_s`): the one that hears nobody is the
one cut off. Losing only the gateway (every node loses it) or only the peers (a heartbeat
cut, a dead peer) does not count, so a dead gateway never takes the VIP down everywhere.

Rounds are counted, not seconds: a process that was not scheduled for a while (a stalled
loop) sent no probes meanwhile and so missed at most the round it was in; it is not
isolated by its own silence.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ReachTrack:
    missed: int
    interval_s: float
    # Rounds in a row that ended without an answer from any target.
    unanswered: int = 0
    answered_this_round: bool = False

    @property
    def window_s(self) -> float:
        return self.missed * self.interval_s

    def answered(self) -> None:
        """An ARP reply from a target arrived."""
        self.answered_this_round = True

    def new_round(self) -> None:
        """Close the current round (before sending the next probes)."""
        self.unanswered = 0 if self.answered_this_round else self.unanswered + 1
        self.answered_this_round = False

    def isolated(self, now: float, last_peer_heard: float | None) -> bool:
        """`last_peer_heard`: monotonic time of the last heartbeat accepted from any peer."""
        if self.answered_this_round or self.unanswered < self.missed:
            return False
        return last_peer_heard is None or now - last_peer_heard > self.window_s
