"""The peer tables and the forwarding decision: any order of deltas and snapshots ends at
the sender's table; own flows stay local, a live peer's go to it, unknown ones stay local."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.flowshare.table import Decision, Directory, SenderTable, Verdict, map_changes
from edge.flowshare.wire import Delta, FlowKey, Op, Snapshot, flow_key, snapshot_frames

KEYS = [flow_key("198.19.0.2", port, "198.51.100.10", 8080) for port in range(40000, 40008)]
Message = tuple[int, Delta | Snapshot]


def sender_stream(
    actions: list[tuple[int, int, int]], per_frame: int
) -> tuple[list[Message], list[frozenset[FlowKey]]]:
    """Plays a sender: (what, key, count) actions make deltas or snapshots with the seqs
    a real sender would use. Returns the messages and the sender's table after each."""
    table: set[FlowKey] = set()
    messages: list[Message] = []
    tables: list[frozenset[FlowKey]] = []
    seq = 0
    for what, index, count in actions:
        if what < 2:  # a delta of `count` events
            events = []
            for i in range(count):
                key = KEYS[(index + i) % len(KEYS)]
                op = Op.ACCEPT if (what + i) % 2 == 0 else Op.CLOSE
                (table.add if op is Op.ACCEPT else table.discard)(key)
                events.append((op, key))
            seq += 1
            messages.append((seq, Delta(tuple(events))))
            tables.append(frozenset(table))
        else:
            for frame in snapshot_frames(sorted(table), ("s", "r", 1, 0), seq + 1, per_frame):
                assert isinstance(frame.body, Snapshot)
                messages.append((frame.seq, frame.body))
                tables.append(frozenset(table))
                seq = frame.seq
    return messages, tables


def apply(table: SenderTable, message: Message) -> None:
    seq, body = message
    if isinstance(body, Delta):
        table.apply_delta(seq, body)
    else:
        table.apply_snapshot(body)


actions = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 7), st.integers(1, 4)), min_size=1, max_size=25
)


@settings(max_examples=400)
@given(actions, st.integers(1, 3), st.randoms(use_true_random=False))
def test_any_order_with_duplicates_converges_to_the_senders_table(
    acts: list[tuple[int, int, int]], per_frame: int, rnd: object
) -> None:
    messages, tables = sender_stream(acts, per_frame)
    shuffled = messages + rnd.sample(messages, len(messages) // 2)  # type: ignore[attr-defined]
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    table = SenderTable()
    for message in shuffled:
        apply(table, message)
    assert table.owned() == tables[-1]
    assert len(table) == len(tables[-1])


@given(actions)
def test_in_order_the_table_follows_the_sender(acts: list[tuple[int, int, int]]) -> None:
    messages, tables = sender_stream(acts, 2)
    table = SenderTable()
    for (seq, body), expected in zip(messages, tables, strict=True):
        apply(table, (seq, body))
        if not isinstance(body, Snapshot) or body.part == body.parts - 1:
            assert table.owned() == expected  # (a snapshot's parts apply together)


def test_changed_keys_are_reported() -> None:
    table = SenderTable()
    assert table.apply_delta(1, Delta(((Op.ACCEPT, KEYS[0]), (Op.ACCEPT, KEYS[1])))) == {
        KEYS[0],
        KEYS[1],
    }
    assert table.apply_delta(2, Delta(((Op.CLOSE, KEYS[0]), (Op.ACCEPT, KEYS[0])))) == set()
    assert table.apply_delta(2, Delta(((Op.CLOSE, KEYS[1]),))) == {KEYS[1]}
    assert table.apply_snapshot(Snapshot(5, 0, 1, (KEYS[2],))) == {KEYS[0], KEYS[2]}
    assert table.apply_delta(4, Delta(((Op.ACCEPT, KEYS[3]),))) == set()  # older than it
    assert table.clear() == {KEYS[2]}


def test_the_decision() -> None:
    directory = Directory()
    directory.table("edge2").apply_delta(1, Delta(((Op.ACCEPT, KEYS[0]), (Op.ACCEPT, KEYS[1]))))
    directory.table("edge3").apply_delta(1, Delta(((Op.ACCEPT, KEYS[1]),)))
    directory.mine = {KEYS[2]}
    # Peers not (yet) heard from own nothing.
    assert directory.decide(KEYS[0]) == Decision(Verdict.UNKNOWN)
    assert directory.set_live("edge2", True) == {KEYS[0], KEYS[1]}
    directory.set_live("edge3", True)
    assert directory.decide(KEYS[0]) == Decision(Verdict.PEER, "edge2")
    assert directory.decide(KEYS[1]) == Decision(Verdict.PEER, "edge2")  # first name wins
    assert directory.decide(KEYS[2]) == Decision(Verdict.LOCAL_OWNED)
    assert directory.decide(KEYS[3]) == Decision(Verdict.UNKNOWN)
    directory.mine.add(KEYS[0])  # my own socket has it: never forwarded
    assert directory.desired() == {KEYS[1]: "edge2"}
    directory.set_live("edge2", False)
    assert directory.desired() == {KEYS[1]: "edge3"}
    assert directory.forwarded([KEYS[1], KEYS[3]]) == {KEYS[1]: "edge3", KEYS[3]: None}


@given(
    st.dictionaries(st.sampled_from(KEYS), st.integers(1, 3)),
    st.dictionaries(st.sampled_from(KEYS), st.none() | st.integers(1, 3)),
)
def test_map_changes_reach_the_wanted_map(
    installed: dict[FlowKey, int], wanted: dict[FlowKey, int | None]
) -> None:
    deletes, adds = map_changes(installed, wanted)
    after = dict(installed)
    for key in deletes:
        assert key in after  # never deletes what is not there (nft would refuse the batch)
        del after[key]
    for key in adds:
        assert key not in after  # never adds over an element
    after.update(adds)
    for key, mark in wanted.items():
        assert after.get(key) == mark
    for key in set(installed) - set(wanted):
        assert after[key] == installed[key]
