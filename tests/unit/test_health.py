"""Rise/fall hysteresis and passive ejection."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edge.health import BackendHealth, RiseFall


def test_rise_needs_consecutive_successes() -> None:
    rf = RiseFall("b1", rise=3, fall=2)
    assert rf.check_passed() is None
    assert rf.check_passed() is None
    change = rf.check_passed()
    assert change is not None and change.new is BackendHealth.UP
    assert change.cause == "backend b1 passed 3 checks"


def test_first_failure_gives_a_down_verdict_then_fall_applies() -> None:
    rf = RiseFall("b1", rise=1, fall=3)
    change = rf.check_failed("connect refused")
    assert change is not None and change.new is BackendHealth.DOWN
    assert rf.check_passed() is not None  # rise=1
    assert rf.check_failed("connect refused") is None
    assert rf.check_failed("connect refused") is None
    change = rf.check_failed("connect refused")
    assert change is not None and change.cause == "backend b1 failed 3 checks: connect refused"


def test_a_success_resets_the_failure_count() -> None:
    rf = RiseFall("b1", rise=1, fall=2)
    rf.check_passed()
    assert rf.check_failed("x") is None
    rf.check_passed()
    assert rf.check_failed("x") is None
    assert rf.health is BackendHealth.UP


def test_passive_failure_ejects_at_once_and_only_active_checks_restore() -> None:
    rf = RiseFall("b2", rise=2, fall=3)
    rf.check_passed()
    rf.check_passed()
    change = rf.passive_failure("connection reset")
    assert change is not None and change.new is BackendHealth.DOWN
    assert "ejected by live traffic: connection reset" in change.cause
    assert rf.passive_failure("again") is None
    assert rf.check_passed() is None
    assert rf.check_passed() is not None


@given(st.lists(st.booleans(), max_size=60), st.integers(1, 5), st.integers(1, 5))
def test_up_only_after_rise_successes_in_a_row(results: list[bool], rise: int, fall: int) -> None:
    rf = RiseFall("b", rise, fall)
    streak_ok = streak_fail = 0
    for passed in results:
        before = rf.health
        if passed:
            streak_ok, streak_fail = streak_ok + 1, 0
            rf.check_passed()
        else:
            streak_ok, streak_fail = 0, streak_fail + 1
            rf.check_failed("x")
        if rf.health is BackendHealth.UP and before is not BackendHealth.UP:
            assert streak_ok >= rise
        if before is BackendHealth.UP and rf.health is BackendHealth.DOWN:
            assert streak_fail >= fall
