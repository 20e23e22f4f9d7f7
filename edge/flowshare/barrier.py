"""Whom a planned change's barrier waits for: the peers that can answer. Pure.

The barrier (`FlowShareExtension.hold`) waits until every peer acknowledged this node's
current flows and this node holds every peer's. Waiting for a peer that cannot answer
only burns the bound (`barrier_timeout`) on every change; waiting only for the peers
connected right now gives up the join: at a fresh start no outbound stream is connected
yet. So the outbound stream's last attempt tells the two apart:

- not tried yet, connecting, connected, or a stream that just ended (the reconnect is
  under way): the peer may answer, it is waited for;
- refused, timed out, or found dead by the keepalive (`keepalive`): it tried and failed,
  it is not waited for, and stays so through its retries until one connects; unless the
  peer was heard since (its own stream to this node brought a frame after the failure:
  it is back, and the next retry will reach it).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass


class Attempt(enum.StrEnum):
    NOT_TRIED = "not tried yet"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"  # a connected stream ended; the next attempt follows at once
    REFUSED = "refused"
    TIMED_OUT = "timed out"
    DEAD = "keepalive-dead"

    @property
    def failed(self) -> bool:
        return self in FAILED


FAILED = frozenset({Attempt.REFUSED, Attempt.TIMED_OUT, Attempt.DEAD})


def on_attempt(previous: Attempt) -> Attempt:
    """A connection attempt starts: a peer that failed stays failed until one succeeds
    (a blackholed peer would otherwise look "connecting" for most of every retry)."""
    return previous if previous.failed else Attempt.CONNECTING


@dataclass(frozen=True, slots=True)
class Peer:
    attempt: Attempt
    done: bool  # what the barrier waits for from this peer has happened
    heard_since_failure: bool = False  # a frame came from the peer after the attempt failed

    @property
    def can_answer(self) -> bool:
        return not self.attempt.failed or self.heard_since_failure


def waiting_for(peers: Mapping[str, Peer]) -> list[str]:
    """The peers the barrier still waits for: not done, and able to answer."""
    return sorted(name for name, peer in peers.items() if not peer.done and peer.can_answer)


def missing(peers: Mapping[str, Peer]) -> list[str]:
    """The peers not done, each with why when it was not waited for ("b (refused)")."""
    return [
        name if peer.can_answer else f"{name} ({peer.attempt})"
        for name, peer in sorted(peers.items())
        if not peer.done
    ]
