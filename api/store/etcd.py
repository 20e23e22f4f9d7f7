"""etcd store: several API instances (one per site) against one etcd cluster.

Consensus, quorum writes and log replication are etcd's; this module only maps the API's
operations onto etcd transactions, leases and watches. Key layout under the prefix:

    w/desired           the whole desired state (JSON); its mod_revision is the revision
    w/alive/<node>      attached to the node's heartbeat lease: gone = lease expired
    w/state/<node>      the node's reported state, written only when it changes
    o/<node>            the node's last heartbeat, last-seen time, dead-reported flag
    e/<write-id>-<i>    events; ordered by create_revision, then key

Everything under w/ is what published views depend on, and it changes rarely: one watch on
that prefix wakes the long-polls. Heartbeats rewrite o/<node> every second but not w/.
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
from datetime import UTC, datetime
from typing import Any, TypeVar

from api.schemas import DesiredState, Event, Heartbeat, Liveness, NodeObserved
from api.store.base import (
    EventDraft,
    ObservedRecord,
    RevisionConflict,
    Store,
    StoreUnavailable,
    dead_event,
    heartbeat_events,
)
from api.store.etcd_gateway import EtcdError, EtcdGateway, EtcdUnavailable, KeyValue, b64

log = logging.getLogger(__name__)
T = TypeVar("T")


def _record_json(record: ObservedRecord) -> str:
    return json.dumps(
        {
            "heartbeat": record.heartbeat.model_dump(mode="json"),
            "last_seen": record.last_seen.isoformat(),
            "dead_reported": record.dead_reported,
        }
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
    ) -> None:
        super().__init__()
        self.gateway = EtcdGateway(
            endpoints, request_timeout_s=request_timeout_s, deadline_s=deadline_s
        )
        self._prefix = prefix.encode()
        self._desired_key = self._prefix + b"w/desired"
        # node -> (lease id granted by this API instance, when it was last refreshed): a lease
        # per node, so a node that stops heartbeating loses its alive key after the TTL.
        self._leases: dict[str, tuple[int, float]] = {}
        # node -> (mod_revision of o/<node>, record) as last written or read here.
        self._observed_cache: dict[str, tuple[int, ObservedRecord]] = {}
        self._watch_task: asyncio.Task[None] | None = None

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
        self._watch_task = asyncio.create_task(self._watch(start_revision), name="etcd-watch")

    async def close(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        await self.gateway.close()

    async def _watch(self, start_revision: int) -> None:
        next_revision = start_revision
        while True:
            try:
                async for resume_at, _events in self.gateway.watch_prefix(
                    self._prefix + b"w/", next_revision
                ):
                    next_revision = resume_at
                    self.changes.notify()
            except Exception:
                # A bug must not silently end the push path: log it and watch again.
                log.exception("etcd watch failed; restarting it")
                self.changes.notify()
                await asyncio.sleep(0.5)

    @staticmethod
    async def _call(awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except (EtcdUnavailable, EtcdError) as exc:
            raise StoreUnavailable(str(exc)) from exc

    # --- desired ---------------------------------------------------------------------

    @staticmethod
    def _desired_from(kv: KeyValue | None) -> DesiredState:
        if kv is None:
            return DesiredState()
        state = DesiredState.model_validate_json(kv.value)
        return state.model_copy(update={"revision": kv.mod_revision})

    async def read_desired(self) -> DesiredState:
        _, kvs = await self._call(self.gateway.range(self._desired_key))
        return self._desired_from(kvs[0] if kvs else None)

    async def write_desired(
        self, expected_revision: int, new: DesiredState, events: Sequence[EventDraft]
    ) -> DesiredState:
        write_id = new.write_id or uuid.uuid4().hex
        body = new.model_copy(update={"revision": 0, "write_id": write_id}).model_dump_json()
        now = datetime.now(UTC).isoformat()
        success = [_put(self._desired_key, body)] + [
            _put(
                self._key("e", f"{write_id}-{i:02d}"),
                json.dumps(
                    {
                        "time": now,
                        "kind": e.kind,
                        "subject": e.subject,
                        "cause": e.cause,
                        "author": e.author,
                        # the revision is this transaction's, known only once it commits
                        "desired": True,
                    }
                ),
            )
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

    async def _lease_for(self, node: str, ttl_s: float) -> tuple[int, bool]:
        """(lease id, whether it is new). Refreshes the cached lease or grants another.

        The lease lives TTL x 5/4 and is refreshed at most every TTL/4, so a node is dead
        between TTL and 1.25 x TTL after its last heartbeat, and a node heartbeating every
        second costs one keepalive per TTL/4 instead of one per heartbeat.
        """
        now = time.monotonic()
        cached = self._leases.get(node)
        if cached is not None:
            lease, refreshed_at = cached
            if now - refreshed_at < ttl_s / 4:
                return lease, False
            if await self._call(self.gateway.lease_keepalive(lease)) > 0:
                self._leases[node] = (lease, now)
                return lease, False
        lease = await self._call(self.gateway.lease_grant(max(2, math.ceil(ttl_s * 5 / 4))))
        self._leases[node] = (lease, now)
        return lease, True

    async def record_heartbeat(
        self, node: str, heartbeat: Heartbeat, now: datetime, ttl_s: float, author: str
    ) -> None:
        lease, new_lease = await self._lease_for(node, ttl_s)
        observed_key = self._key("o", node)
        cached: tuple[int, ObservedRecord | None] | None = self._observed_cache.get(node)
        if cached is None:
            _, kvs = await self._call(self.gateway.range(observed_key))
            cached = (kvs[0].mod_revision, _record_from(kvs[0].value)) if kvs else (0, None)
        reattach = new_lease
        for _attempt in range(4):
            mod_revision, previous = cached
            events = heartbeat_events(node, previous, heartbeat, author)
            record = ObservedRecord(heartbeat=heartbeat, last_seen=now)
            success = [_put(observed_key, _record_json(record))]
            if reattach or previous is None or previous.dead_reported:
                success.append(_put(self._key("w", "alive", node), "1", lease))
            if events:
                success.append(_put(self._key("w", "state", node), str(heartbeat.state)))
                stamp = uuid.uuid4().hex
                success += [
                    _put(
                        self._key("e", f"{stamp}-{i:02d}"),
                        json.dumps(
                            {
                                "time": now.isoformat(),
                                "kind": e.kind,
                                "subject": e.subject,
                                "cause": e.cause,
                                "author": e.author,
                                "desired": False,
                            }
                        ),
                    )
                    for i, e in enumerate(events)
                ]
            ok, revision, responses = await self._call(
                self.gateway.txn(
                    [_mod_equals(observed_key, mod_revision)],
                    success,
                    [{"request_range": {"key": b64(observed_key)}}],
                )
            )
            if ok:
                self._observed_cache[node] = (revision, record)
                return
            # Another API instance (or our own timed-out attempt) wrote in between: start from
            # what is there, and re-attach the alive key to our lease, which may not hold it.
            raw = responses[0].get("response_range", {}).get("kvs", []) if responses else []
            if raw:
                current = KeyValue.from_json(raw[0])
                cached = (current.mod_revision, _record_from(current.value))
            else:
                cached = (0, None)
            reattach = True
        raise StoreUnavailable(f"heartbeat of {node}: too much contention")

    async def _observed_and_alive(self) -> tuple[list[KeyValue], set[str]]:
        _, records = await self._call(self.gateway.range(self._key("o", ""), prefix=True))
        alive_prefix = self._key("w", "alive", "")
        _, alive = await self._call(self.gateway.range(alive_prefix, prefix=True, keys_only=True))
        return records, {kv.key[len(alive_prefix) :].decode() for kv in alive}

    async def read_observed(self, now: datetime) -> dict[str, NodeObserved]:
        records, alive = await self._observed_and_alive()
        observed_prefix = len(self._key("o", ""))
        result: dict[str, NodeObserved] = {}
        for kv in records:
            node = kv.key[observed_prefix:].decode()
            record = _record_from(kv.value)
            result[node] = NodeObserved(
                node=node,
                liveness=Liveness.ALIVE if node in alive else Liveness.DEAD,
                last_seen=record.last_seen,
                heartbeat=record.heartbeat,
            )
        return result

    async def sweep_dead(self, now: datetime, ttl_s: float) -> list[str]:
        records, alive = await self._observed_and_alive()
        observed_prefix = len(self._key("o", ""))
        dead: list[str] = []
        for kv in records:
            node = kv.key[observed_prefix:].decode()
            record = _record_from(kv.value)
            if node in alive or record.dead_reported:
                continue
            marked = ObservedRecord(record.heartbeat, record.last_seen, dead_reported=True)
            event = dead_event(node, record, ttl_s)
            # Several API instances sweep: the compare on o/<node> lets exactly one report it.
            ok, _, _ = await self._call(
                self.gateway.txn(
                    [_mod_equals(kv.key, kv.mod_revision)],
                    [
                        _put(kv.key, _record_json(marked)),
                        _put(
                            self._key("e", f"dead-{node}-{kv.mod_revision}-00"),
                            json.dumps(
                                {
                                    "time": now.isoformat(),
                                    "kind": event.kind,
                                    "subject": event.subject,
                                    "cause": event.cause,
                                    "author": event.author,
                                    "desired": False,
                                }
                            ),
                        ),
                    ],
                    [],
                )
            )
            if ok:
                self._observed_cache.pop(node, None)
                dead.append(node)
        return dead

    # --- events ----------------------------------------------------------------------

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
