"""The VIP guard's rule (edge.vip.deadman) and what the election does once it fired."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edge.vip.deadman import Cause, Verdict, decide
from edge.vip.election import Action, Election, ElectionConfig, FenceView, Reason

BOUND = 0.3


def test_beating_agent_waits_until_the_bound() -> None:
    d = decide(10.1, 10.0, BOUND, armed=True, fired=False, agent_gone=False)
    assert d.verdict is Verdict.WAIT
    assert d.wake_in_s is not None and abs(d.wake_in_s - 0.2) < 1e-9


def test_silence_for_the_bound_fires_when_armed_only() -> None:
    armed = decide(10.3, 10.0, BOUND, armed=True, fired=False, agent_gone=False)
    assert (armed.verdict, armed.cause) == (Verdict.FIRE, Cause.SILENT)
    idle = decide(10.3, 10.0, BOUND, armed=False, fired=False, agent_gone=False)
    assert idle.verdict is Verdict.DONE and idle.wake_in_s is None


def test_a_dead_agent_fires_at_once_even_unarmed() -> None:
    d = decide(10.0, 10.0, BOUND, armed=False, fired=False, agent_gone=True)
    assert (d.verdict, d.cause) == (Verdict.FIRE, Cause.AGENT_GONE)


def test_fired_once_stays_quiet() -> None:
    d = decide(99.0, 10.0, BOUND, armed=True, fired=True, agent_gone=True)
    assert d.verdict is Verdict.DONE


@given(
    last=st.floats(0, 1e6),
    silent=st.floats(0, 100),
    bound=st.floats(0.05, 10),
    armed=st.booleans(),
)
def test_never_fires_within_the_bound_and_always_past_it_when_armed(
    last: float, silent: float, bound: float, armed: bool
) -> None:
    d = decide(last + silent, last, bound, armed=armed, fired=False, agent_gone=False)
    if (last + silent) - last < bound:
        assert d.verdict is Verdict.WAIT
        assert d.wake_in_s is not None and 0 < d.wake_in_s <= bound
    else:
        assert d.verdict is (Verdict.FIRE if armed else Verdict.DONE)


def _owner() -> Election:
    e = Election(ElectionConfig(node_id="a", priority=200, fenced=True))
    now = 0.0
    e.fence_changed(FenceView(True, True, 7, now + 100))
    for _ in range(5):
        e.step(now, True)
        now += 0.1
    assert e.owning
    return e


def test_the_election_releases_and_listens_after_the_guard_fired() -> None:
    e = _owner()
    now = e.last_step or 0.0
    e.guard_fired(now)
    assert e.fence is not None and not e.fence.holds
    first = e.step(now + 0.01, True)
    assert (first.action, first.reason) == (Action.RELEASE, Reason.GUARD_FIRED)
    assert not first.want_key
    # it listens one dead interval before it may want the key again
    assert e.step(now + 0.1, True).reason is Reason.LISTENING
    e.fence_changed(FenceView(True))
    for t in (0.2, 0.3, 0.4):
        later = e.step(now + t, True)
    assert later.reason is Reason.WAITING_FOR_KEY and not later.owning
