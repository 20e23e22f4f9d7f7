"""The store contract, directly (no HTTP), on SQLite and on the real etcd cluster."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from api.heartbeat_writes import LEASE_BUCKET_S, Write
from api.store.base import EventDraft, RevisionConflict, Store, StoreUnavailable
from api.store.etcd import LEASE_PREFETCH_S, EtcdStore
from api.store.etcd_gateway import EtcdUnavailable
from api.store.sqlite import SqliteStore
from contract.schemas import DesiredState, Heartbeat, Liveness, NodeState, SiteSpec
from tests.support.etcd_cluster import LocalEtcdCluster

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def store(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Store]:
    if store_kind == "sqlite":
        opened: Store = SqliteStore(tmp_path / "gslb.db")
    else:
        cluster = request.getfixturevalue("etcd_cluster")
        opened = EtcdStore(cluster.client_urls, prefix=f"/store-{uuid.uuid4().hex[:8]}/")
    await opened.start()
    try:
        yield opened
    finally:
        await opened.close()


async def test_a_repeated_write_that_already_committed_is_recognised(store: Store) -> None:
    # What a retry after a timeout looks like to the store: same expected revision, same
    # write id. It must answer with what really happened, not a conflict against itself.
    first = DesiredState(sites={"a": SiteSpec()}, write_id="write-1")
    stored = await store.write_desired(0, first, [EventDraft("site-set", "a", "c", "t")])
    repeated = await store.write_desired(0, first, [EventDraft("site-set", "a", "c", "t")])
    assert repeated.revision == stored.revision
    assert repeated.sites == stored.sites
    with pytest.raises(RevisionConflict) as conflict:
        await store.write_desired(0, DesiredState(write_id="write-2"), [])
    assert conflict.value.current.revision == stored.revision
    assert len([e for e in await store.list_events(10, None) if e.kind == "site-set"]) == 1


async def test_revisions_increase_and_events_follow_in_order(store: Store) -> None:
    revision = 0
    for weight in range(1, 4):
        state = await store.write_desired(
            revision,
            DesiredState(sites={"a": SiteSpec(weight=weight)}, write_id=f"w{weight}"),
            [EventDraft("weight", "a", f"to {weight}", "t")],
        )
        assert state.revision > revision
        revision = state.revision
    assert (await store.read_desired()).sites["a"].weight == 3
    events = await store.list_events(10, None)
    assert [e.cause for e in events] == ["to 1", "to 2", "to 3"]
    assert [e.cause for e in await store.list_events(10, events[0].id)] == ["to 2", "to 3"]
    assert [e.cause for e in await store.list_events(2, None)] == ["to 2", "to 3"]


async def test_heartbeat_transitions_are_events_and_dead_is_reported_once(store: Store) -> None:
    now = datetime.now(UTC)
    await store.record_heartbeat("n1", Heartbeat(state=NodeState.HEALTHY), now, 2, "n1")
    await store.record_heartbeat("n1", Heartbeat(state=NodeState.HEALTHY), now, 2, "n1")
    detail = Heartbeat(state=NodeState.DEGRADED, health={"detail": "b2 failed 3 checks"})
    await store.record_heartbeat("n1", detail, now, 2, "n1")
    observed = await store.read_observed(now)
    assert observed["n1"].liveness is Liveness.ALIVE
    causes = [(e.kind, e.cause) for e in await store.list_events(10, None)]
    assert causes == [
        ("node-alive", "first heartbeat, state healthy"),
        ("node-state", "healthy -> degraded: b2 failed 3 checks"),
    ]


async def test_read_state_is_both_reads_and_one_round_trip_on_etcd(store: Store) -> None:
    """`read_state` answers what `read_desired` and `read_observed` answer (a snapshot and a
    write's checks read both); on etcd as one read-only transaction, so both halves are at
    one revision and cost one round trip, not three."""
    now = datetime.now(UTC)
    stored = await store.write_desired(0, DesiredState(sites={"a": SiteSpec()}, write_id="w"), [])
    await store.record_heartbeat("n1", Heartbeat(state=NodeState.HEALTHY), now, 5, "n1")
    await store.record_heartbeat("n2", Heartbeat(state=NodeState.DRAINING), now, 5, "n2")
    calls: list[str] = []
    if isinstance(store, EtcdStore):
        call = store.gateway.call

        async def counted(path: str, body: dict[str, object]) -> dict[str, object]:
            calls.append(path)
            return await call(path, body)

        store.gateway.call = counted  # type: ignore[method-assign]
    desired, observed = await store.read_state(now)
    if isinstance(store, EtcdStore):
        assert calls == ["/v3/kv/txn"]
    assert desired.revision == stored.revision and desired.sites == stored.sites
    assert desired == await store.read_desired()
    assert observed == await store.read_observed(now)
    assert {n: o.heartbeat.state for n, o in observed.items()} == {
        "n1": NodeState.HEALTHY,
        "n2": NodeState.DRAINING,
    }
    assert {o.liveness for o in observed.values()} == {Liveness.ALIVE}


async def test_the_next_heartbeat_lease_is_granted_ahead_of_time(
    etcd_cluster: LocalEtcdCluster,
) -> None:
    """A heartbeat write does not wait for a lease grant (a raft proposal) at each bucket's
    end: the next lease is asked for LEASE_PREFETCH_S before it, in the background, and
    the writes after the end carry it (asked for within the bucket before them, as the
    write rule's bounds need)."""
    store = EtcdStore(
        etcd_cluster.client_urls,
        prefix=f"/store-{uuid.uuid4().hex[:8]}/",
        heartbeat_writes="every",
    )
    await store.start()
    grants: list[float] = []
    grant = store.gateway.lease_grant

    async def counted(ttl_s: int) -> int:
        grants.append(time.monotonic())
        return await grant(ttl_s)

    store.gateway.lease_grant = counted  # type: ignore[method-assign]
    beat = Heartbeat(state=NodeState.HEALTHY)
    try:
        await store.record_heartbeat("n1", beat, datetime.now(UTC), 5.0, "t")
        first = store._lease
        assert first is not None and len(grants) == 1
        await asyncio.sleep(
            max(0.0, first[1] + LEASE_BUCKET_S - LEASE_PREFETCH_S - time.monotonic())
        )
        await store.record_heartbeat("n1", beat, datetime.now(UTC), 5.0, "t")
        assert store._lease == first  # still the first bucket
        deadline = time.monotonic() + 10
        while store._next_lease is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        ahead = store._next_lease
        assert ahead is not None and ahead[0] != first[0] and len(grants) == 2
        await asyncio.sleep(max(0.0, first[1] + LEASE_BUCKET_S - time.monotonic()) + 0.01)
        if time.monotonic() - ahead[1] >= LEASE_BUCKET_S:
            pytest.fail("etcd took a whole bucket to grant a lease: nothing shown here")
        await store.record_heartbeat("n1", beat, datetime.now(UTC), 5.0, "t")
        assert store._lease == ahead
        assert len(grants) == 2  # the write after the bucket's end asked for none
        _, alive = await store.gateway.range(f"{store._prefix.decode()}a/n1".encode())
        assert alive[0].lease == ahead[0]
    finally:
        await store.close()


async def test_a_refresh_is_answered_before_its_write_and_a_change_after_it(
    etcd_cluster: LocalEtcdCluster,
) -> None:
    """The write rule's BEHIND and THROUGH against real etcd: with heartbeat transactions
    held back, a due refresh of unchanged content returns while its write is still queued
    and then lands (the node's record is rewritten, last-seen moves); a changed state
    returns only once its transaction committed. After a failed heartbeat transaction the
    next refresh waits for its own write and fails with the store."""
    ttl = 1.5  # refresh due 0.5 s after the last write's lease grant
    store = EtcdStore(etcd_cluster.client_urls, prefix=f"/store-{uuid.uuid4().hex[:8]}/")
    await store.start()
    txn = store.gateway.txn
    gate = asyncio.Event()
    gate.set()
    failing = False
    held: list[int] = []

    async def gated(*args: Any) -> tuple[bool, int, list[dict[str, Any]]]:
        held.append(1)
        try:
            await gate.wait()
            if failing:
                raise EtcdUnavailable("held down by the test")
            return await txn(*args)
        finally:
            held.pop()

    store.gateway.txn = gated  # type: ignore[method-assign]
    healthy = Heartbeat(state=NodeState.HEALTHY)
    record_key = f"{store._prefix.decode()}o/n1".encode()

    async def settle(task: asyncio.Task[None]) -> bool:
        """Whether `task` ends while a heartbeat transaction is held (bounded wait)."""
        for _ in range(200):
            if task.done():
                return True
            await asyncio.sleep(0.01)
        return False

    try:
        await store.record_heartbeat("n1", healthy, datetime.now(UTC), ttl, "n1")  # through
        _, before = await store.gateway.range(record_key)
        observed_before = (await store.read_observed(datetime.now(UTC)))["n1"].last_seen
        await asyncio.sleep(0.6)  # the refresh is due
        gate.clear()
        refresh = asyncio.create_task(
            store.record_heartbeat("n1", healthy, datetime.now(UTC), ttl, "n1")
        )
        assert await settle(refresh), "a due refresh waited for its write"
        refresh.result()
        assert store.heartbeat_writes[Write.BEHIND] == 1
        # Its write is queued or held, not lost: let it through and it lands.
        gate.set()
        for _ in range(300):
            _, after = await store.gateway.range(record_key)
            if after[0].mod_revision > before[0].mod_revision:
                break
            await asyncio.sleep(0.01)
        assert after[0].mod_revision > before[0].mod_revision, "the refresh never landed"
        observed = (await store.read_observed(datetime.now(UTC)))["n1"]
        assert observed.last_seen > observed_before and observed.liveness is Liveness.ALIVE
        # A change waits for its commit.
        gate.clear()
        down = Heartbeat(state=NodeState.DEGRADED, health={"detail": "b1 failed"})
        change = asyncio.create_task(
            store.record_heartbeat("n1", down, datetime.now(UTC), ttl, "n1")
        )
        assert not await settle(change), "a changed state was answered before its write"
        assert held, "no transaction was held"
        gate.set()
        await asyncio.wait_for(change, 10)
        assert (await store.read_observed(datetime.now(UTC)))["n1"].heartbeat == down
        # A failed transaction: the refresh behind it was answered, the next one is
        # written through and fails with the store, until a transaction succeeds again.
        failing = True
        await asyncio.sleep(0.6)
        await store.record_heartbeat("n1", down, datetime.now(UTC), ttl, "n1")
        assert store.heartbeat_writes[Write.BEHIND] == 2
        for _ in range(300):
            if not store._behind_ok:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(StoreUnavailable):
            await store.record_heartbeat("n1", down, datetime.now(UTC), ttl, "n1")
        assert store.heartbeat_writes[Write.BEHIND] == 2
        failing = False
        await store.record_heartbeat("n1", down, datetime.now(UTC), ttl, "n1")
        assert store.heartbeat_writes[Write.THROUGH] == 4
        assert store._behind_ok
    finally:
        gate.set()
        await store.close()


async def test_the_sweep_reads_only_what_expired_between_full_sweeps(
    etcd_cluster: LocalEtcdCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between full sweeps (every FULL_SWEEP_S) the sweep reads only the nodes whose alive
    key the a/ watch saw deleted: a node that stops is reported dead, once, without a full
    listing; a deletion the watch never delivered is still found by the next full sweep."""
    import api.store.etcd as etcd_module

    store = EtcdStore(etcd_cluster.client_urls, prefix=f"/store-{uuid.uuid4().hex[:8]}/")
    await store.start()
    full_sweeps = 0
    full_sweep = store._full_sweep

    async def counted(now: datetime, ttl_s: float) -> list[str]:
        nonlocal full_sweeps
        full_sweeps += 1
        return await full_sweep(now, ttl_s)

    store._full_sweep = counted  # type: ignore[method-assign]
    ttl = 1.0  # lease_ttl_s: 3 s
    try:
        for node in ("n1", "n2", "n3"):
            beat = Heartbeat(state=NodeState.HEALTHY)
            await store.record_heartbeat(node, beat, datetime.now(UTC), ttl, node)
        assert await store.sweep_dead(datetime.now(UTC), ttl) == []
        assert full_sweeps == 1

        async def keep_alive(node: str) -> None:
            while True:
                beat = Heartbeat(state=NodeState.HEALTHY)
                await store.record_heartbeat(node, beat, datetime.now(UTC), ttl, node)
                await asyncio.sleep(0.3)

        beating = asyncio.create_task(keep_alive("n3"))
        try:
            dead: list[str] = []
            for _ in range(100):  # bounded: the lease (3 s) and the watch's delivery
                dead += await store.sweep_dead(datetime.now(UTC), ttl)
                if {"n1", "n2"} <= set(dead):
                    break
                await asyncio.sleep(0.1)
            assert sorted(dead) == ["n1", "n2"] and full_sweeps == 1
            assert await store.sweep_dead(datetime.now(UTC), ttl) == []  # reported once
            # A deletion the watch did not deliver (n3 stops; its event is dropped here):
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
            alive_key = f"{store._prefix.decode()}a/n3".encode()
            for _ in range(100):
                _, left = await store.gateway.range(alive_key)
                if not left:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.3)  # the watch's deletion has arrived...
            store._expired.clear()  # ...and is lost
            assert await store.sweep_dead(datetime.now(UTC), ttl) == []
            monkeypatch.setattr(etcd_module, "FULL_SWEEP_S", 0.0)
            assert await store.sweep_dead(datetime.now(UTC), ttl) == ["n3"]
            assert full_sweeps == 2
        finally:
            beating.cancel()
        kinds = [e.kind for e in await store.list_events(20, None)]
        assert kinds.count("node-dead") == 3
    finally:
        await store.close()
