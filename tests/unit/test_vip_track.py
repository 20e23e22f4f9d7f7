"""The ARP monitor's rule (edge.vip.track): isolated only when neither the targets nor the
peers answered for the window, counted in rounds the driver actually ran."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.vip.track import ReachTrack


def rounds(track: ReachTrack, answers: list[bool]) -> None:
    for answered in answers:
        if answered:
            track.answered()
        track.new_round()


def test_isolated_after_missed_rounds_with_no_peer_heard() -> None:
    track = ReachTrack(missed=4, interval_s=0.03)
    rounds(track, [True, False, False, False])
    assert not track.isolated(10.0, None)
    rounds(track, [False])
    assert track.isolated(10.0, None)
    assert track.isolated(10.0, 10.0 - 0.13)  # the last peer heard outside the window
    assert not track.isolated(10.0, 10.0 - 0.1)  # a peer heard inside it: not cut off
    track.answered()  # an answer in the current round is enough
    assert not track.isolated(10.0, None)
    track.new_round()
    assert track.unanswered == 0 and not track.isolated(10.0, None)


def test_a_fresh_track_is_not_isolated() -> None:
    assert not ReachTrack(missed=2, interval_s=0.1).isolated(0.0, None)


@settings(max_examples=300)
@given(st.integers(2, 8), st.lists(st.booleans(), max_size=60), st.floats(0, 1))
def test_isolated_exactly_when_the_last_rounds_and_the_peers_were_silent(
    missed: int, answers: list[bool], peer_age: float
) -> None:
    track = ReachTrack(missed=missed, interval_s=0.05)
    rounds(track, answers)
    silent = len(answers) >= missed and not any(answers[-missed:])
    peers_silent = peer_age > track.window_s
    assert track.isolated(100.0, 100.0 - peer_age) == (silent and peers_silent)
    assert track.isolated(100.0, None) == silent
