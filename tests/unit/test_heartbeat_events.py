"""The events a heartbeat makes, with the causes the node reported (api.store.base)."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from api.store.base import ObservedRecord, heartbeat_events
from contract.schemas import (
    BgpReport,
    DrainPhase,
    DrainReport,
    DrainSource,
    HealthSummary,
    Heartbeat,
    NodeState,
)

NOW = datetime(2026, 12, 2, tzinfo=UTC)


def beat(
    state: NodeState = NodeState.HEALTHY,
    detail: str = "",
    reason: str = "",
    held: int = 0,
    fired: int = 0,
    bgp: bool = True,
) -> Heartbeat:
    return Heartbeat(
        state=state,
        health=HealthSummary(detail=detail),
        bgp=BgpReport(reason=reason, flap_holddowns=held, deadman_firings=fired) if bgp else None,
    )


def events(before: Heartbeat | None, after: Heartbeat, dead: bool = False) -> list[tuple[str, str]]:
    previous = None if before is None else ObservedRecord(before, NOW, dead_reported=dead)
    return [(e.kind, e.cause) for e in heartbeat_events("n1", previous, after, "n1")]


def test_a_state_change_names_the_health_cause_and_the_bgp_reason() -> None:
    up = beat(detail="2/2 backends healthy", reason="announce: node healthy")
    down = beat(NodeState.DOWN, "0/2 backends healthy", "withdraw: node down")
    assert events(up, down) == [
        ("node-state", "healthy -> down: 0/2 backends healthy; BGP withdraw: node down")
    ]


def test_first_contact_and_revival_carry_the_cause() -> None:
    up = beat(detail="2/2 backends healthy", reason="announce: node healthy")
    first = "first heartbeat, state healthy: 2/2 backends healthy; BGP announce: node healthy"
    assert events(None, up) == [("node-alive", first)]
    assert events(up, up, dead=True)[0][1].startswith("heartbeats resumed, state healthy: 2/2")


def test_a_bgp_reason_change_without_a_state_change_is_its_own_event() -> None:
    before = beat(reason="announce: node healthy")
    after = beat(reason="withdraw: desired link bandwidth is 0")
    assert events(before, after) == [("node-bgp", "BGP withdraw: desired link bandwidth is 0")]


def test_dead_man_firings_and_flap_holddowns_become_events_from_their_counters() -> None:
    before = beat(held=1, fired=0)
    after = beat(held=3, fired=1)
    kinds = dict(events(before, after))
    assert "2 announcement change(s) held back" in kinds["bgp-flap-holddown"]
    assert "withdrew every route 1 time(s)" in kinds["bgp-deadman"]
    # A restarted agent counts from 0 again: its new firings are counted, not negative ones.
    assert "1 time(s)" in dict(events(beat(fired=5), beat(fired=1)))["bgp-deadman"]
    assert events(beat(fired=5), beat(fired=0)) == []


def test_the_nodes_own_drain_phases_are_events() -> None:
    def draining(phase: DrainPhase) -> Heartbeat:
        drain = DrainReport(phase=phase, source=DrainSource.GSLB, reason="maintenance")
        return Heartbeat(state=NodeState.DRAINING, drain=drain)

    moving, closing = draining(DrainPhase.MOVING_TRAFFIC), draining(DrainPhase.CLOSING_CONNECTIONS)
    assert ("node-drain", "drain none -> moving traffic (GSLB: maintenance)") in events(
        beat(), moving
    )
    assert events(moving, closing) == [
        ("node-drain", "drain moving traffic -> closing connections (GSLB: maintenance)")
    ]
    assert events(moving, moving) == []
    assert ("node-drain", "drain closing connections -> ended") in events(closing, beat())


@given(
    st.sampled_from(NodeState),
    st.sampled_from(NodeState),
    st.integers(0, 50),
    st.integers(0, 50),
    st.booleans(),
)
def test_an_unchanged_heartbeat_makes_no_event_and_a_changed_state_always_one(
    old: NodeState, new: NodeState, held: int, fired: int, bgp: bool
) -> None:
    same = beat(old, "x", "r", held, fired, bgp)
    assert events(same, same) == []
    changed = [k for k, _ in events(same, beat(new, "y", "r2", held, fired, bgp))]
    assert changed.count("node-state") == (1 if old != new else 0)
    assert changed.count("node-bgp") == (1 if old == new and bgp else 0)
