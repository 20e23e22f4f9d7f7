"""The etcd heartbeat write rule (api/heartbeat_writes.py), against a model of etcd's leases:
a write attaches the node's alive key to the instance's newest lease (granted at most
LEASE_BUCKET_S before, lasting lease_ttl_s), the key is gone once that lease expires. A
write behind its answer lands up to WRITE_BEHIND_S after the heartbeat that queued it (a
newer heartbeat meanwhile supersedes what it carries); a write through lands at once."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from api.heartbeat_writes import (
    LEASE_BUCKET_S,
    WRITE_BEHIND_S,
    LastWrite,
    Write,
    content_of,
    dead_within_s,
    decide,
    lease_ttl_s,
    refresh_bound_s,
    still_newest,
)
from contract.schemas import FlowSharePeerReport, FlowShareReport, Heartbeat, NodeState

STATES = [NodeState.HEALTHY, NodeState.DEGRADED, NodeState.DOWN]


@dataclass
class Instance:
    """One API instance: its lease bucket and its per-node last write."""

    lease_granted_at: float | None = None
    last: LastWrite | None = None

    def lease(self, now: float) -> float:
        if self.lease_granted_at is None or now - self.lease_granted_at >= LEASE_BUCKET_S:
            self.lease_granted_at = now
        return self.lease_granted_at


@dataclass
class Etcd:
    """One node's records: the content stored, its revision, when its alive key expires,
    and a write queued behind an answer (its content, when it lands)."""

    content: Heartbeat | None = None
    revision: int = 0
    expires_at: float = float("-inf")
    writes: list[float] = field(default_factory=list)
    queued: tuple[Heartbeat, float] | None = None


def land(instance: Instance, etcd: Etcd, content: Heartbeat, at: float) -> None:
    # The node's key never lapses in between: each write lands before the last one expires.
    if etcd.writes:
        assert etcd.expires_at > at, (at, etcd.expires_at)
    granted = instance.lease(at)
    etcd.revision += 1
    etcd.content = content
    etcd.expires_at = granted + lease_ttl_s(ttl_of(etcd))
    etcd.writes.append(at)
    instance.last = LastWrite(content, granted, etcd.revision)


def ttl_of(etcd: Etcd) -> float:
    return etcd.ttl  # type: ignore[attr-defined, no-any-return]


def land_due(instance: Instance, etcd: Etcd, now: float) -> None:
    if etcd.queued is not None and etcd.queued[1] <= now:
        content, at = etcd.queued
        etcd.queued = None
        land(instance, etcd, content, at)


def settled(instance: Instance, etcd: Etcd) -> tuple[Instance, Etcd]:
    """Copies of both once the queued write (if any) has landed."""
    instance, etcd = copy.deepcopy(instance), copy.deepcopy(etcd)
    land_due(instance, etcd, float("inf"))
    return instance, etcd


def receive(
    instance: Instance,
    etcd: Etcd,
    heartbeat: Heartbeat,
    now: float,
    ttl: float,
    behind_s: float = 0.0,
) -> bool:
    """The heartbeat at `now`; a write behind lands `behind_s` (<= WRITE_BEHIND_S) later.
    Whether it is written (through or behind)."""
    etcd.ttl = ttl  # type: ignore[attr-defined]
    land_due(instance, etcd, now)
    how = decide(instance.last, heartbeat, now, ttl, busy=etcd.queued is not None)
    if how is Write.SKIP:
        return False
    if how is Write.THROUGH:
        etcd.queued = None  # superseded
        land(instance, etcd, content_of(heartbeat), now)
    elif etcd.queued is not None:
        etcd.queued = (content_of(heartbeat), etcd.queued[1])  # superseded, same deadline
    else:
        etcd.queued = (content_of(heartbeat), now + behind_s)
    land_due(instance, etcd, now)  # at once if behind_s is 0
    return True


ttls = st.floats(min_value=1.0, max_value=120.0)


@st.composite
def fleet_run(draw: st.DrawFn) -> tuple[float, list[tuple[float, Heartbeat, float]], float]:
    """(ttl, heartbeats with arrival times and how late a write behind of each lands, an
    offset of the first lease grant before the first heartbeat); gaps between heartbeats
    always below the TTL: the node is alive."""
    ttl = draw(ttls)
    gaps = draw(st.lists(st.floats(min_value=0.01, max_value=ttl * 0.999), min_size=1, max_size=60))
    beats: list[tuple[float, Heartbeat, float]] = []
    now = 0.0
    for gap in gaps:
        now += gap
        heartbeat = Heartbeat(
            state=draw(st.sampled_from(STATES)),
            connections=draw(st.integers(min_value=0, max_value=10**6)),
        )
        behind_s = draw(st.floats(min_value=0.0, max_value=WRITE_BEHIND_S))
        beats.append((now, heartbeat, behind_s))
    bucket_offset = draw(st.floats(min_value=0.0, max_value=LEASE_BUCKET_S * 0.999))
    return ttl, beats, bucket_offset


@settings(max_examples=400)
@given(fleet_run())
def test_a_live_node_never_loses_its_alive_key(
    run: tuple[float, list[tuple[float, Heartbeat, float]], float],
) -> None:
    ttl, beats, offset = run
    instance, etcd = Instance(), Etcd()
    # The instance's newest lease may be up to a bucket old when the first heartbeat comes.
    instance.lease(beats[0][0] - offset)
    for now, heartbeat, behind_s in beats:
        land_due(instance, etcd, now)
        # The key is there when each heartbeat arrives (none before the first)...
        if etcd.writes:
            assert etcd.expires_at > now, (now, etcd.expires_at)
        receive(instance, etcd, heartbeat, now, ttl, behind_s)
        # ...and, once a write behind has landed, lasts at least a TTL past it, whether
        # this one was written or not (`land` checks the key never lapses meanwhile).
        assert settled(instance, etcd)[1].expires_at > now + ttl


@settings(max_examples=400)
@given(fleet_run())
def test_a_changed_content_is_written_at_once(
    run: tuple[float, list[tuple[float, Heartbeat, float]], float],
) -> None:
    ttl, beats, _ = run
    instance, etcd = Instance(), Etcd()
    for now, heartbeat, behind_s in beats:
        land_due(instance, etcd, now)
        before = etcd.content
        changed = before is None or content_of(heartbeat) != before
        if changed:
            # Written through: its answer waits for the write (nothing is behind it).
            assert decide(instance.last, heartbeat, now, ttl) is Write.THROUGH
        written = receive(instance, etcd, heartbeat, now, ttl, behind_s)
        assert written or not changed
        # What the store holds is always the newest content the node reported.
        assert etcd.content == content_of(heartbeat)


@settings(max_examples=400)
@given(fleet_run())
def test_a_stopped_node_is_dead_within_the_bound(
    run: tuple[float, list[tuple[float, Heartbeat, float]], float],
) -> None:
    ttl, beats, offset = run
    instance, etcd = Instance(), Etcd()
    instance.lease(beats[0][0] - offset)
    for now, heartbeat, behind_s in beats:
        receive(instance, etcd, heartbeat, now, ttl, behind_s)
    last = beats[-1][0]
    _, etcd = settled(instance, etcd)
    assert last + ttl < etcd.expires_at <= last + dead_within_s(ttl)


@settings(max_examples=300)
@given(fleet_run())
def test_unchanged_heartbeats_are_rewritten_within_the_refresh_bound(
    run: tuple[float, list[tuple[float, Heartbeat, float]], float],
) -> None:
    ttl, beats, _ = run
    instance, etcd = Instance(), Etcd()
    for now, heartbeat, behind_s in beats:
        receive(instance, etcd, heartbeat, now, ttl, behind_s)
        # No write is older than the bound plus the gap to the heartbeat that found it due
        # (once a write behind has landed).
        last = settled(instance, etcd)[0].last
        assert last is not None
        assert now - last.leased_at < refresh_bound_s(ttl) + LEASE_BUCKET_S


@settings(max_examples=400)
@given(fleet_run(), st.data())
def test_two_instances_alternating_keep_the_store_exact_and_the_node_alive(
    run: tuple[float, list[tuple[float, Heartbeat, float]], float], data: st.DataObject
) -> None:
    """A -> instance 1, B -> instance 2, A -> instance 1 again: instance 1 must not skip A
    because it wrote A last. Each instance drops its last write of the node as soon as it
    sees a newer revision (the store does so from its watches and reads)."""
    ttl, beats, _ = run
    instances, etcd = [Instance(), Instance()], Etcd()
    for now, heartbeat, _ in beats:
        instance = instances[data.draw(st.integers(min_value=0, max_value=1))]
        if etcd.writes:
            assert etcd.expires_at > now
        receive(instance, etcd, heartbeat, now, ttl)
        for other in instances:
            if other.last is not None and not still_newest(other.last, etcd.revision):
                other.last = None
        assert etcd.content == content_of(heartbeat)
        assert etcd.expires_at > now + ttl


def test_without_dropping_the_last_write_the_store_would_be_stale() -> None:
    """The reason for `still_newest`: instance 1 remembering its own write of A skips A."""
    ttl = 6.0
    one, two, etcd = Instance(), Instance(), Etcd()
    a, b = Heartbeat(state=NodeState.HEALTHY), Heartbeat(state=NodeState.DOWN)
    assert receive(one, etcd, a, 0.0, ttl)
    assert receive(two, etcd, b, 0.5, ttl)
    assert decide(one.last, a, 1.0, ttl) is Write.SKIP  # what it would do if it kept it
    assert one.last is not None and not still_newest(one.last, etcd.revision)
    one.last = None
    assert receive(one, etcd, a, 1.0, ttl)
    assert etcd.content == a


def test_the_numbers() -> None:
    assert refresh_bound_s(6.0) == 2.0
    assert lease_ttl_s(5.0) == 8  # 5 + 5/3 + 1 + 0.25 = 7.92, rounded up
    assert lease_ttl_s(1.0) == 3
    assert dead_within_s(5.0) == 8.25  # the lease, and a write behind up to 0.25 s late
    assert content_of(Heartbeat(state=NodeState.HEALTHY, connections=7)) == Heartbeat(
        state=NodeState.HEALTHY
    )
    last = LastWrite(Heartbeat(state=NodeState.HEALTHY), leased_at=10.0, revision=4)
    assert decide(last, Heartbeat(state=NodeState.HEALTHY, connections=9), 11.0, 6.0) is Write.SKIP
    assert decide(last, Heartbeat(state=NodeState.HEALTHY), 12.0, 6.0) is not Write.SKIP
    assert decide(last, Heartbeat(state=NodeState.DOWN), 10.1, 6.0) is not Write.SKIP
    assert decide(None, Heartbeat(state=NodeState.HEALTHY), 10.1, 6.0) is not Write.SKIP
    assert still_newest(last, 4) and still_newest(last, 3) and not still_newest(last, 5)


def test_a_flow_sharing_lag_alone_is_not_a_change_but_a_sync_state_is() -> None:
    """The lags move at every heartbeat of a sharing node: were they content, such a node
    would be written to etcd every second (the write rule undone for it)."""

    def beat(synced: bool, lag_ms: float) -> Heartbeat:
        peer = FlowSharePeerReport(peer="b1", synced=synced, lag_ms=lag_ms)
        return Heartbeat(
            state=NodeState.HEALTHY, flowshare=FlowShareReport(forwarding="on", peers=[peer])
        )

    last = LastWrite(content_of(beat(True, 3.5)), leased_at=10.0, revision=4)
    assert decide(last, beat(True, 12.25), 10.5, 6.0) is Write.SKIP
    assert decide(last, beat(False, 3.5), 10.5, 6.0) is not Write.SKIP
    assert beat(True, 12.25).flowshare == FlowShareReport(
        forwarding="on", peers=[FlowSharePeerReport(peer="b1", synced=True, lag_ms=12.25)]
    )  # the heartbeat itself is not changed


def test_how_each_heartbeat_is_written() -> None:
    """A change (or no known last write) is written through; a due refresh of the content
    etcd holds is written behind, but through while heartbeat transactions fail; a refresh
    not yet due is skipped unless a write of the node is queued or in flight."""
    ttl = 6.0
    healthy = Heartbeat(state=NodeState.HEALTHY)
    last = LastWrite(healthy, leased_at=10.0, revision=4)
    assert decide(None, healthy, 10.1, ttl) is Write.THROUGH
    assert decide(last, Heartbeat(state=NodeState.DOWN), 10.1, ttl) is Write.THROUGH
    assert decide(last, Heartbeat(state=NodeState.HEALTHY, connections=3), 11.0, ttl) is (
        Write.SKIP
    )
    assert decide(last, healthy, 11.0, ttl, busy=True) is Write.BEHIND
    assert decide(last, healthy, 12.0, ttl) is Write.BEHIND
    assert decide(last, healthy, 12.0, ttl, behind_ok=False) is Write.THROUGH
    assert decide(last, healthy, 11.0, ttl, behind_ok=False) is Write.SKIP
    assert decide(last, Heartbeat(state=NodeState.DOWN), 12.0, ttl, behind_ok=False) is (
        Write.THROUGH
    )


def test_a_refresh_found_due_at_the_latest_has_a_second_for_its_transaction() -> None:
    """The worst case of a live node: the last write's lease was granted at 0, a heartbeat
    just before the refresh was due was skipped, the next came just under a TTL later and
    was written behind, landing WRITE_BEHIND_S after it. The lease counts WRITE_BEHIND_S so
    that a full second is left for that transaction's own latency (without it, 0.75 s at a
    TTL of 3 s)."""
    for ttl in (1.0, 2.0, 3.0, 5.0, 6.0, 10.0, 30.0, 120.0):
        skipped = refresh_bound_s(ttl) - 1e-9
        due = skipped + ttl - 1e-9
        healthy = Heartbeat(state=NodeState.HEALTHY)
        assert decide(LastWrite(healthy, 0.0, 1), healthy, due, ttl) is Write.BEHIND
        lands = due + WRITE_BEHIND_S
        assert lease_ttl_s(ttl) - lands >= 1.0 - 1e-6, ttl
