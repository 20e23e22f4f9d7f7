"""The etcd heartbeat write rule (api/heartbeat_writes.py), against a model of etcd's leases:
a write attaches the node's alive key to the instance's newest lease (granted at most
LEASE_BUCKET_S before, lasting lease_ttl_s), the key is gone once that lease expires."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from api.heartbeat_writes import (
    LEASE_BUCKET_S,
    LastWrite,
    content_of,
    dead_within_s,
    lease_ttl_s,
    must_write,
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
    """One node's records: the content stored, its revision, when its alive key expires."""

    content: Heartbeat | None = None
    revision: int = 0
    expires_at: float = float("-inf")
    writes: list[float] = field(default_factory=list)


def receive(instance: Instance, etcd: Etcd, heartbeat: Heartbeat, now: float, ttl: float) -> bool:
    if not must_write(instance.last, heartbeat, now, ttl):
        return False
    granted = instance.lease(now)
    etcd.revision += 1
    etcd.content = content_of(heartbeat)
    etcd.expires_at = granted + lease_ttl_s(ttl)
    etcd.writes.append(now)
    instance.last = LastWrite(content_of(heartbeat), granted, etcd.revision)
    return True


ttls = st.floats(min_value=1.0, max_value=120.0)


@st.composite
def fleet_run(draw: st.DrawFn) -> tuple[float, list[tuple[float, Heartbeat]], float]:
    """(ttl, heartbeats with arrival times, an offset of the first lease grant before the
    first heartbeat); gaps between heartbeats always below the TTL: the node is alive."""
    ttl = draw(ttls)
    gaps = draw(st.lists(st.floats(min_value=0.01, max_value=ttl * 0.999), min_size=1, max_size=60))
    beats: list[tuple[float, Heartbeat]] = []
    now = 0.0
    for gap in gaps:
        now += gap
        heartbeat = Heartbeat(
            state=draw(st.sampled_from(STATES)),
            connections=draw(st.integers(min_value=0, max_value=10**6)),
        )
        beats.append((now, heartbeat))
    bucket_offset = draw(st.floats(min_value=0.0, max_value=LEASE_BUCKET_S * 0.999))
    return ttl, beats, bucket_offset


@settings(max_examples=400)
@given(fleet_run())
def test_a_live_node_never_loses_its_alive_key(
    run: tuple[float, list[tuple[float, Heartbeat]], float],
) -> None:
    ttl, beats, offset = run
    instance, etcd = Instance(), Etcd()
    # The instance's newest lease may be up to a bucket old when the first heartbeat comes.
    instance.lease(beats[0][0] - offset)
    for now, heartbeat in beats:
        # The key is there when each heartbeat arrives (none before the first)...
        if etcd.writes:
            assert etcd.expires_at > now, (now, etcd.expires_at)
        receive(instance, etcd, heartbeat, now, ttl)
        # ...and lasts at least a TTL past it, whether this one was written or not.
        assert etcd.expires_at > now + ttl


@settings(max_examples=400)
@given(fleet_run())
def test_a_changed_content_is_written_at_once(
    run: tuple[float, list[tuple[float, Heartbeat]], float],
) -> None:
    ttl, beats, _ = run
    instance, etcd = Instance(), Etcd()
    for now, heartbeat in beats:
        before = etcd.content
        written = receive(instance, etcd, heartbeat, now, ttl)
        if before is None or content_of(heartbeat) != before:
            assert written
        # What the store holds is always the newest content the node reported.
        assert etcd.content == content_of(heartbeat)


@settings(max_examples=400)
@given(fleet_run())
def test_a_stopped_node_is_dead_within_the_bound(
    run: tuple[float, list[tuple[float, Heartbeat]], float],
) -> None:
    ttl, beats, offset = run
    instance, etcd = Instance(), Etcd()
    instance.lease(beats[0][0] - offset)
    for now, heartbeat in beats:
        receive(instance, etcd, heartbeat, now, ttl)
    last = beats[-1][0]
    assert last + ttl < etcd.expires_at <= last + dead_within_s(ttl)


@settings(max_examples=300)
@given(fleet_run())
def test_unchanged_heartbeats_are_rewritten_within_the_refresh_bound(
    run: tuple[float, list[tuple[float, Heartbeat]], float],
) -> None:
    ttl, beats, _ = run
    instance, etcd = Instance(), Etcd()
    for now, heartbeat in beats:
        receive(instance, etcd, heartbeat, now, ttl)
        # No write is older than the bound plus the gap to the heartbeat that found it due.
        assert instance.last is not None
        assert now - instance.last.leased_at < refresh_bound_s(ttl) + LEASE_BUCKET_S


@settings(max_examples=400)
@given(fleet_run(), st.data())
def test_two_instances_alternating_keep_the_store_exact_and_the_node_alive(
    run: tuple[float, list[tuple[float, Heartbeat]], float], data: st.DataObject
) -> None:
    """A -> instance 1, B -> instance 2, A -> instance 1 again: instance 1 must not skip A
    because it wrote A last. Each instance drops its last write of the node as soon as it
    sees a newer revision (the store does so from its watches and reads)."""
    ttl, beats, _ = run
    instances, etcd = [Instance(), Instance()], Etcd()
    for now, heartbeat in beats:
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
    assert not must_write(one.last, a, 1.0, ttl)  # what it would do if it kept it
    assert one.last is not None and not still_newest(one.last, etcd.revision)
    one.last = None
    assert receive(one, etcd, a, 1.0, ttl)
    assert etcd.content == a


def test_the_numbers() -> None:
    assert refresh_bound_s(6.0) == 2.0
    assert lease_ttl_s(5.0) == 8  # 5 + 5/3 + 1 = 7.67, rounded up
    assert lease_ttl_s(1.0) == 3
    assert dead_within_s(5.0) == 8.0
    assert content_of(Heartbeat(state=NodeState.HEALTHY, connections=7)) == Heartbeat(
        state=NodeState.HEALTHY
    )
    last = LastWrite(Heartbeat(state=NodeState.HEALTHY), leased_at=10.0, revision=4)
    assert not must_write(last, Heartbeat(state=NodeState.HEALTHY, connections=9), 11.0, 6.0)
    assert must_write(last, Heartbeat(state=NodeState.HEALTHY), 12.0, 6.0)
    assert must_write(last, Heartbeat(state=NodeState.DOWN), 10.1, 6.0)
    assert must_write(None, Heartbeat(state=NodeState.HEALTHY), 10.1, 6.0)
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
    assert not must_write(last, beat(True, 12.25), 10.5, 6.0)
    assert must_write(last, beat(False, 3.5), 10.5, 6.0)
    assert beat(True, 12.25).flowshare == FlowShareReport(
        forwarding="on", peers=[FlowSharePeerReport(peer="b1", synced=True, lag_ms=12.25)]
    )  # the heartbeat itself is not changed
