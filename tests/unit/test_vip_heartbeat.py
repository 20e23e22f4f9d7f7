"""Heartbeat wire format: round trip, size bounds, and refusal of every mutation, garbage,
a wrong key, a replay, a stale packet, a stranger and another group."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.state import NodeState
from edge.vip.heartbeat import (
    MAX_PACKET,
    MAX_SESSION_BYTES,
    Counter,
    Heartbeat,
    HeartbeatRefused,
    Receiver,
    Refusal,
    decode,
    encode,
    sessions_that_fit,
)

KEY = b"k" * 32
NOW = 1_700_000_000 * 10**9
names = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)
session_pairs = st.tuples(
    st.text(min_size=1, max_size=40), st.one_of(st.just(""), names.map(lambda s: s[:20]))
)


@st.composite
def heartbeats(draw: st.DrawFn) -> Heartbeat:
    pairs = tuple(draw(st.lists(session_pairs, max_size=30)))
    return Heartbeat(
        node_id=draw(names),
        group=draw(names),
        priority=draw(st.integers(1, 254)),
        health=draw(st.sampled_from(list(NodeState))),
        active=draw(st.booleans()),
        eligible=draw(st.booleans()),
        term=draw(st.integers(0, 2**64 - 1)),
        token=draw(st.integers(0, 2**64 - 1)),
        counter=draw(st.integers(0, 2**64 - 1)),
        sessions=sessions_that_fit(pairs),
    )


def hb(node: str = "n2", counter: int = NOW, **kw: object) -> Heartbeat:
    data: dict[str, object] = {
        "node_id": node,
        "group": "g1",
        "priority": 100,
        "health": NodeState.HEALTHY,
        "active": True,
        "eligible": True,
        "term": 3,
        "token": 42,
        "counter": counter,
    }
    data.update(kw)
    return Heartbeat(**data)  # type: ignore[arg-type]


@settings(max_examples=300)
@given(heartbeats())
def test_round_trip_and_size_bound(beat: Heartbeat) -> None:
    packet = encode(beat, KEY)
    assert len(packet) <= MAX_PACKET
    assert decode(packet, KEY) == beat


@settings(max_examples=500)
@given(heartbeats(), st.data())
def test_any_mutation_of_a_signed_packet_is_refused(beat: Heartbeat, data: st.DataObject) -> None:
    packet = bytearray(encode(beat, KEY))
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    if kind == "flip":
        index = data.draw(st.integers(0, len(packet) - 1))
        packet[index] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        packet = packet[: data.draw(st.integers(0, len(packet) - 1))]
    elif kind == "extend":
        packet += data.draw(st.binary(min_size=1, max_size=64))
    else:
        start = data.draw(st.integers(0, len(packet) - 1))
        packet[start:start] = data.draw(st.binary(min_size=1, max_size=8))
    with pytest.raises(HeartbeatRefused):
        decode(bytes(packet), KEY)


@settings(max_examples=300)
@given(st.binary(max_size=MAX_PACKET + 10))
def test_garbage_is_refused(garbage: bytes) -> None:
    with pytest.raises(HeartbeatRefused):
        decode(garbage, KEY)


def test_wrong_key_is_refused_as_bad_mac() -> None:
    with pytest.raises(HeartbeatRefused) as refused:
        decode(encode(hb(), b"x" * 32), KEY)
    assert refused.value.reason is Refusal.BAD_MAC


def test_signed_but_nonsense_fields_are_refused() -> None:
    import hashlib
    import hmac

    body = bytearray(encode(hb(), KEY)[:-32])
    body[6] = 0  # priority 0, re-signed by someone holding the key
    with pytest.raises(HeartbeatRefused) as refused:
        decode(bytes(body) + hmac.digest(KEY, bytes(body), hashlib.sha256), KEY)
    assert refused.value.reason is Refusal.MALFORMED


def receiver() -> Receiver:
    return Receiver(KEY, "g1", {"n1": "198.18.2.1", "n2": "198.18.2.2"}, self_id="n1")


def test_replayed_packet_is_refused_and_the_next_one_accepted() -> None:
    r = receiver()
    packet = encode(hb(counter=NOW), KEY)
    assert r.accept(packet, NOW).node_id == "n2"
    with pytest.raises(HeartbeatRefused) as refused:
        r.accept(packet, NOW + 10**8)
    assert refused.value.reason is Refusal.REPLAY
    older = encode(hb(counter=NOW - 5), KEY)
    with pytest.raises(HeartbeatRefused):
        r.accept(older, NOW + 10**8)
    assert r.accept(encode(hb(counter=NOW + 1), KEY), NOW + 10**8).counter == NOW + 1
    assert r.refused == {Refusal.REPLAY: 2}


def test_a_replay_to_a_restarted_receiver_is_stale() -> None:
    packet = encode(hb(counter=NOW), KEY)
    with pytest.raises(HeartbeatRefused) as refused:
        receiver().accept(packet, NOW + 3 * 10**9)
    assert refused.value.reason is Refusal.STALE


@pytest.mark.parametrize(
    ("beat", "reason"),
    [
        (hb(node="n9"), Refusal.UNKNOWN_SENDER),
        (hb(node="n1"), Refusal.UNKNOWN_SENDER),  # our own id from elsewhere
        (hb(group="g2"), Refusal.WRONG_GROUP),
    ],
)
def test_strangers_ourselves_and_other_groups_are_refused(beat: Heartbeat, reason: Refusal) -> None:
    with pytest.raises(HeartbeatRefused) as refused:
        receiver().accept(encode(beat, KEY), NOW)
    assert refused.value.reason is reason


def test_a_member_id_from_another_address_is_refused() -> None:
    r = receiver()
    with pytest.raises(HeartbeatRefused) as refused:
        r.accept(encode(hb(), KEY), NOW, source="198.18.2.9")
    assert refused.value.reason is Refusal.UNKNOWN_SENDER
    assert r.accept(encode(hb(), KEY), NOW, source="198.18.2.2").node_id == "n2"


def test_counter_increases_even_when_the_clock_steps_back() -> None:
    c = Counter()
    assert c.next(100) == 100
    assert c.next(50) == 101
    assert c.next(500) == 500


def test_sessions_that_fit_stays_within_the_budget() -> None:
    pairs = tuple((f"198.18.2.{i % 250}:{i}", f"backend-{i % 7}") for i in range(500))
    fitted = sessions_that_fit(pairs)
    assert 0 < len(fitted) < len(pairs)
    beat = hb(node="n" * 64, group="g" * 64, sessions=fitted)
    assert len(encode(beat, KEY)) <= MAX_PACKET
    assert decode(encode(beat, KEY), KEY).sessions == fitted
    with pytest.raises(ValueError, match="too large"):
        encode(hb(sessions=pairs), KEY)
    assert len(sessions_that_fit(pairs, budget=MAX_SESSION_BYTES)) == len(fitted)


def test_announcement_frames_are_a_gratuitous_request_and_an_overriding_na() -> None:
    from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr
    from scapy.layers.l2 import ARP, Ether

    from edge.vip.address import announcement_frame

    mac = "02:00:00:00:00:01"
    arp = Ether(announcement_frame("198.18.2.100/24", mac))
    assert arp.dst == "ff:ff:ff:ff:ff:ff" and arp[ARP].op == 1  # a request, not a reply
    assert arp[ARP].psrc == arp[ARP].pdst == "198.18.2.100" and arp[ARP].hwsrc == mac
    na = Ether(announcement_frame("2001:db8::100/64", mac))
    assert na[ICMPv6ND_NA].O == 1 and na[ICMPv6ND_NA].S == 0
    assert na[ICMPv6ND_NA].tgt == "2001:db8::100" and na[ICMPv6NDOptDstLLAddr].lladdr == mac
    assert na.hlim == 255 and na.dst == "33:33:00:00:00:01"
