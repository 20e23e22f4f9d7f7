"""The wire format of flow sharing: frames, their authentication and replay protection.

A frame (big-endian) is

    magic "AEF1" | kind u8 | sender len u8 + name | receiver len u8 + name
    | boot u64 | seq u64 | time_ms u64 | body len u32 | body | HMAC-SHA256 (32 bytes)

The HMAC (shared key) covers everything before it. `boot` is the sender's start time
in ns (a restart makes a newer incarnation), `seq` rises by one per frame on each
(sender, receiver, kind-channel) stream, `time_ms` is the sender's wall clock. A receiver
refuses a frame whose MAC is wrong, that is addressed to someone else, whose seq is not
above the last one it took from that stream, whose boot is older than the one it knows,
or whose time is outside the window: replays and forgeries are refused, garbage is
refused, sizes are bounded. Flows of a frame are always the sender's own flows.

Bodies: DELTA `count u32` + entries (op u8: 1 accept, 2 close; key); SNAPSHOT
`as_of u64 | part u32 | parts u32 | count u32` + keys; ACK `acked u64 | holding u32`;
KEEPALIVE `heard u64` (the data seq just read, answered before it is applied).
A key is `family u8 (4|6) | client addr | client port u16 | vip addr | vip port u16`.
Pure: no I/O; the caller passes the clock.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

MAGIC = b"AEF1"
MAC_SIZE = 32
MAX_FRAME = 4 << 20  # bytes, whole frame
MAX_NAME = 64
MAX_FLOWS_PER_FRAME = 100_000
_HEAD = struct.Struct("!QQQI")  # boot, seq, time_ms, body length


class FrameError(ValueError):
    """A frame that must be refused; the message says why (never echoes a key)."""


class Kind(enum.IntEnum):
    DELTA = 1
    SNAPSHOT = 2
    ACK = 3
    KEEPALIVE = 4  # the receiver answering a heartbeat at once (see `keepalive`)


class Op(enum.IntEnum):
    ACCEPT = 1
    CLOSE = 2


class FlowKey(NamedTuple):
    """(client address, client port, VIP, VIP port); addresses in their canonical text."""

    client: str
    client_port: int
    vip: str
    vip_port: int

    @property
    def family(self) -> int:
        return 6 if ":" in self.client else 4


def flow_key(client: str, client_port: int, vip: str, vip_port: int) -> FlowKey:
    """A key with canonical addresses (one spelling per address, so keys compare)."""
    a, b = ipaddress.ip_address(client), ipaddress.ip_address(vip)
    if a.version != b.version:
        raise ValueError("client and VIP must be of one address family")
    if not (0 < client_port < 65536 and 0 < vip_port < 65536):
        raise ValueError("ports must be 1-65535")
    return FlowKey(str(a), client_port, str(b), vip_port)


@dataclass(frozen=True, slots=True)
class Delta:
    events: tuple[tuple[Op, FlowKey], ...]


@dataclass(frozen=True, slots=True)
class Snapshot:
    as_of: int  # the seq of its first part: the sender's table before any later delta
    part: int  # 0-based
    parts: int
    keys: tuple[FlowKey, ...]


@dataclass(frozen=True, slots=True)
class Ack:
    acked: int  # the highest data seq applied from this receiver's stream
    holding: int  # flows the acking node holds for the stream's sender


@dataclass(frozen=True, slots=True)
class Keepalive:
    heard: int  # the data seq the receiver just read (not necessarily applied yet)


Body = Delta | Snapshot | Ack | Keepalive


@dataclass(frozen=True, slots=True)
class Frame:
    sender: str
    receiver: str
    boot: int
    seq: int
    time_ms: int
    body: Body

    @property
    def kind(self) -> Kind:
        if isinstance(self.body, Delta):
            return Kind.DELTA
        if isinstance(self.body, Snapshot):
            return Kind.SNAPSHOT
        if isinstance(self.body, Keepalive):
            return Kind.KEEPALIVE
        return Kind.ACK


# -- keys ------------------------------------------------------------------------------


def _pack_key(key: FlowKey) -> bytes:
    client, vip = ipaddress.ip_address(key.client), ipaddress.ip_address(key.vip)
    return (
        bytes((client.version,))
        + client.packed
        + struct.pack("!H", key.client_port)
        + vip.packed
        + struct.pack("!H", key.vip_port)
    )


def _unpack_key(data: bytes, offset: int) -> tuple[FlowKey, int]:
    if offset >= len(data):
        raise FrameError("truncated flow key")
    family = data[offset]
    if family not in (4, 6):
        raise FrameError(f"unknown address family {family}")
    size = 4 if family == 4 else 16
    end = offset + 1 + 2 * (size + 2)
    if end > len(data):
        raise FrameError("truncated flow key")
    at = offset + 1
    client = ipaddress.ip_address(data[at : at + size])
    (client_port,) = struct.unpack_from("!H", data, at + size)
    at += size + 2
    vip = ipaddress.ip_address(data[at : at + size])
    (vip_port,) = struct.unpack_from("!H", data, at + size)
    if not client_port or not vip_port:
        raise FrameError("port 0 in a flow key")
    return FlowKey(str(client), client_port, str(vip), vip_port), end


def _count(data: bytes, offset: int) -> int:
    if offset + 4 > len(data):
        raise FrameError("truncated body")
    (count,) = struct.unpack_from("!I", data, offset)
    if count > MAX_FLOWS_PER_FRAME:
        raise FrameError(f"{count} flows in one frame (at most {MAX_FLOWS_PER_FRAME})")
    return int(count)


def _encode_body(body: Body) -> bytes:
    if isinstance(body, Delta):
        parts = [struct.pack("!I", len(body.events))]
        parts += [bytes((op,)) + _pack_key(key) for op, key in body.events]
        return b"".join(parts)
    if isinstance(body, Snapshot):
        head = struct.pack("!QIII", body.as_of, body.part, body.parts, len(body.keys))
        return head + b"".join(_pack_key(key) for key in body.keys)
    if isinstance(body, Keepalive):
        return struct.pack("!Q", body.heard)
    return struct.pack("!QI", body.acked, body.holding)


def _decode_body(kind: Kind, data: bytes) -> Body:
    if kind is Kind.ACK:
        if len(data) != 12:
            raise FrameError("malformed ack")
        acked, holding = struct.unpack("!QI", data)
        return Ack(acked, holding)
    if kind is Kind.KEEPALIVE:
        if len(data) != 8:
            raise FrameError("malformed keepalive")
        (heard,) = struct.unpack("!Q", data)
        return Keepalive(heard)
    if kind is Kind.DELTA:
        count, offset = _count(data, 0), 4
        events = []
        for _ in range(count):
            if offset >= len(data):
                raise FrameError("truncated delta")
            op = data[offset]
            if op not in (Op.ACCEPT, Op.CLOSE):
                raise FrameError(f"unknown delta op {op}")
            key, offset = _unpack_key(data, offset + 1)
            events.append((Op(op), key))
        if offset != len(data):
            raise FrameError("trailing bytes after the delta")
        return Delta(tuple(events))
    if len(data) < 20:
        raise FrameError("truncated snapshot")
    as_of, part, parts = struct.unpack_from("!QII", data, 0)
    if not 0 <= part < parts:
        raise FrameError(f"snapshot part {part} of {parts}")
    count, offset = _count(data, 16), 20
    keys = []
    for _ in range(count):
        key, offset = _unpack_key(data, offset)
        keys.append(key)
    if offset != len(data):
        raise FrameError("trailing bytes after the snapshot")
    return Snapshot(as_of, part, parts, tuple(keys))


# -- frames ----------------------------------------------------------------------------


def _name(name: str) -> bytes:
    raw = name.encode()
    if not 0 < len(raw) <= MAX_NAME:
        raise ValueError(f"node name of {len(raw)} bytes (1-{MAX_NAME})")
    return bytes((len(raw),)) + raw


def encode(frame: Frame, key: bytes) -> bytes:
    body = _encode_body(frame.body)
    head = (
        MAGIC
        + bytes((frame.kind,))
        + _name(frame.sender)
        + _name(frame.receiver)
        + _HEAD.pack(frame.boot, frame.seq, frame.time_ms, len(body))
    )
    signed = head + body
    data = signed + hmac.new(key, signed, hashlib.sha256).digest()
    if len(data) > MAX_FRAME:
        raise ValueError(f"frame of {len(data)} bytes (at most {MAX_FRAME})")
    return data


def _read_name(data: bytes, offset: int) -> tuple[str, int]:
    if offset >= len(data):
        raise FrameError("truncated header")
    size = data[offset]
    end = offset + 1 + size
    if not 0 < size <= MAX_NAME or end > len(data):
        raise FrameError("malformed node name")
    try:
        return data[offset + 1 : end].decode(), end
    except UnicodeDecodeError:
        raise FrameError("node name is not UTF-8") from None


def decode(data: bytes, key: bytes) -> Frame:
    """Parse and authenticate one frame (no replay check: see `Verifier`)."""
    if len(data) > MAX_FRAME:
        raise FrameError(f"frame of {len(data)} bytes (at most {MAX_FRAME})")
    if len(data) < len(MAGIC) + 1 + MAC_SIZE or not data.startswith(MAGIC):
        raise FrameError("not a flow-sharing frame")
    signed, mac = data[:-MAC_SIZE], data[-MAC_SIZE:]
    # Authenticate before parsing anything else: nothing unauthenticated is interpreted.
    if not hmac.compare_digest(mac, hmac.new(key, signed, hashlib.sha256).digest()):
        raise FrameError("bad MAC (wrong key or altered frame)")
    try:
        kind = Kind(signed[4])
    except ValueError:
        raise FrameError(f"unknown frame kind {signed[4]}") from None
    sender, offset = _read_name(signed, 5)
    receiver, offset = _read_name(signed, offset)
    if offset + _HEAD.size > len(signed):
        raise FrameError("truncated header")
    boot, seq, time_ms, body_len = _HEAD.unpack_from(signed, offset)
    offset += _HEAD.size
    if offset + body_len != len(signed):
        raise FrameError("body length does not match the frame")
    return Frame(sender, receiver, boot, seq, time_ms, _decode_body(kind, signed[offset:]))


def channel(kind: Kind) -> str:
    """Data (deltas and snapshots, one ordered stream) or answers (acks and keepalives,
    one ordered stream back)."""
    return "ack" if kind in (Kind.ACK, Kind.KEEPALIVE) else "data"


@dataclass
class Verifier:
    """Replay protection for frames addressed to `me`: per (sender, channel) the newest
    incarnation and the last seq taken; frames outside `window_ms` of `now_ms` refused."""

    me: str
    window_ms: int
    streams: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)

    def check(self, frame: Frame, now_ms: int) -> None:
        if frame.receiver != self.me:
            raise FrameError(f"addressed to {frame.receiver!r}, not to this node")
        if frame.sender == self.me:
            raise FrameError("claims to come from this node")
        if abs(now_ms - frame.time_ms) > self.window_ms:
            raise FrameError(f"time {frame.time_ms} ms outside the window of {self.window_ms} ms")
        stream = (frame.sender, channel(frame.kind))
        known = self.streams.get(stream)
        if known is not None:
            boot, seq = known
            if frame.boot < boot or (frame.boot == boot and frame.seq <= seq):
                raise FrameError(f"replayed or reordered (seq {frame.seq}, last {seq})")
        self.streams[stream] = (frame.boot, frame.seq)

    def is_new_incarnation(self, frame: Frame) -> bool:
        """Checked before `check`: a frame from a restarted sender (its flows are gone)."""
        known = self.streams.get((frame.sender, channel(frame.kind)))
        return known is not None and frame.boot > known[0]


def snapshot_frames(
    keys: Sequence[FlowKey],
    head: tuple[str, str, int, int],
    first_seq: int,
    per_frame: int = 20_000,
) -> list[Frame]:
    """The sender's table as consecutive SNAPSHOT frames from `first_seq` (as_of = it)."""
    sender, receiver, boot, time_ms = head
    chunks = [keys[i : i + per_frame] for i in range(0, len(keys), per_frame)] or [[]]
    return [
        Frame(
            sender,
            receiver,
            boot,
            first_seq + index,
            time_ms,
            Snapshot(first_seq, index, len(chunks), tuple(chunk)),
        )
        for index, chunk in enumerate(chunks)
    ]


def delta(events: Iterable[tuple[Op, FlowKey]]) -> Delta:
    return Delta(tuple(events))
