"""The session table in the heartbeats: a standby converges on the active's table through
lossy heartbeats, tombstones travel, every delta fits in one datagram."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.state import NodeState
from edge.vip.heartbeat import MAX_PACKET, Heartbeat, decode, encode
from edge.vip.sessions import SessionTable

KEY = b"k" * 32


def beat(sessions: tuple[tuple[str, str], ...]) -> Heartbeat:
    return Heartbeat("n1" * 32, "g" * 64, 200, NodeState.HEALTHY, True, True, 1, 2, 3, sessions)


def test_a_standby_converges_through_lossy_heartbeats() -> None:
    rng = random.Random(7)
    active, standby = SessionTable(), SessionTable()
    for i in range(2000):
        active.record(f"198.18.2.{i % 250}:{10000 + i}", f"backend-{i % 3}")
    for _ in range(400):
        delta = active.next_delta()
        packet = encode(beat(delta), KEY)
        assert len(packet) <= MAX_PACKET
        if rng.random() < 0.5:  # half the heartbeats are lost
            standby.apply(decode(packet, KEY).sessions)
        if dict(standby.entries) == dict(active.entries):
            break
    assert dict(standby.entries) == dict(active.entries)


def test_changes_go_first_and_tombstones_travel() -> None:
    active, standby = SessionTable(), SessionTable()
    for i in range(300):
        active.record(f"k{i}", "backend-1")
    for _ in range(50):
        standby.apply(active.next_delta())
    assert standby.lookup("k5") == "backend-1"
    active.record("k5", "backend-2")
    active.forget("k6")
    delta = active.next_delta()
    assert delta[:2] == (("k5", "backend-2"), ("k6", ""))
    standby.apply(delta)
    assert standby.lookup("k5") == "backend-2" and standby.lookup("k6") is None


def test_the_table_is_bounded_oldest_out_first() -> None:
    table = SessionTable(max_entries=10)
    for i in range(25):
        table.record(f"k{i}", "b")
    assert len(table.entries) == 10 and table.lookup("k24") == "b" and table.lookup("k0") is None


@settings(max_examples=100)
@given(
    st.lists(
        st.tuples(st.text(min_size=1, max_size=60), st.sampled_from(["b1", "b2", ""])),
        max_size=300,
    ),
    st.integers(0, 2**16),
)
def test_any_history_converges(ops: list[tuple[str, str]], seed: int) -> None:
    rng = random.Random(seed)
    active, standby = SessionTable(), SessionTable()
    for key, backend in ops:
        if backend:
            active.record(key, backend)
        else:
            active.forget(key)
        if rng.random() < 0.3:
            standby.apply(decode(encode(beat(active.next_delta()), KEY), KEY).sessions)
    for _ in range(len(ops) + 5):
        standby.apply(decode(encode(beat(active.next_delta()), KEY), KEY).sessions)
    assert dict(standby.entries) == dict(active.entries)
