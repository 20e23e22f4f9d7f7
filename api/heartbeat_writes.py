"""When a heartbeat is written to etcd (the write rule), whether its answer waits for the
write, and how long its lease lasts. Pure.

A node heartbeats every second; on etcd each write is a raft proposal, an fsync on every
member and a revision. Most heartbeats say what the previous one said. So an API instance
writes a node's heartbeat only

* when its content changed (`content_of`: everything the node reports but the open
  connection count and the flow-sharing lags, gauges that move every second and that no
  decision depends on), or
* when `refresh_bound_s(ttl)` = TTL/3 has passed since the lease of its last write of that
  node was granted, or
* when it does not know of a write of that node of its own that is still the newest one in
  etcd (first heartbeat here, another instance or the sweeper wrote the node since, the
  node's alive key was deleted, a watch resumed after a gap): the store drops its
  `LastWrite` for the node on any such sign, and a missing `LastWrite` means "write".

`decide` says how (`Write`): a changed content, or one with no known last write, is written
THROUGH: the answer waits until it is committed (or fails with it). A refresh (the content
etcd holds is already this one; only its liveness and last-seen time move) is written
BEHIND: answered at once and written within `WRITE_BEHIND_S`, in a transaction with up to a
hundred others (at a thousand nodes that is ~6 transactions a second instead of ~60, and
no heartbeat waits for one). After a heartbeat transaction failed, and until one succeeds,
nothing is written behind (`behind_ok`), so a node learns of an unavailable store from
its next answer that needs a write, as before.

The alive key `a/<node>` is attached to a lease of `lease_ttl_s(ttl)` = TTL + TTL/3 + 1 s +
WRITE_BEHIND_S, rounded up (the 1 s: an instance reuses a lease for up to
`LEASE_BUCKET_S`). Hence:

* a live node (no gap of TTL or more between its heartbeats) never loses its alive key: a
  heartbeat is skipped only less than TTL/3 after the grant of a lease of TTL + TTL/3 + 1 s
  + WRITE_BEHIND_S, and a refresh lands at most WRITE_BEHIND_S after its heartbeat (plus
  its transaction's latency);
* a changed content is written at once, by whichever instance receives it, and answered
  once stored;
* a node that stops loses its alive key no sooner than TTL after its last heartbeat (as
  without the rule) and no later than `dead_within_s(ttl)` = the lease's length +
  WRITE_BEHIND_S after it (plus that write's latency and etcd's own expiry check): the
  newest write of the node was of that heartbeat or earlier, landed at most WRITE_BEHIND_S
  after it, and its lease was granted before that write committed.

What the write rule costs: on etcd a live node's stored `last_seen` and connection count may
be up to TTL/3 (+ WRITE_BEHIND_S) old (the instance that receives the heartbeats answers
from the same store).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from contract.schemas import Heartbeat

#: An API instance grants a new heartbeat lease at most once per this many seconds and
#: attaches every heartbeat it writes meanwhile to the newest one.
LEASE_BUCKET_S = 1.0
#: A refresh written behind its answer waits at most this long for a transaction (the store
#: fills one with up to a hundred nodes meanwhile); the lease covers the wait.
WRITE_BEHIND_S = 0.25


def refresh_bound_s(ttl_s: float) -> float:
    """An unchanged heartbeat is written again once this long has passed since the grant of
    the lease its node's last write (by this instance) carried."""
    return ttl_s / 3


def lease_ttl_s(ttl_s: float) -> int:
    """The heartbeat lease's TTL (whole seconds, as etcd grants them)."""
    return max(2, math.ceil(ttl_s + refresh_bound_s(ttl_s) + LEASE_BUCKET_S + WRITE_BEHIND_S))


def dead_within_s(ttl_s: float) -> float:
    """The latest a stopped node's alive key expires, counted from its last heartbeat (plus
    that write's latency and etcd's lease-expiry check): the newest write of the node was of
    that heartbeat or earlier, landed at most WRITE_BEHIND_S after it, and its lease was
    granted before the write committed."""
    return lease_ttl_s(ttl_s) + WRITE_BEHIND_S


def content_of(heartbeat: Heartbeat) -> Heartbeat:
    """What a change of is written at once: the heartbeat without its connection count and
    without its flow-sharing lags (both gauges that move at every heartbeat; the GSLB's
    flow-sync gate decides on `synced`, a lag only goes into its message)."""
    update: dict[str, object] = {}
    if heartbeat.connections:
        update["connections"] = 0
    flowshare = heartbeat.flowshare
    if flowshare is not None and any(p.lag_ms for p in flowshare.peers):
        peers = [p.model_copy(update={"lag_ms": 0.0}) for p in flowshare.peers]
        update["flowshare"] = flowshare.model_copy(update={"peers": peers})
    return heartbeat.model_copy(update=update) if update else heartbeat


@dataclass(frozen=True, slots=True)
class LastWrite:
    """This instance's last write of a node, while it knows it is the newest one in etcd."""

    content: Heartbeat
    #: Monotonic time the lease attached by that write was granted (at or before the write).
    leased_at: float
    #: The etcd revision of that write (the mod_revision of o/<node>).
    revision: int


def still_newest(last: LastWrite, seen_revision: int) -> bool:
    """Whether a write of the node seen at `seen_revision` (a read, a watch) leaves `last` the
    newest one: a read older than the write says nothing, anything newer is someone else's."""
    return seen_revision <= last.revision


class Write(enum.Enum):
    """How a received heartbeat is written (`decide`)."""

    #: Not written: etcd holds this content under a lease that outlasts the next TTL.
    SKIP = "skip"
    #: Answered at once, written within WRITE_BEHIND_S: a refresh of the content etcd holds.
    BEHIND = "behind"
    #: Written before the answer, which waits for the commit (and fails with it).
    THROUGH = "through"


def decide(
    last: LastWrite | None,
    heartbeat: Heartbeat,
    now: float,
    ttl_s: float,
    *,
    busy: bool = False,
    behind_ok: bool = True,
) -> Write:
    """How a heartbeat received at monotonic time `now` is written. `busy`: a write of the
    node is queued or in flight (its outcome may drop `last`, so nothing is skipped).
    `behind_ok`: the instance's last heartbeat transaction succeeded."""
    if last is None or content_of(heartbeat) != last.content:
        return Write.THROUGH
    if not busy and now - last.leased_at < refresh_bound_s(ttl_s):
        return Write.SKIP
    return Write.BEHIND if behind_ok else Write.THROUGH
