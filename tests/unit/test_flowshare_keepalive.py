"""The keepalive rule of flow streams: exhaustive over the cases, hypothesis for what must
always hold (never dead while answered or within the timeout; always dead past it)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edge.flowshare import keepalive
from edge.flowshare.keepalive import Reason, Stream

times = st.floats(0, 1e6, allow_nan=False)
timeouts = st.floats(0.05, 60, allow_nan=False)


def test_outbound_cases() -> None:
    assert keepalive.outbound(100.0, None, 3.0).reason is Reason.ANSWERED
    assert keepalive.outbound(100.0, 98.0, 3.0).reason is Reason.WAITING
    assert keepalive.outbound(100.0, 97.0, 3.0).stream is Stream.LIVE  # at the bound: live
    dead = keepalive.outbound(100.0, 96.5, 3.0)
    assert (dead.stream, dead.reason, dead.for_s) == (Stream.DEAD, Reason.UNANSWERED, 3.5)
    assert str(dead) == "dead (unanswered for 3.5 s)"
    # A clock that went back never makes a stream dead.
    assert keepalive.outbound(90.0, 96.5, 3.0).stream is Stream.LIVE


def test_inbound_cases() -> None:
    assert keepalive.inbound(100.0, 99.0, 3.0).reason is Reason.HEARD
    assert keepalive.inbound(100.0, 97.0, 3.0).stream is Stream.LIVE
    assert keepalive.inbound(100.0, 96.0, 3.0).reason is Reason.SILENT
    assert keepalive.inbound(90.0, 96.0, 3.0).stream is Stream.LIVE


def test_a_heartbeat_goes_out_unless_something_was_both_sent_and_heard() -> None:
    assert keepalive.wants_heartbeat(False, False)
    assert keepalive.wants_heartbeat(True, False)  # the peer is asked to answer
    assert keepalive.wants_heartbeat(False, True)  # the peer sees us live
    assert not keepalive.wants_heartbeat(True, True)


@given(times, st.none() | times, timeouts)
def test_outbound_is_dead_exactly_when_unanswered_past_the_timeout(
    now: float, since: float | None, timeout: float
) -> None:
    verdict = keepalive.outbound(now, since, timeout)
    dead = since is not None and now - since > timeout
    assert (verdict.stream is Stream.DEAD) == dead
    assert verdict.for_s >= 0


@given(times, times, timeouts)
def test_inbound_is_dead_exactly_when_silent_past_the_timeout(
    now: float, heard: float, timeout: float
) -> None:
    verdict = keepalive.inbound(now, heard, timeout)
    assert (verdict.stream is Stream.DEAD) == (now - heard > timeout)
