"""etcd store: several API instances (one per site) against one etcd cluster.

Consensus, quorum writes and log replication are etcd's; this module only maps the API's
operations onto etcd transactions, leases and watches. Key layout under the prefix:

    w/desired           the whole desired state (JSON); its mod_revision is the revision
    w/state/<node>      the node's reported state, written only when it changes (or revives)
    a/<node>            attached to a heartbeat lease: gone = no heartbeat for the TTL
    o/<node>            the node's last heartbeat, last-seen time, dead-reported flag
    e/<write-id>-<i>    events; ordered by create_revision, then key

Everything under w/ is what published views depend on, and it changes rarely: one watch on
that prefix wakes the long-polls, and a second one on a/ reports deletions only (a lease
expired). Heartbeats rewrite o/<node> and a/<node> (per the write rule below) but nothing
under w/.

Heartbeats are cheap on purpose (a thousand nodes, one API): there are no per-node
keepalives. Each API instance grants one lease per second and every heartbeat it writes
re-attaches its node's a/<node> to the newest one. Heartbeats that arrive together are
written in one etcd transaction holding one nested compare-and-swap transaction per node.

With `heartbeat_writes="changes"` (the default) a heartbeat is written only when its content
changed or TTL/3 after the node's last write here, under a lease of TTL + TTL/3 + 1 s (the
write rule and its bounds: api/heartbeat_writes.py): a node's key expires between TTL and
TTL + TTL/3 + 1 s (rounded up) after its last heartbeat. With "every", each heartbeat is
written, the lease is TTL + 1 s and the key expires between TTL and TTL + 1 s after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from api.heartbeat_writes import (
    LEASE_BUCKET_S,
    WRITE_BEHIND_S,
    LastWrite,
    Write,
    content_of,
    decide,
    lease_ttl_s,
    still_newest,
)
from api.store.base import (
    EventDraft,
    ObservedRecord,
    RevisionConflict,
    Store,
    StoreUnavailable,
    dead_event,
    heartbeat_events,
)
from api.store.etcd_gateway import (
    EtcdError,
    EtcdGateway,
    EtcdUnavailable,
    KeyValue,
    WatchEvent,
    b64,
    backoff_s,
    range_kvs,
)
from contract.schemas import DesiredState, Event, Heartbeat, Liveness, NodeObserved

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Nodes per heartbeat transaction (etcd refuses more than 128 operations per transaction).
HEARTBEAT_BATCH = 100
#: Every this many seconds a read of the nodes' records reads them all, not only the changed.
RECORDS_FULL_READ_S = 30.0
#: Every this many seconds (and after a watch on a/ resumed) the dead-node sweep lists every
#: node's record and alive key; in between it reads only the nodes whose alive key the
#: watch saw deleted, and the records written since the last sweep.
FULL_SWEEP_S = 10.0
#: Nodes whose record and alive key one sweep transaction reads (two ranges each; etcd
#: allows 128 operations per transaction).
SWEEP_BATCH = 50
#: The next heartbeat lease is asked for this long before the current one's bucket ends.
LEASE_PREFETCH_S = 0.3
#: Heartbeat transactions in flight at once per API instance.
HEARTBEAT_TRANSACTIONS_IN_FLIGHT = 3


@dataclass
class _PendingHeartbeat:
    heartbeat: Heartbeat
    now: datetime
    ttl_s: float
    author: str
    futures: list[asyncio.Future[None]]
    attempts: int = 0
    #: A heartbeat the write rule skipped, written after all (its instance's last write
    #: turned out not to be the newest): its record only (the alive key is the newer
    #: write's), dropped if the store holds a newer one.
    replay: bool = False
    #: Monotonic time it was first queued (a write with no waiting caller, `futures` empty,
    #: is written within WRITE_BEHIND_S of it).
    queued_at: float = field(default_factory=time.monotonic)


def _fail(batch: dict[str, _PendingHeartbeat], error: Exception) -> None:
    for pending in batch.values():
        for future in pending.futures:
            if not future.done():
                future.set_exception(error)


def _event_json(event: EventDraft, now: datetime, desired: bool) -> str:
    return json.dumps(
        {
            "time": now.isoformat(),
            "kind": event.kind,
            "subject": event.subject,
            "cause": event.cause,
            "author": event.author,
            # for desired changes the revision is the transaction's, known once it commits
            "desired": desired,
        }
    )


def _record_json(record: ObservedRecord) -> str:
    # Written a thousand times a second: pydantic serialises the heartbeat straight to JSON
    # (no dict of it first, no second pass through json.dumps).
    return (
        f'{{"heartbeat":{record.heartbeat.model_dump_json()},'
        f'"last_seen":"{record.last_seen.isoformat()}",'
        f'"dead_reported":{"true" if record.dead_reported else "false"}}}'
    )


def _record_from(value: bytes) -> ObservedRecord:
    data = json.loads(value)
    return ObservedRecord(
        heartbeat=Heartbeat.model_validate(data["heartbeat"]),
        last_seen=datetime.fromisoformat(data["last_seen"]),
        dead_reported=bool(data.get("dead_reported", False)),
    )


def _put(key: bytes, value: str | bytes, lease: int = 0) -> dict[str, Any]:
    request: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        request["lease"] = str(lease)
    return {"request_put": request}


def _mod_equals(key: bytes, revision: int) -> dict[str, Any]:
    # A missing key has mod_revision 0, so revision 0 means "must not exist yet".
    return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


class EtcdStore(Store):
    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        prefix: str = "/anycast-edge/",
        request_timeout_s: float = 0.5,
        deadline_s: float = 5.0,
        watch_probe_s: float = 1.0,
        heartbeat_writes: Literal["changes", "every"] = "changes",
    ) -> None:
        super().__init__()
        self._coalesce = heartbeat_writes == "changes"
        self.gateway = EtcdGateway(
            endpoints,
            request_timeout_s=request_timeout_s,
            deadline_s=deadline_s,
            watch_probe_s=watch_probe_s,
        )
        self._prefix = prefix.encode()
        self._desired_key = self._prefix + b"w/desired"
        # The newest desired state read, by its revision (never mutated: writes copy it).
        self._desired: DesiredState | None = None
        # The newest heartbeat lease of this instance and when it was granted.
        self._lease: tuple[int, float] | None = None
        # The next one, granted ahead of time, and the task asking for it.
        self._next_lease: tuple[int, float] | None = None
        self._lease_prefetch: asyncio.Task[None] | None = None
        # node -> this instance's last write of it, while nothing says it is not the newest
        # one in etcd (the write rule skips heartbeats against it; dropped on any doubt).
        self._last_write: dict[str, LastWrite] = {}
        # node -> the newest heartbeat skipped against it, written if the last write is
        # dropped (so a node that stops right after a skip leaves its real last report).
        self._skipped: dict[str, _PendingHeartbeat] = {}
        #: Heartbeats received, by how the write rule had them written (for /metrics and
        #: the benchmark).
        self.heartbeat_writes = dict.fromkeys(Write, 0)
        # False from a failed heartbeat transaction until one succeeds: then nothing is
        # written behind its answer (a node learns of the failure from its next write).
        self._behind_ok = True
        # Set when a write with a waiting caller is queued: wakes flushers that wait to
        # fill a transaction with writes behind.
        self._through_queued = asyncio.Event()
        self._lease_lock = asyncio.Lock()
        self._pending: dict[str, _PendingHeartbeat] = {}
        self._flushers: set[asyncio.Task[None]] = set()
        self._in_flight: set[str] = set()
        # node -> (mod_revision of o/<node>, record) as last written or read here.
        self._observed_cache: dict[str, tuple[int, ObservedRecord | None]] = {}
        # Read from etcd once; after that a node missing from it is new, and if it is not
        # (another instance wrote it), its compare-and-swap fails and the retry reads it.
        self._observed_cache_filled = False
        self._watch_tasks: list[asyncio.Task[None]] = []
        # node -> (mod_revision, record) of o/<node> as of the newest read, and that read's
        # store revision (read_observed fetches only what changed since).
        self._records: dict[str, tuple[int, ObservedRecord]] = {}
        # node -> (record, the NodeObserved made of it) by the last `_observed`.
        self._observed_made: dict[str, tuple[ObservedRecord, NodeObserved]] = {}
        self._records_revision = 0
        self._records_full_at = 0.0
        # o/<node> key -> its mod_revision when seen reported dead (the sweeper skips it).
        self._known_dead: dict[bytes, int] = {}
        # Nodes whose alive key the a/ watch saw deleted since the last sweep; a full sweep
        # is due at once after a resumed watch (deletions may have been missed).
        self._expired: set[str] = set()
        self._full_sweep_due = True
        self._full_swept_at = 0.0
        # The store revision of the last sweep's listing of o/ (the next lists what changed).
        self._swept_revision = 0

    def _key(self, *parts: str) -> bytes:
        return self._prefix + "/".join(parts).encode()

    async def start(self) -> None:
        # The API starts even when etcd does not answer yet: requests get 503 until it does,
        # and the watch connects when it can (from "now": long-polls re-read the store anyway).
        try:
            revision, _ = await self._call(self.gateway.range(self._desired_key))
            start_revision = revision + 1
        except StoreUnavailable as exc:
            log.warning("etcd not reachable at start (%s); continuing", exc)
            start_revision = 0
        self._watch_tasks = [
            asyncio.create_task(self._watch(b"w/", start_revision, False), name="etcd-watch"),
            asyncio.create_task(self._watch(b"a/", start_revision, True), name="etcd-watch-expiry"),
        ]

    async def close(self) -> None:
        prefetch = [self._lease_prefetch] if self._lease_prefetch is not None else []
        for task in [*self._watch_tasks, *self._flushers, *prefetch]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.gateway.close()

    async def _watch(self, suffix: bytes, start_revision: int, deletes_only: bool) -> None:
        next_revision = start_revision
        failures = 0
        while True:
            try:
                async for resume_at, events in self.gateway.watch_prefix(
                    self._prefix + suffix, next_revision, deletes_only=deletes_only
                ):
                    next_revision = resume_at
                    if deletes_only:
                        self._note_expiries(events)
                    self._doubt_last_writes(events)
                    self.changes.notify()
            except Exception:
                # A bug must not silently end the push path: log it and watch again.
                log.exception("etcd watch failed; restarting it")
                self.changes.notify()
                failures += 1
                await asyncio.sleep(backoff_s(failures, 0.5, 10.0))

    def _note_expiries(self, events: Sequence[WatchEvent]) -> None:
        """The a/ watch's deletions are the sweep's candidates; an empty batch (a resumed
        watch: events may be missing) makes the next sweep a full one."""
        if not events:
            self._full_sweep_due = True
            return
        alive_prefix = self._key("a", "")
        for event in events:
            if event.deleted and event.kv.key.startswith(alive_prefix):
                self._expired.add(event.kv.key[len(alive_prefix) :].decode())

    def _doubt_last_writes(self, events: Sequence[WatchEvent]) -> None:
        """Drop what the write rule relies on wherever a watch says another write happened:
        a node's state written under w/ at a newer revision (another instance, a transition),
        its alive key deleted, or a resumed watch (an empty batch: events may be missing)."""
        if not self._last_write:
            return
        if not events:
            for node in list(self._last_write):
                self._drop_last_write(node)
            return
        state_prefix, alive_prefix = self._key("w", "state", ""), self._key("a", "")
        for event in events:
            key = event.kv.key
            if key.startswith(state_prefix):
                node = key[len(state_prefix) :].decode()
            elif key.startswith(alive_prefix):
                node = key[len(alive_prefix) :].decode()
            else:
                continue
            last = self._last_write.get(node)
            if last is None:
                continue
            if event.deleted:  # the alive key expired: nothing skipped is worth writing
                self._drop_last_write(node, replay=False)
            elif not still_newest(last, event.kv.mod_revision):
                self._drop_last_write(node)

    def _seen_record(self, node: str, mod_revision: int) -> None:
        """A read showed o/<node> at `mod_revision`: a newer one than our last write of it is
        someone else's (or the sweeper's), so the next heartbeat is written."""
        last = self._last_write.get(node)
        if last is not None and not still_newest(last, mod_revision):
            self._drop_last_write(node)

    def _drop_last_write(self, node: str, *, replay: bool = True) -> None:
        """Forget the node's last write; a heartbeat skipped against it is written now (its
        record: the node's real last report), unless the node's alive key is gone."""
        self._last_write.pop(node, None)
        skipped = self._skipped.pop(node, None)
        if replay and skipped is not None and node not in self._pending:
            skipped.replay = True
            self._pending[node] = skipped
            self._start_flusher()

    def _start_flusher(self) -> None:
        if len(self._flushers) < HEARTBEAT_TRANSACTIONS_IN_FLIGHT:
            task = asyncio.create_task(self._flush_heartbeats(), name="heartbeats")
            self._flushers.add(task)
            task.add_done_callback(self._flushers.discard)

    @staticmethod
    async def _call(awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except (EtcdUnavailable, EtcdError) as exc:
            raise StoreUnavailable(str(exc)) from exc

    # --- desired ---------------------------------------------------------------------

    def _desired_from(self, kv: KeyValue | None) -> DesiredState:
        """The desired state `kv` holds; parsed once per revision (with a thousand nodes it
        is a large document, and snapshots, writes and reads all read it)."""
        if kv is None:
            return DesiredState()
        known = self._desired
        if known is not None and known.revision == kv.mod_revision:
            return known
        state = DesiredState.model_validate_json(kv.value)
        self._desired = state.model_copy(update={"revision": kv.mod_revision})
        return self._desired

    async def read_desired(self) -> DesiredState:
        _, kvs = await self._call(self.gateway.range(self._desired_key))
        return self._desired_from(kvs[0] if kvs else None)

    async def write_desired(
        self, expected_revision: int, new: DesiredState, events: Sequence[EventDraft]
    ) -> DesiredState:
        write_id = new.write_id or uuid.uuid4().hex
        body = new.model_copy(update={"revision": 0, "write_id": write_id}).model_dump_json()
        now = datetime.now(UTC)
        # Event keys are unique per transaction, not per write_id: a client that reuses an
        # idempotency key for another write must not overwrite the first write's events.
        stamp = uuid.uuid4().hex
        success = [_put(self._desired_key, body)] + [
            _put(self._key("e", f"{stamp}-{i:02d}"), _event_json(e, now, True))
            for i, e in enumerate(events)
        ]
        failure = [{"request_range": {"key": b64(self._desired_key)}}]
        # The gateway may send this transaction more than once (timeouts, failover); the
        # compare makes a repeat fail, and the write_id check below recognises our own
        # earlier commit, so the answer is always what really happened.
        ok, revision, responses = await self._call(
            self.gateway.txn([_mod_equals(self._desired_key, expected_revision)], success, failure)
        )
        if ok:
            self.changes.notify()
            return new.model_copy(update={"revision": revision, "write_id": write_id})
        kvs = responses[0].get("response_range", {}).get("kvs", []) if responses else []
        current = self._desired_from(KeyValue.from_json(kvs[0]) if kvs else None)
        if current.write_id == write_id:
            return current
        raise RevisionConflict(current)

    # --- observed --------------------------------------------------------------------

    def _lease_seconds(self, ttl_s: float) -> int:
        return lease_ttl_s(ttl_s) if self._coalesce else max(2, math.ceil(ttl_s + LEASE_BUCKET_S))

    async def _current_lease(self, ttl_s: float) -> tuple[int, float]:
        """The newest lease and when its grant was asked for (at or before it began). A
        lease serves the writes of the LEASE_BUCKET_S after its grant was asked for; the
        next one is asked for LEASE_PREFETCH_S before that ends, in the background, so that
        a heartbeat write waits for a lease grant (a raft proposal) only if etcd did not
        answer that one in time."""
        async with self._lease_lock:
            now = time.monotonic()
            if self._lease is None or now - self._lease[1] >= LEASE_BUCKET_S:
                ahead = self._next_lease
                self._next_lease = None
                if ahead is not None and now - ahead[1] < LEASE_BUCKET_S:
                    self._lease = ahead
                else:
                    lease = await self._call(self.gateway.lease_grant(self._lease_seconds(ttl_s)))
                    self._lease = (lease, now)
            if (
                now - self._lease[1] >= LEASE_BUCKET_S - LEASE_PREFETCH_S
                and self._next_lease is None
                and self._lease_prefetch is None
            ):
                self._lease_prefetch = asyncio.create_task(
                    self._prefetch_lease(ttl_s), name="heartbeat-lease"
                )
            return self._lease

    async def _prefetch_lease(self, ttl_s: float) -> None:
        asked = time.monotonic()
        try:
            lease = await self.gateway.lease_grant(self._lease_seconds(ttl_s))
        except (EtcdUnavailable, EtcdError) as exc:
            log.debug("heartbeat lease grant ahead of time failed: %s", exc)
        else:
            self._next_lease = (lease, asked)
        finally:
            self._lease_prefetch = None

    @property
    def heartbeats_skipped(self) -> int:
        """Heartbeats received and not written (the write rule)."""
        return self.heartbeat_writes[Write.SKIP]

    async def record_heartbeat(
        self, node: str, heartbeat: Heartbeat, now: datetime, ttl_s: float, author: str
    ) -> None:
        pending = self._pending.get(node)
        how = (
            decide(
                self._last_write.get(node),
                heartbeat,
                time.monotonic(),
                ttl_s,
                busy=pending is not None or node in self._in_flight,
                behind_ok=self._behind_ok,
            )
            if self._coalesce
            else Write.THROUGH
        )
        self.heartbeat_writes[how] += 1
        if how is Write.SKIP:
            # Nothing a reader would miss: the record and the alive key written last (by
            # this instance, and still the newest) stay valid beyond the next TTL.
            self._skipped[node] = _PendingHeartbeat(heartbeat, now, ttl_s, author, [])
            return
        futures: list[asyncio.Future[None]] = []
        if how is Write.THROUGH:
            futures.append(asyncio.get_running_loop().create_future())
        if pending is None:
            self._pending[node] = _PendingHeartbeat(heartbeat, now, ttl_s, author, futures)
        else:
            # A newer heartbeat of the same node supersedes the queued one (one put per key
            # per transaction); every waiting caller learns the outcome. It is a heartbeat
            # received, so it is written whole (record and alive key), not as a replay.
            pending.heartbeat, pending.now, pending.author = heartbeat, now, author
            pending.replay = False
            pending.futures.extend(futures)
        self._skipped.pop(node, None)  # this one is newer and will be written
        if futures:
            self._through_queued.set()
        self._start_flusher()
        if futures:
            await futures[0]

    def _next_batch(self) -> tuple[dict[str, _PendingHeartbeat], bool]:
        """Up to HEARTBEAT_BATCH queued nodes not in flight, writes with a waiting caller
        first, then writes behind (they ride along for free); and whether any caller waits
        on the batch."""
        batch: dict[str, _PendingHeartbeat] = {}
        for waited in (True, False):
            for node, pending in self._pending.items():
                if len(batch) == HEARTBEAT_BATCH:
                    break
                if bool(pending.futures) is waited and node not in self._in_flight:
                    batch[node] = pending
        return batch, any(pending.futures for pending in batch.values())

    async def _flush_heartbeats(self) -> None:
        """Write queued heartbeats, a batch per transaction, until none is left. While
        transactions are in flight the next batch accumulates: group commit. A node is in
        at most one transaction at a time (its compare-and-swap would fail against itself).
        A batch with nobody waiting on it (writes behind) waits until it is full or its
        oldest has been queued WRITE_BEHIND_S, or until a write with a waiting caller comes.
        """
        while True:
            batch, waited = self._next_batch()
            if not batch:
                return
            if not waited and len(batch) < HEARTBEAT_BATCH:
                oldest = min(p.queued_at for p in batch.values())
                wait_s = oldest + WRITE_BEHIND_S - time.monotonic()
                if wait_s > 0:
                    self._through_queued.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._through_queued.wait(), wait_s)
                    continue
            for node in batch:
                del self._pending[node]
            self._in_flight.update(batch)
            try:
                retry = await self._write_heartbeats(batch)
            except StoreUnavailable as exc:
                self._behind_ok = False
                _fail(batch, exc)
                continue
            except BaseException as exc:  # a bug or cancellation: never leave callers hanging
                _fail(batch, StoreUnavailable(f"heartbeat write: {exc!r}"))
                raise
            finally:
                self._in_flight.difference_update(batch)
            self._behind_ok = True
            for node, pending in retry.items():
                if node in self._pending:  # a newer one arrived meanwhile: it wins
                    self._pending[node].futures.extend(pending.futures)
                else:
                    self._pending[node] = pending

    async def _write_heartbeats(
        self, batch: dict[str, _PendingHeartbeat]
    ) -> dict[str, _PendingHeartbeat]:
        """One transaction for the batch; returns the nodes to retry (their CAS failed)."""
        if not self._observed_cache_filled:
            await self._fill_observed_cache()
            self._observed_cache_filled = True
        lease, leased_at = await self._current_lease(max(p.ttl_s for p in batch.values()))
        operations: list[dict[str, Any]] = []
        records: dict[str, ObservedRecord] = {}
        for node, pending in batch.items():
            mod_revision, previous = self._observed_cache.get(node, (0, None))
            events = heartbeat_events(node, previous, pending.heartbeat, pending.author)
            record = ObservedRecord(heartbeat=pending.heartbeat, last_seen=pending.now)
            records[node] = record
            observed_key = self._key("o", node)
            success = [_put(observed_key, _record_json(record))]
            if not pending.replay:
                success.append(_put(self._key("a", node), "1", lease))
            if events:
                success.append(_put(self._key("w", "state", node), str(pending.heartbeat.state)))
                stamp = uuid.uuid4().hex
                success += [
                    _put(self._key("e", f"{stamp}-{i:02d}"), _event_json(e, pending.now, False))
                    for i, e in enumerate(events)
                ]
            operations.append(
                {
                    "request_txn": {
                        "compare": [_mod_equals(observed_key, mod_revision)],
                        "success": success,
                        "failure": [{"request_range": {"key": b64(observed_key)}}],
                    }
                }
            )
        _, revision, responses = await self._call(self.gateway.txn([], operations, []))
        retry: dict[str, _PendingHeartbeat] = {}
        for (node, pending), response in zip(batch.items(), responses, strict=True):
            nested = response.get("response_txn", {})
            if nested.get("succeeded"):
                self._observed_cache[node] = (revision, records[node])
                if self._coalesce and not pending.replay:
                    self._last_write[node] = LastWrite(
                        content_of(pending.heartbeat), leased_at, revision
                    )
                for future in pending.futures:
                    if not future.done():
                        future.set_result(None)
                continue
            # Another API instance (or the sweeper) wrote this node in between: start again
            # from what is there, so its transitions are judged against the real previous.
            self._last_write.pop(node, None)
            self._skipped.pop(node, None)
            raw = nested.get("responses", [{}])[0].get("response_range", {}).get("kvs", [])
            if raw:
                current = KeyValue.from_json(raw[0])
                stored = _record_from(current.value)
                self._observed_cache[node] = (current.mod_revision, stored)
                if pending.replay and stored.last_seen >= pending.now:
                    continue  # a skipped heartbeat, older than what is there: nothing to do
            else:
                self._observed_cache[node] = (0, None)
            pending.attempts += 1
            if pending.attempts >= 4:
                for future in pending.futures:
                    if not future.done():
                        future.set_exception(StoreUnavailable(f"heartbeat of {node}: contention"))
            else:
                retry[node] = pending
        return retry

    async def _fill_observed_cache(self) -> None:
        prefix = self._key("o", "")
        _, kvs = await self._call(self.gateway.range(prefix, prefix=True))
        for kv in kvs:
            node = kv.key[len(prefix) :].decode()
            if node not in self._observed_cache:
                self._observed_cache[node] = (kv.mod_revision, _record_from(kv.value))

    def _records_request(self) -> tuple[dict[str, Any], bool]:
        """The read of the nodes' records: only those written since the previous read
        (etcd's min_mod_revision; o/ keys are never deleted by the API), and every
        RECORDS_FULL_READ_S the whole prefix again (a key removed by hand disappears then).
        With ten thousand nodes, reading and parsing every record for each snapshot cost
        more than a second per read. Returns the request and whether it is a full read."""
        prefix = self._key("o", "")
        full = (
            self._records_revision == 0
            or time.monotonic() - self._records_full_at >= RECORDS_FULL_READ_S
        )
        minimum = 0 if full else self._records_revision + 1
        return self.gateway.range_request(prefix, prefix=True, min_mod_revision=minimum), full

    def _records_read(
        self, revision: int, kvs: list[KeyValue], full: bool
    ) -> dict[str, tuple[int, ObservedRecord]]:
        """Every node's record, after the answer to `_records_request` at `revision`."""
        prefix = self._key("o", "")
        records = {} if full else self._records
        for kv in kvs:
            node = kv.key[len(prefix) :].decode()
            self._seen_record(node, kv.mod_revision)
            if kv.mod_revision > records.get(node, (0, None))[0]:  # never an older answer's
                records[node] = (kv.mod_revision, self._record_at(node, kv))
        if full:
            # A concurrent incremental read may have stored a newer record meanwhile.
            for node, (mod_revision, record) in self._records.items():
                if mod_revision > records.get(node, (0, None))[0]:
                    records[node] = (mod_revision, record)
            self._records, self._records_full_at = records, time.monotonic()
        self._records_revision = max(self._records_revision, revision)
        return records

    def _record_at(self, node: str, kv: KeyValue) -> ObservedRecord:
        """The record `kv` holds. A revision identifies a value: a record this instance
        wrote (or already read) at that revision is not parsed again. Most records a read
        returns are this instance's own heartbeat writes; parsing them all again cost about
        a hundredth of a core per hundred nodes, and made as many objects for the garbage
        collector to scan."""
        for known in (self._records.get(node), self._observed_cache.get(node)):
            if known is not None and known[0] == kv.mod_revision and known[1] is not None:
                return known[1]
        return _record_from(kv.value)

    def _observed(
        self, records: dict[str, tuple[int, ObservedRecord]], alive_keys: list[KeyValue]
    ) -> dict[str, NodeObserved]:
        """Each node's observed state. One whose record and liveness are those of the last
        call keeps its NodeObserved object (never mutated; the snapshots share it)."""
        alive_prefix = self._key("a", "")
        alive = {kv.key[len(alive_prefix) :].decode() for kv in alive_keys}
        result: dict[str, NodeObserved] = {}
        made: dict[str, tuple[ObservedRecord, NodeObserved]] = {}
        for node, (_, record) in records.items():
            liveness = Liveness.ALIVE if node in alive else Liveness.DEAD
            last = self._observed_made.get(node)
            if last is not None and last[0] is record and last[1].liveness is liveness:
                observed = last[1]
            else:
                observed = NodeObserved.model_construct(
                    node=node,
                    liveness=liveness,
                    last_seen=record.last_seen,
                    heartbeat=record.heartbeat,
                )
            result[node] = observed
            made[node] = (record, observed)
        self._observed_made = made
        return result

    def _alive_request(self) -> dict[str, Any]:
        return self.gateway.range_request(self._key("a", ""), prefix=True, keys_only=True)

    async def read_observed(self, now: datetime) -> dict[str, NodeObserved]:
        # Records and alive keys in one round trip, at one revision.
        records_request, full = self._records_request()
        revision, (records, alive) = await self._call(
            self.gateway.ranges(records_request, self._alive_request())
        )
        return self._observed(self._records_read(revision, records, full), alive)

    async def read_state(self, now: datetime) -> tuple[DesiredState, dict[str, NodeObserved]]:
        # A snapshot's reads (desired, records, alive keys) in one round trip, at one
        # revision; the desired document only if it changed since the last one read (the
        # transaction compares its revision).
        records_request, full = self._records_request()
        known = self._desired
        read_desired = {"request_range": self.gateway.range_request(self._desired_key)}
        observed_reads = [
            {"request_range": records_request},
            {"request_range": self._alive_request()},
        ]
        unchanged, revision, responses = await self._call(
            self.gateway.txn(
                [_mod_equals(self._desired_key, known.revision)] if known is not None else [],
                observed_reads if known is not None else [read_desired, *observed_reads],
                [read_desired, *observed_reads],
            )
        )
        if known is not None and unchanged:
            desired = known
        else:
            kvs = range_kvs(responses[0])
            desired = self._desired_from(kvs[0] if kvs else None)
            responses = responses[1:]
        records, alive = (range_kvs(response) for response in responses)
        observed = self._observed(self._records_read(revision, records, full), alive)
        return desired, observed

    async def sweep_dead(self, now: datetime, ttl_s: float) -> list[str]:
        """Every FULL_SWEEP_S (and after a resumed a/ watch): keys only of every record and
        alive key, then the records of the nodes without one. In between: the keys of the
        records written since the last sweep (for the write rule, below), and only the nodes
        whose alive key the watch saw deleted. Listing every key twice a second cost more
        than the heartbeats at ten thousand nodes (1.5 MB of JSON per listing)."""
        observed_prefix = self._key("o", "")
        if self._full_sweep_due or time.monotonic() - self._full_swept_at >= FULL_SWEEP_S:
            return await self._full_sweep(now, ttl_s)
        candidates, self._expired = self._expired, set()
        revision, changed = await self._call(
            self.gateway.range(
                observed_prefix,
                prefix=True,
                keys_only=True,
                min_mod_revision=self._swept_revision + 1,
            )
        )
        self._swept_revision = max(self._swept_revision, revision)
        # Twice a second whatever the traffic: the bound on a write rule that relies on a
        # last write another instance has since replaced (api/heartbeat_writes.py).
        for kv in changed:
            self._seen_record(kv.key[len(observed_prefix) :].decode(), kv.mod_revision)
        dead: list[str] = []
        names = sorted(candidates)
        for start in range(0, len(names), SWEEP_BATCH):
            batch = names[start : start + SWEEP_BATCH]
            _, answers = await self._call(
                self.gateway.ranges(
                    *(
                        self.gateway.range_request(self._key(part, node))
                        for node in batch
                        for part in ("o", "a")
                    )
                )
            )
            for i, node in enumerate(batch):
                record, alive = answers[2 * i], answers[2 * i + 1]
                if record and not alive and await self._report_dead(record[0], now, ttl_s):
                    dead.append(node)
        return dead

    async def _full_sweep(self, now: datetime, ttl_s: float) -> list[str]:
        # Keys only first: with a thousand nodes, fetching every record twice a second would
        # cost more than the heartbeats. Only nodes without an alive key are read.
        self._full_sweep_due, self._expired = False, set()
        self._full_swept_at = time.monotonic()
        observed_prefix = self._key("o", "")
        alive_prefix = self._key("a", "")
        revision, (observed_keys, alive_keys) = await self._call(
            self.gateway.ranges(
                self.gateway.range_request(observed_prefix, prefix=True, keys_only=True),
                self._alive_request(),
            )
        )
        self._swept_revision = max(self._swept_revision, revision)
        alive = {kv.key[len(alive_prefix) :] for kv in alive_keys}
        if self._last_write:
            for kv in observed_keys:
                self._seen_record(kv.key[len(observed_prefix) :].decode(), kv.mod_revision)
        silent = [
            kv
            for kv in observed_keys
            if kv.key[len(observed_prefix) :] not in alive
            # already reported dead and unchanged since: nothing to read
            and self._known_dead.get(kv.key) != kv.mod_revision
        ]
        dead: list[str] = []
        for key in (kv.key for kv in silent):
            _, found = await self._call(self.gateway.range(key))
            if found and await self._report_dead(found[0], now, ttl_s):
                dead.append(key[len(observed_prefix) :].decode())
        return dead

    async def _report_dead(self, kv: KeyValue, now: datetime, ttl_s: float) -> bool:
        """Mark the record `kv` (of a node without an alive key) dead and write its event,
        unless it already is; whether this instance did (several sweep: the compare on
        o/<node> lets exactly one report it)."""
        node = kv.key[len(self._key("o", "")) :].decode()
        record = _record_from(kv.value)
        self._drop_last_write(node, replay=False)  # its alive key is gone
        if record.dead_reported:
            self._known_dead[kv.key] = kv.mod_revision
            return False
        marked = ObservedRecord(record.heartbeat, record.last_seen, dead_reported=True)
        event = dead_event(node, record, ttl_s)
        ok, revision, _ = await self._call(
            self.gateway.txn(
                [_mod_equals(kv.key, kv.mod_revision)],
                [
                    _put(kv.key, _record_json(marked)),
                    _put(
                        self._key("e", f"dead-{node}-{kv.mod_revision}-00"),
                        _event_json(event, now, False),
                    ),
                ],
                [],
            )
        )
        if ok:
            self._observed_cache[node] = (revision, marked)
        return ok

    # --- events ----------------------------------------------------------------------

    async def append_events(self, events: Sequence[EventDraft], now: datetime) -> None:
        stamp = uuid.uuid4().hex
        puts = [
            _put(self._key("e", f"{stamp}-{i:02d}"), _event_json(e, now, False))
            for i, e in enumerate(events)
        ]
        await self._call(self.gateway.txn([], puts, []))

    async def list_events(self, limit: int, after: str | None) -> list[Event]:
        events_prefix = self._key("e", "")
        if after is None:
            _, kvs = await self._call(
                self.gateway.range(events_prefix, prefix=True, sort_create="DESCEND", limit=limit)
            )
            # Same-revision events may straddle the limit; that only trims the oldest.
        else:
            after_revision = int(after.split(".", 1)[0])
            _, kvs = await self._call(
                self.gateway.range(
                    events_prefix,
                    prefix=True,
                    sort_create="ASCEND",
                    limit=limit + 64,
                    min_create_revision=after_revision,
                )
            )
        events: list[Event] = []
        for kv in kvs:
            index = kv.key.rsplit(b"-", 1)[-1].decode()
            data = json.loads(kv.value)
            events.append(
                Event(
                    id=f"{kv.create_revision:016d}.{int(index):02d}",
                    time=datetime.fromisoformat(data["time"]),
                    kind=data["kind"],
                    subject=data["subject"],
                    cause=data["cause"],
                    author=data["author"],
                    revision=kv.create_revision if data.get("desired") else 0,
                )
            )
        events.sort(key=lambda e: e.id)
        if after is not None:
            events = [e for e in events if e.id > after][:limit]
        return events
