"""Whom a planned change's barrier waits for (edge/flowshare/barrier.py): a peer that can
still answer (not tried yet, connecting, connected, a stream that just ended) is waited
for, so a fresh start keeps its coverage; one that tried and failed (refused, timed out,
keepalive-dead) is not, until one of its retries connects or it is heard from again."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edge.flowshare.barrier import FAILED, Attempt, Peer, missing, on_attempt, waiting_for

attempts = st.sampled_from(list(Attempt))
peers = st.dictionaries(
    st.sampled_from(["a1", "a2", "b1", "b2"]),
    st.builds(Peer, attempts, st.booleans(), st.booleans()),
)


def test_a_fresh_start_waits_for_every_peer() -> None:
    fresh = {"a2": Peer(Attempt.NOT_TRIED, False), "b1": Peer(Attempt.CONNECTING, False)}
    assert waiting_for(fresh) == ["a2", "b1"]


def test_failed_peers_are_not_waited_for_and_named_with_why() -> None:
    view = {
        "a2": Peer(Attempt.CONNECTED, False),
        "b1": Peer(Attempt.REFUSED, False),
        "b2": Peer(Attempt.DEAD, False),
        "c1": Peer(Attempt.TIMED_OUT, True),  # it answered before it failed: done
    }
    assert waiting_for(view) == ["a2"]
    assert missing(view) == ["a2", "b1 (refused)", "b2 (keepalive-dead)"]
    assert waiting_for({"a2": Peer(Attempt.CLOSED, False)}) == ["a2"]  # reconnecting


def test_a_failed_peer_heard_from_again_is_back() -> None:
    back = {"b1": Peer(Attempt.REFUSED, False, heard_since_failure=True)}
    assert waiting_for(back) == ["b1"] and missing(back) == ["b1"]


def test_a_failed_peer_stays_failed_through_its_retries() -> None:
    assert on_attempt(Attempt.NOT_TRIED) is Attempt.CONNECTING
    assert on_attempt(Attempt.CLOSED) is Attempt.CONNECTING
    for failed in FAILED:
        assert on_attempt(failed) is failed


@given(peers)
def test_waits_only_for_peers_not_done_that_can_answer(view: dict[str, Peer]) -> None:
    waited = set(waiting_for(view))
    for name, peer in view.items():
        can_answer = peer.attempt not in FAILED or peer.heard_since_failure
        assert (name in waited) == (not peer.done and can_answer)


@given(peers)
def test_every_peer_not_done_is_named_missing(view: dict[str, Peer]) -> None:
    named = {entry.split(" ")[0] for entry in missing(view)}
    assert named == {name for name, peer in view.items() if not peer.done}
    assert set(waiting_for(view)) <= named


@given(attempts)
def test_an_attempt_never_turns_a_failure_into_connecting(previous: Attempt) -> None:
    after = on_attempt(previous)
    assert after is (previous if previous in FAILED else Attempt.CONNECTING)
