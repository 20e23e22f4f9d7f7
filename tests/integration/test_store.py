"""The store contract, directly (no HTTP), on SQLite and on the real etcd cluster."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from api.heartbeat_writes import LEASE_BUCKET_S
from api.store.base import EventDraft, RevisionConflict, Store
from api.store.etcd import LEASE_PREFETCH_S, EtcdStore
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
