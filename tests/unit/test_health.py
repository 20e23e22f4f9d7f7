"""Rise/fall hysteresis and passive ejection."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edge.health import BackendHealth, Outlier, OutlierPolicy, PassiveVerdict, RiseFall


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


def test_one_failure_never_ejects_and_sustained_evidence_does_with_backoff() -> None:
    policy = OutlierPolicy(consecutive_failures=3, max_ejected_share=0.5, ejection_time=10)
    outlier = Outlier()
    verdicts = [outlier.failed(policy, 0.0, in_rotation=2, ejected=0) for _ in range(3)]
    assert verdicts == [PassiveVerdict.COUNTED, PassiveVerdict.COUNTED, PassiveVerdict.EJECTED]
    assert outlier.ejected_until == 10.0
    assert outlier.failed(policy, 1.0, in_rotation=2, ejected=1) is PassiveVerdict.IGNORED
    assert not outlier.expired(9.9) and outlier.expired(10.0)
    for _ in range(3):
        verdict = outlier.failed(policy, 20.0, in_rotation=2, ejected=0)
    assert verdict is PassiveVerdict.EJECTED and outlier.ejected_until == 40.0  # doubled


def test_the_last_healthy_backends_are_never_ejected_on_passive_evidence() -> None:
    policy = OutlierPolicy(consecutive_failures=1, max_ejected_share=0.5)
    assert Outlier().failed(policy, 0, in_rotation=1, ejected=0) is PassiveVerdict.CAPPED
    assert Outlier().failed(policy, 0, in_rotation=2, ejected=1) is PassiveVerdict.CAPPED
    assert Outlier().failed(policy, 0, in_rotation=4, ejected=1) is PassiveVerdict.EJECTED


@given(
    st.lists(st.tuples(st.integers(0, 5), st.booleans()), max_size=200),
    st.integers(1, 6),
    st.integers(1, 10),
    st.floats(0.1, 1.0),
)
def test_ejection_needs_a_streak_and_never_exceeds_the_share(
    events: list[tuple[int, bool]], n: int, threshold: int, share: float
) -> None:
    """Whatever the mix of failures and successes over n backends, a backend is only
    ejected after `threshold` failures in a row, and never more than the share at once."""
    policy = OutlierPolicy(threshold, share, 10.0, 300.0)
    outliers = [Outlier() for _ in range(n)]
    streaks = [0] * n
    for index, failed in events:
        i = index % n
        if not failed:
            outliers[i].consecutive = 0  # what Pool.passive_success does
            streaks[i] = 0
            continue
        streaks[i] += 1
        ejected = sum(1 for o in outliers if o.ejected_until)
        verdict = outliers[i].failed(policy, 0.0, in_rotation=n, ejected=ejected)
        if verdict is PassiveVerdict.EJECTED:
            assert streaks[i] >= threshold
            streaks[i] = 0
        assert sum(1 for o in outliers if o.ejected_until) <= int(n * share)


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
