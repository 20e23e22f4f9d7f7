"""Flow-sharing frames: round trips, and every alteration, forgery, replay or garbage refused."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.flowshare import wire
from edge.flowshare.wire import (
    Ack,
    Delta,
    Frame,
    FrameError,
    Keepalive,
    Op,
    Snapshot,
    Verifier,
    flow_key,
)

KEY = b"k" * 32
NOW = 1_800_000_000_000

ipv4 = st.ip_addresses(v=4).map(str)
ports = st.integers(1, 65535)
keys = st.builds(flow_key, ipv4, ports, ipv4, ports) | st.builds(
    flow_key, st.ip_addresses(v=6).map(str), ports, st.ip_addresses(v=6).map(str), ports
)
bodies = (
    st.builds(Delta, st.lists(st.tuples(st.sampled_from(Op), keys), max_size=20).map(tuple))
    | st.builds(
        lambda as_of, parts, part, ks: Snapshot(as_of, part % parts, parts, tuple(ks)),
        st.integers(0, 2**40),
        st.integers(1, 5),
        st.integers(0, 4),
        st.lists(keys, max_size=20),
    )
    | st.builds(Ack, st.integers(0, 2**63), st.integers(0, 2**32 - 1))
    | st.builds(Keepalive, st.integers(0, 2**63))
)
frames = st.builds(
    Frame,
    st.just("edge2"),
    st.just("edge1"),
    st.integers(0, 2**63),
    st.integers(1, 2**63),
    st.integers(NOW - 1000, NOW + 1000),
    bodies,
)


@given(frames)
def test_round_trip(frame: Frame) -> None:
    assert wire.decode(wire.encode(frame, KEY), KEY) == frame


@settings(max_examples=300)
@given(frames, st.data())
def test_any_altered_byte_is_refused(frame: Frame, data: st.DataObject) -> None:
    raw = bytearray(wire.encode(frame, KEY))
    index = data.draw(st.integers(0, len(raw) - 1))
    raw[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(FrameError):
        wire.decode(bytes(raw), KEY)


@given(frames, st.data())
def test_truncated_or_extended_frames_are_refused(frame: Frame, data: st.DataObject) -> None:
    raw = wire.encode(frame, KEY)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(FrameError):
        wire.decode(raw[:cut], KEY)
    with pytest.raises(FrameError):
        wire.decode(raw + data.draw(st.binary(min_size=1, max_size=8)), KEY)


@given(frames)
def test_a_frame_signed_with_another_key_is_refused(frame: Frame) -> None:
    with pytest.raises(FrameError, match="bad MAC"):
        wire.decode(wire.encode(frame, b"another key, 16+ bytes"), KEY)


@given(st.binary(max_size=300))
def test_garbage_is_refused(garbage: bytes) -> None:
    with pytest.raises(FrameError):
        wire.decode(garbage, KEY)
    with pytest.raises(FrameError):
        wire.decode(wire.MAGIC + garbage, KEY)


def test_a_validly_signed_frame_with_a_bad_body_is_refused() -> None:
    # Someone holding the key still cannot make the parser misread a body.
    good = wire.encode(Frame("edge2", "edge1", 1, 1, NOW, Ack(1, 0)), KEY)
    signed = good[: -wire.MAC_SIZE]
    for body in (b"\x00" * 11, b"\x00" * 13):
        head = signed[: -12 - 4] + len(body).to_bytes(4, "big")
        forged = head + body
        with pytest.raises(FrameError):
            wire.decode(forged + hmac.new(KEY, forged, hashlib.sha256).digest(), KEY)


def test_sizes_are_bounded() -> None:
    many = tuple((Op.ACCEPT, flow_key("10.0.0.1", p, "198.51.100.10", 80)) for p in range(1, 3))
    frame = Frame("edge2", "edge1", 1, 1, NOW, Delta(many))
    raw = bytearray(wire.encode(frame, KEY))
    assert len(raw) < 200
    with pytest.raises(FrameError, match="at most"):
        wire.decode(bytes(wire.MAX_FRAME + 1), KEY)
    keys_ = [flow_key("10.0.0.1", 1 + p % 60000, "198.51.100.10", 80) for p in range(45_000)]
    for part in wire.snapshot_frames(keys_, ("edge2", "edge1", 1, NOW), 7):
        assert len(wire.encode(part, KEY)) <= wire.MAX_FRAME


def _frame(seq: int, boot: int = 5, time_ms: int = NOW, **kw: str) -> Frame:
    return Frame(
        kw.get("sender", "edge2"), kw.get("receiver", "edge1"), boot, seq, time_ms, Delta(())
    )


def test_replays_reorders_and_stale_incarnations_are_refused() -> None:
    verifier = Verifier("edge1", window_ms=30_000)
    verifier.check(_frame(1), NOW)
    verifier.check(_frame(2), NOW)
    for replay in (_frame(2), _frame(1), _frame(9, boot=4)):
        with pytest.raises(FrameError):
            verifier.check(replay, NOW)
    restarted = _frame(1, boot=6)
    assert verifier.is_new_incarnation(restarted)
    verifier.check(restarted, NOW)
    with pytest.raises(FrameError, match="window"):
        verifier.check(_frame(2, boot=6, time_ms=NOW - 31_000), NOW)
    with pytest.raises(FrameError, match="addressed"):
        verifier.check(_frame(3, boot=6, receiver="edge3"), NOW)
    with pytest.raises(FrameError, match="this node"):
        verifier.check(_frame(3, boot=6, sender="edge1"), NOW)
    # Acks are a stream of their own: their seq does not collide with data.
    verifier.check(Frame("edge2", "edge1", 6, 1, NOW, Ack(1, 0)), NOW)


@given(st.lists(st.integers(1, 50), min_size=1, max_size=30))
def test_only_strictly_rising_sequences_pass(seqs: list[int]) -> None:
    verifier = Verifier("edge1", window_ms=30_000)
    last = 0
    for seq in seqs:
        if seq > last:
            verifier.check(_frame(seq), NOW)
            last = seq
        else:
            with pytest.raises(FrameError):
                verifier.check(_frame(seq), NOW)


def test_keepalives_and_acks_share_one_answer_stream() -> None:
    """A keepalive's seq follows the acks' (one ordered stream back): a replayed one is
    refused like a replayed ack."""
    verifier = Verifier("edge1", 1000)
    verifier.check(Frame("edge2", "edge1", 1, 1, NOW, Ack(1, 0)), NOW)
    verifier.check(Frame("edge2", "edge1", 1, 2, NOW, Keepalive(3)), NOW)
    with pytest.raises(FrameError, match="replayed"):
        verifier.check(Frame("edge2", "edge1", 1, 2, NOW, Ack(3, 0)), NOW)
