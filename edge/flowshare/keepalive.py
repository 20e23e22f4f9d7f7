"""Is a flow stream still answered? The keepalive's decision, pure (the caller passes the
monotonic clock).

A stream's kernel socket can stay "established" long after the process behind it stopped
reading: a peer that was frozen (SIGSTOP, `docker pause`: its kernel still acknowledges
TCP), or replaced (a new container or process whose predecessor's stream nobody will ever
read again; TCP_USER_TIMEOUT only fires when the packets are lost, not when they are
acknowledged and left unread). So liveness is decided by the application: the sender
sends a heartbeat (an authenticated empty delta) whenever it heard nothing from the peer
for a heartbeat interval, the receiver answers every heartbeat at once with an
authenticated KEEPALIVE frame (without waiting for its map), and

- the sender's stream is dead when something it sent has waited longer than the timeout
  without any frame from the peer since (`outbound`);
- the receiver's stream is dead when no frame came on it for the timeout (`inbound`): the
  sender heartbeats far more often than that.

A dead stream is closed; the sender reconnects and starts over with a snapshot, so the
peer's view of its flows is whole again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Stream(enum.StrEnum):
    LIVE = "live"
    DEAD = "dead"


class Reason(enum.StrEnum):
    ANSWERED = "answered"  # nothing sent since the peer's last frame
    WAITING = "waiting"  # sent, the answer is not overdue yet
    UNANSWERED = "unanswered"  # sent, no frame from the peer within the timeout
    HEARD = "heard"  # a frame came within the timeout
    SILENT = "silent"  # no frame within the timeout


@dataclass(frozen=True, slots=True)
class Verdict:
    stream: Stream
    reason: Reason
    for_s: float  # how long the stream has waited (0 when answered)

    def __str__(self) -> str:
        return f"{self.stream} ({self.reason} for {self.for_s:.1f} s)"


def outbound(now: float, waiting_since: float | None, timeout_s: float) -> Verdict:
    """`waiting_since`: when the first frame went out after the peer's last frame (None:
    nothing sent since)."""
    if waiting_since is None:
        return Verdict(Stream.LIVE, Reason.ANSWERED, 0.0)
    waited = max(0.0, now - waiting_since)
    if waited > timeout_s:
        return Verdict(Stream.DEAD, Reason.UNANSWERED, waited)
    return Verdict(Stream.LIVE, Reason.WAITING, waited)


def inbound(now: float, last_heard: float, timeout_s: float) -> Verdict:
    """`last_heard`: the last frame on the stream (or when it was accepted)."""
    silent = max(0.0, now - last_heard)
    if silent > timeout_s:
        return Verdict(Stream.DEAD, Reason.SILENT, silent)
    return Verdict(Stream.LIVE, Reason.HEARD, silent)


def wants_heartbeat(sent_since_last: bool, heard_since_last: bool) -> bool:
    """Once per heartbeat interval: a heartbeat goes out when nothing was sent (the peer
    sees us live) or nothing was heard (the peer is asked to answer) since the last one."""
    return not (sent_since_last and heard_since_last)
