"""bgp.flap: withdraws are never delayed; re-announces are budgeted with exponential hold-down."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from bgp.config import BgpConfig, FlapBudget
from bgp.flap import WINDOW_S, ChangeKind, FlapDamper, classify_change
from bgp.policy import PolicyInputs, Serving, advertisements

CONFIG = BgpConfig.model_validate(
    {
        "local_asn": 65101,
        "router_id": "198.18.0.2",
        "local_address": "198.18.0.2",
        "prefixes": ["198.51.100.10/32"],
        "neighbors": [{"peer_address": "198.18.0.1", "peer_asn": 65000}],
    }
)


def ads(serving: Serving, fraction: float = 1.0) -> Any:
    return advertisements(PolicyInputs(serving, CONFIG, fraction * CONFIG.capacity_mbps))[0]


def test_classify() -> None:
    up, down = ads(Serving.FULL), ads(Serving.STOPPED)
    assert classify_change(up, up) is ChangeKind.NONE
    assert classify_change(down, up) is ChangeKind.ADVANCE
    assert classify_change(up, down) is ChangeKind.RETREAT
    assert classify_change(up, ads(Serving.LEAVING)) is ChangeKind.RETREAT
    assert classify_change(ads(Serving.LEAVING), up) is ChangeKind.ADVANCE
    # A new share (or DEGRADED's reduced bandwidth) on a prefix that stays announced is
    # no flap of its reachability.
    assert classify_change(up, ads(Serving.FULL, 0.5)) is ChangeKind.RESHAPE
    assert classify_change(up, ads(Serving.REDUCED)) is ChangeKind.RESHAPE
    assert classify_change(ads(Serving.LEAVING), ads(Serving.LEAVING, 0.3)) is ChangeKind.RESHAPE
    # Mixed with a change of reachability, the reachability decides.
    assert classify_change(down, ads(Serving.FULL, 0.5)) is ChangeKind.ADVANCE
    assert classify_change(ads(Serving.LEAVING), ads(Serving.FULL, 0.5)) is ChangeKind.ADVANCE
    assert classify_change(up, ads(Serving.LEAVING, 0.5)) is ChangeKind.RETREAT


SERVINGS = st.sampled_from(list(Serving))
FRACTIONS = st.floats(min_value=0.01, max_value=1.0)


@example(Serving.FULL, 0.25, Serving.REDUCED, 0.5)  # equal announcements: NONE
@given(SERVINGS, FRACTIONS, SERVINGS, FRACTIONS)
def test_bandwidth_alone_never_decides_the_kind(
    s1: Serving, f1: float, s2: Serving, f2: float
) -> None:
    """The kind of a change depends on what is reachable (and drained), not on the link
    bandwidth: the same two servings give the same kind whatever the bandwidths, and
    the same serving at two bandwidths is a RESHAPE (or nothing)."""
    with_bandwidth = classify_change(ads(s1, f1), ads(s2, f2))
    at_one = classify_change(ads(s1), ads(s2))
    if at_one in (ChangeKind.NONE, ChangeKind.RESHAPE):
        # bandwidths can also make two servings' announcements equal (FULL at 250 Mbit/s
        # and REDUCED, half of 500): then nothing changes at all
        assert with_bandwidth in (ChangeKind.NONE, ChangeKind.RESHAPE)
    else:
        assert with_bandwidth is at_one


@given(st.lists(st.floats(min_value=0, max_value=5), max_size=100), st.integers(1, 10))
def test_reshapes_pass_and_spend_no_budget(gaps: Sequence[float], budget: int) -> None:
    """Any number of attribute changes, at any rate, pass at once and leave the whole
    budget for the next re-announces."""
    damper = FlapDamper(FlapBudget(max_changes_per_minute=budget))
    now = 0.0
    for gap in gaps:
        now += gap
        assert damper.admit(ChangeKind.RESHAPE, now) == 0.0
    for _ in range(budget):
        assert damper.admit(ChangeKind.ADVANCE, now) == 0.0


def test_budget_then_exponential_hold() -> None:
    damper = FlapDamper(FlapBudget(max_changes_per_minute=3, initial_backoff_s=2, max_backoff_s=8))
    t = 0.0
    for _ in range(3):
        assert damper.admit(ChangeKind.ADVANCE, t) == 0.0
        t += 1
    assert damper.admit(ChangeKind.ADVANCE, t) == 2.0  # over budget: held 2 s
    assert damper.admit(ChangeKind.ADVANCE, t + 1) == 1.0  # still held
    assert damper.admit(ChangeKind.RETREAT, t + 1) == 0.0  # withdraw passes through a hold
    assert damper.admit(ChangeKind.ADVANCE, t + 2) == 0.0  # hold served
    assert damper.admit(ChangeKind.ADVANCE, t + 3) == 4.0  # flapping again: doubled
    assert damper.admit(ChangeKind.ADVANCE, t + 7) == 0.0
    assert damper.admit(ChangeKind.ADVANCE, t + 8) == 8.0
    assert damper.admit(ChangeKind.ADVANCE, t + 16) == 0.0
    assert damper.admit(ChangeKind.ADVANCE, t + 17) == 8.0  # capped at max_backoff_s
    # A quiet window forgives.
    later = t + 25 + 2 * WINDOW_S
    assert damper.admit(ChangeKind.ADVANCE, later) == 0.0
    assert damper.backoff_s == 0.0


events = st.lists(
    st.tuples(st.floats(min_value=0, max_value=5), st.sampled_from(list(ChangeKind))),
    max_size=200,
)


@given(events, st.integers(min_value=1, max_value=10))
def test_withdraw_never_delayed(steps: Sequence[tuple[float, ChangeKind]], budget: int) -> None:
    damper = FlapDamper(FlapBudget(max_changes_per_minute=budget))
    now = 0.0
    for gap, kind in steps:
        now += gap
        delay = damper.admit(kind, now)
        if kind is not ChangeKind.ADVANCE:
            assert delay == 0.0
        assert delay >= 0.0


@given(events, st.integers(min_value=1, max_value=10))
def test_admitted_advances_bounded(steps: Sequence[tuple[float, ChangeKind]], budget: int) -> None:
    """In any minute, admitted advances <= budget + the holds served in it, and every
    hold lasts at least initial_backoff_s, so at most budget + 60/initial a minute."""
    settings = FlapBudget(max_changes_per_minute=budget, initial_backoff_s=2, max_backoff_s=60)
    damper = FlapDamper(settings)
    now, admitted = 0.0, []
    for gap, _kind in steps:
        now += gap
        if damper.admit(ChangeKind.ADVANCE, now) == 0.0:
            admitted.append(now)
    for start in admitted:
        in_window = [t for t in admitted if start <= t < start + WINDOW_S]
        assert len(in_window) <= budget + WINDOW_S / settings.initial_backoff_s + 1
