"""Majority grants with a witness (edge/vip/quorum.py): never two nodes granted at once.

The model: two nodes and a witness, each with its own monotonic clock (an unknown offset),
heartbeats delayed, reordered (a receiver keeps only counters above the last one, as the
real Receiver does) or lost, eligibility flipping, members pausing (a freeze: they neither
send nor receive, and their clock runs on). Hypothesis drives the schedule; after every
step at most one node holds a majority grant by its own clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from edge.vip.quorum import Grants, Vote, Voter

HOLD = 2.0
DEAD = 0.3
MEMBERS = ("n1", "n2", "w")
PRIORITY = {"n1": 200, "n2": 100, "w": 1}


@dataclass
class Member:
    name: str
    offset: float
    voter: Voter
    grants: Grants | None  # None: the witness
    eligible: bool = True
    frozen: bool = False
    counter: int = 0
    last_seen: dict[str, int] = field(default_factory=dict)

    def local(self, real: float) -> float:
        return real + self.offset

    def granted(self, real: float) -> bool:
        return self.grants is not None and self.grants.deadline() > self.local(real)


@dataclass
class World:
    members: dict[str, Member]
    real: float = 0.0
    # (arrival real time, sender, receiver, counter, priority, eligible, active, vote)
    in_flight: list[tuple[float, str, str, int, int, bool, bool, Vote]] = field(
        default_factory=list
    )

    def send(self, name: str, delays: list[float | None]) -> None:
        m = self.members[name]
        if m.frozen:
            return
        now = m.local(self.real)
        m.counter += 1
        is_node = m.grants is not None
        eligible = m.eligible and is_node
        active = m.granted(self.real)
        if is_node:
            m.voter.heard(name, PRIORITY[name], eligible, active, m.counter, now)
        vote = m.voter.vote(now)
        if m.grants is not None:
            m.grants.sent_counter(m.counter, now)
            m.grants.voted(name, vote)
        others = [o for o in MEMBERS if o != name]
        for other, delay in zip(others, delays, strict=True):
            if delay is not None:
                self.in_flight.append(
                    (
                        self.real + delay,
                        name,
                        other,
                        m.counter,
                        PRIORITY[name],
                        eligible,
                        active,
                        vote,
                    )
                )

    def advance(self, dt: float) -> None:
        self.real += dt
        due = sorted(x for x in self.in_flight if x[0] <= self.real)
        self.in_flight = [x for x in self.in_flight if x[0] > self.real]
        for arrival, sender, receiver, counter, priority, eligible, active, vote in due:
            m = self.members[receiver]
            if m.frozen:
                continue  # a frozen process's socket buffer: modelled as lost
            if counter <= m.last_seen.get(sender, 0):
                continue  # the Receiver refuses a replay
            m.last_seen[sender] = counter
            now = m.local(arrival)
            m.voter.heard(sender, priority, eligible, active, counter, now)
            if m.grants is not None:
                m.grants.voted(sender, vote)


def world(offsets: list[float]) -> World:
    members = {}
    for name, offset in zip(MEMBERS, offsets, strict=True):
        voter = Voter(name, HOLD, DEAD, started=offset)
        grants = None if name == "w" else Grants(name, frozenset(MEMBERS), HOLD)
        members[name] = Member(name, offset, voter, grants)
    return World(members)


LINKS = [(a, b) for a in MEMBERS for b in MEMBERS if a != b]
#: Mostly prompt, sometimes late (reordered), sometimes lost.
delay = st.one_of(
    st.floats(0, 0.02), st.floats(0, 0.02), st.floats(0, 0.02), st.floats(0, 0.6), st.none()
)
#: One heartbeat round: every member sends (each link delays or loses the datagram; a cut
#: link loses everything until it is healed), then time passes; sometimes a link is cut or
#: healed, a node's health flips, or a member freezes or thaws.
round_ = st.tuples(
    st.lists(st.lists(delay, min_size=2, max_size=2), min_size=3, max_size=3),
    st.floats(0.02, 0.3),
    # now and then a new partition: any set of the six one-way links is cut
    st.one_of(st.none(), st.none(), st.none(), st.sets(st.sampled_from(LINKS))),
    st.one_of(st.none(), st.tuples(st.sampled_from(("n1", "n2")), st.booleans())),
    st.one_of(st.none(), st.tuples(st.sampled_from(MEMBERS), st.booleans())),
)


@settings(max_examples=300)
@given(
    offsets=st.lists(st.floats(0, 1000), min_size=3, max_size=3),
    rounds=st.lists(round_, min_size=20, max_size=200),
)
def test_never_two_nodes_granted_at_once(offsets: list[float], rounds: list[tuple]) -> None:  # type: ignore[type-arg]
    w = world(offsets)
    cut: set[tuple[str, str]] = set()
    for delays, dt, toggle, health, freeze in rounds:
        if toggle is not None:
            cut = set(toggle)
        for name, links in zip(MEMBERS, delays, strict=True):
            others = [o for o in MEMBERS if o != name]
            w.send(
                name, [None if (name, o) in cut else d for o, d in zip(others, links, strict=True)]
            )
        if health is not None:
            w.members[health[0]].eligible = health[1]
        if freeze is not None:
            w.members[freeze[0]].frozen = freeze[1]
        # check at many instants in between, not only at the round's end
        for _ in range(4):
            w.advance(dt / 4)
            holders = [n for n in ("n1", "n2") if w.members[n].granted(w.real)]
            assert len(holders) <= 1, (holders, w.real)
            if holders:
                event("a node was granted")


def run_rounds(w: World, rounds: int, cut: frozenset[tuple[str, str]] = frozenset()) -> None:
    for _ in range(rounds):
        for name in MEMBERS:
            others = [o for o in MEMBERS if o != name]
            w.send(name, [None if (name, o) in cut else 0.001 for o in others])
        w.advance(0.1)


def test_the_higher_node_is_granted_after_the_start_hold() -> None:
    w = world([0.0, 0.0, 0.0])
    run_rounds(w, 15)  # 1.5 s: every voter still waits out what it may have granted
    assert not w.members["n1"].granted(w.real)
    run_rounds(w, 10)
    assert w.members["n1"].granted(w.real) and not w.members["n2"].granted(w.real)


def test_a_cut_between_the_nodes_leaves_the_holder_granted_by_the_witness() -> None:
    w = world([0.0, 5.0, 9.0])
    run_rounds(w, 30)
    assert w.members["n1"].granted(w.real)
    cut = frozenset({("n1", "n2"), ("n2", "n1")})
    for _ in range(50):
        run_rounds(w, 1, cut)
        assert w.members["n1"].granted(w.real) and not w.members["n2"].granted(w.real)


def test_a_dead_holder_is_replaced_after_the_hold() -> None:
    w = world([0.0, 0.0, 0.0])
    run_rounds(w, 30)
    assert w.members["n1"].granted(w.real)
    w.members["n1"].frozen = True
    run_rounds(w, 5)
    assert not w.members["n2"].granted(w.real)  # n1's grants may still be held
    run_rounds(w, 20)
    assert w.members["n2"].granted(w.real) and not w.members["n1"].granted(w.real)


def test_the_witness_going_away_changes_nothing() -> None:
    w = world([0.0, 0.0, 0.0])
    run_rounds(w, 30)
    w.members["w"].frozen = True
    for _ in range(40):
        run_rounds(w, 1)
        assert w.members["n1"].granted(w.real)


def test_a_node_cut_from_both_loses_its_grant_and_the_other_takes_over() -> None:
    w = world([0.0, 0.0, 0.0])
    run_rounds(w, 30)
    cut = frozenset({("n1", "n2"), ("n2", "n1"), ("n1", "w"), ("w", "n1")})
    run_rounds(w, 3, cut)
    # n1's own vote alone is no majority: its grant ends within the hold of the last votes
    run_rounds(w, 20, cut)
    assert not w.members["n1"].granted(w.real)
    assert w.members["n2"].granted(w.real)


@pytest.mark.parametrize(
    "cut",
    [
        # nobody hears n1, which still hears everyone and votes for itself
        frozenset({("n1", "n2"), ("n1", "w")}),
        # n1 and the witness lose each other, and n2 stops hearing n1: n1 keeps the
        # witness's last grant (it never hears the witness take it back) and its own vote
        frozenset({("n1", "w"), ("w", "n1"), ("n1", "n2")}),
    ],
)
def test_a_cut_of_the_holders_heartbeats_never_gives_two_holders(
    cut: frozenset[tuple[str, str]],
) -> None:
    """The others move their votes only once every grant they gave n1 has ended."""
    w = world([0.0, 3.0, 7.0])
    run_rounds(w, 30)
    assert w.members["n1"].granted(w.real)
    for _ in range(40):
        for name in MEMBERS:
            others = [o for o in MEMBERS if o != name]
            w.send(name, [None if (name, o) in cut else 0.001 for o in others])
        for _ in range(10):
            w.advance(0.01)
            holders = [n for n in ("n1", "n2") if w.members[n].granted(w.real)]
            assert len(holders) <= 1, (holders, w.real)
    assert w.members["n2"].granted(w.real)
