"""The heartbeat of an active-passive group on the wire: every framing rule in one module.

One UDP datagram, at most `MAX_PACKET` bytes (one Ethernet frame, never fragmented):

    offset size  field
    0      4     magic b"AEVH"
    4      1     version (1)
    5      1     flags: bit 0 active (owns the VIP), bit 1 eligible (may claim it)
    6      1     priority, 1-254
    7      1     health: index into HEALTH_CODES
    8      1     length of the node id (1-64, [A-Za-z0-9_.-])
    9      1     length of the group name (1-64, same alphabet)
    10     2     length of the session delta (JSON, <= MAX_SESSION_BYTES)
    12     8     term
    20     8     fencing token (the ownership key's mod revision; 0 unfenced)
    28     8     counter: the sender's wall clock in ns, strictly increasing per sender
    36     ...   node id, group name, [vote], session delta
    -32    32    HMAC-SHA256 over every byte before it, with the group's shared key

With flag bit 2 (a group with a witness: edge.vip.quorum) the vote follows the group
name: 1 byte length of the candidate's id (0: no vote), the id, 8 bytes: the candidate's
heartbeat counter the vote answers.

Receivers check the size bounds and the MAC before they look at anything else, then refuse
a counter not above the last one accepted from that sender (a replay) or further than
`window_s` from their own clock (a replay to a receiver that restarted, or a sender whose
clock is off). The session delta is a JSON list of [client key, backend] pairs; an empty
backend removes the key.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from edge.state import NodeState

MAGIC = b"AEVH"
VERSION = 1
MAX_PACKET = 1400
MAC_SIZE = 32
MIN_KEY_BYTES = 32
MAX_NAME = 64
MAX_SESSION_KEY = 128
_HEAD = struct.Struct("!4sBBBBBBHQQQ")
_ECHO = struct.Struct("!Q")
MAX_SESSION_BYTES = MAX_PACKET - _HEAD.size - 2 * MAX_NAME - MAC_SIZE
#: What a vote takes of a voting member's session budget.
MAX_VOTE_BYTES = 1 + MAX_NAME + _ECHO.size
HEALTH_CODES: tuple[NodeState, ...] = tuple(NodeState)
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ACTIVE, _ELIGIBLE, _VOTE = 1, 2, 4
_UINT64 = (1 << 64) - 1


class Refusal(enum.StrEnum):
    TOO_SHORT = "too_short"
    TOO_LONG = "too_long"
    BAD_MAGIC = "bad_magic"
    BAD_VERSION = "bad_version"
    BAD_MAC = "bad_mac"
    MALFORMED = "malformed"
    WRONG_GROUP = "wrong_group"
    UNKNOWN_SENDER = "unknown_sender"
    REPLAY = "replay"
    STALE = "stale"


class HeartbeatRefused(Exception):
    def __init__(self, reason: Refusal, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else str(reason))
        self.reason = reason


Sessions = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Heartbeat:
    node_id: str
    group: str
    priority: int
    health: NodeState
    active: bool
    eligible: bool
    term: int
    token: int
    counter: int
    sessions: Sessions = field(default=())
    # A member's vote in a group with a witness (voting False: no vote section at all).
    voting: bool = False
    vote_for: str | None = None
    vote_echo: int = 0


def _check_name(what: str, value: str) -> None:
    if not _NAME.fullmatch(value):
        raise ValueError(f"{what} must be 1-64 of [A-Za-z0-9_.-]")


def encode_sessions(pairs: Sessions) -> bytes:
    return json.dumps([list(p) for p in pairs], separators=(",", ":")).encode()


def sessions_that_fit(pairs: Sessions, budget: int = MAX_SESSION_BYTES) -> Sessions:
    """The longest prefix of `pairs` whose encoding fits in `budget` bytes."""
    used = 2  # the brackets
    taken = 0
    for key, backend in pairs:
        size = len(encode_sessions(((key, backend),))) - 2 + (1 if taken else 0)
        if used + size > budget:
            break
        used += size
        taken += 1
    return pairs[:taken]


def encode(hb: Heartbeat, key: bytes) -> bytes:
    _check_name("node id", hb.node_id)
    _check_name("group", hb.group)
    if not 1 <= hb.priority <= 254:
        raise ValueError("priority must be 1-254")
    for number in (hb.term, hb.token, hb.counter):
        if not 0 <= number <= _UINT64:
            raise ValueError("term, token and counter are unsigned 64-bit")
    for client_key, backend in hb.sessions:
        if not 1 <= len(client_key) <= MAX_SESSION_KEY or (
            backend and not _NAME.fullmatch(backend)
        ):
            raise ValueError("bad session pair")
    node, group = hb.node_id.encode(), hb.group.encode()
    sessions = encode_sessions(hb.sessions) if hb.sessions else b""
    budget = MAX_SESSION_BYTES - (MAX_VOTE_BYTES if hb.voting else 0)
    if len(sessions) > budget:
        raise ValueError("session delta too large: use sessions_that_fit")
    vote = b""
    if hb.voting:
        candidate = b""
        if hb.vote_for is not None:
            _check_name("vote", hb.vote_for)
            candidate = hb.vote_for.encode()
        if not 0 <= hb.vote_echo <= _UINT64:
            raise ValueError("the vote's echo is unsigned 64-bit")
        vote = bytes([len(candidate)]) + candidate + _ECHO.pack(hb.vote_echo)
    flags = (
        (_ACTIVE if hb.active else 0)
        | (_ELIGIBLE if hb.eligible else 0)
        | (_VOTE if hb.voting else 0)
    )
    head = _HEAD.pack(
        MAGIC,
        VERSION,
        flags,
        hb.priority,
        HEALTH_CODES.index(hb.health),
        len(node),
        len(group),
        len(sessions),
        hb.term,
        hb.token,
        hb.counter,
    )
    body = head + node + group + vote + sessions
    return body + hmac.digest(key, body, hashlib.sha256)


def decode(packet: bytes, key: bytes) -> Heartbeat:
    """Authenticate and parse one datagram; HeartbeatRefused for anything else."""
    if len(packet) < _HEAD.size + 2 + MAC_SIZE:
        raise HeartbeatRefused(Refusal.TOO_SHORT, f"{len(packet)} bytes")
    if len(packet) > MAX_PACKET:
        raise HeartbeatRefused(Refusal.TOO_LONG, f"{len(packet)} bytes")
    if packet[:4] != MAGIC:
        raise HeartbeatRefused(Refusal.BAD_MAGIC)
    body, mac = packet[:-MAC_SIZE], packet[-MAC_SIZE:]
    if not hmac.compare_digest(mac, hmac.digest(key, body, hashlib.sha256)):
        raise HeartbeatRefused(Refusal.BAD_MAC)
    (
        _,
        version,
        flags,
        priority,
        health,
        node_len,
        group_len,
        sessions_len,
        term,
        token,
        counter,
    ) = _HEAD.unpack_from(body)
    if version != VERSION:
        raise HeartbeatRefused(Refusal.BAD_VERSION, str(version))
    voting = bool(flags & _VOTE)
    vote_at = _HEAD.size + node_len + group_len
    vote_len = 0
    if voting:
        if vote_at >= len(body):
            raise HeartbeatRefused(Refusal.MALFORMED, "lengths do not add up")
        vote_len = 1 + body[vote_at] + _ECHO.size
    if vote_at + vote_len + sessions_len != len(body):
        raise HeartbeatRefused(Refusal.MALFORMED, "lengths do not add up")
    if (
        flags & ~(_ACTIVE | _ELIGIBLE | _VOTE)
        or not 1 <= priority <= 254
        or health >= len(HEALTH_CODES)
    ):
        raise HeartbeatRefused(Refusal.MALFORMED, "flags, priority or health out of range")
    offset = _HEAD.size
    vote_for: str | None = None
    vote_echo = 0
    try:
        node_id = body[offset : offset + node_len].decode("ascii")
        offset += node_len
        group = body[offset : offset + group_len].decode("ascii")
        offset += group_len
        if voting:
            candidate_len = body[offset]
            if candidate_len:
                vote_for = body[offset + 1 : offset + 1 + candidate_len].decode("ascii")
            (vote_echo,) = _ECHO.unpack_from(body, offset + 1 + candidate_len)
            offset += vote_len
        sessions = _parse_sessions(body[offset:]) if sessions_len else ()
    except (UnicodeDecodeError, ValueError) as error:
        raise HeartbeatRefused(Refusal.MALFORMED, str(error)) from None
    if not _NAME.fullmatch(node_id) or not _NAME.fullmatch(group):
        raise HeartbeatRefused(Refusal.MALFORMED, "node id or group")
    if vote_for is not None and not _NAME.fullmatch(vote_for):
        raise HeartbeatRefused(Refusal.MALFORMED, "vote")
    return Heartbeat(
        node_id=node_id,
        group=group,
        priority=priority,
        health=HEALTH_CODES[health],
        active=bool(flags & _ACTIVE),
        eligible=bool(flags & _ELIGIBLE),
        term=term,
        token=token,
        counter=counter,
        sessions=sessions,
        voting=voting,
        vote_for=vote_for,
        vote_echo=vote_echo,
    )


def _valid_pair(client_key: str, backend: str) -> bool:
    backend_ok = not backend or bool(_NAME.fullmatch(backend))
    return 1 <= len(client_key) <= MAX_SESSION_KEY and backend_ok


def _parse_sessions(raw: bytes) -> Sessions:
    data = json.loads(raw)
    if not isinstance(data, list):
        raise ValueError("session delta is not a list")
    pairs = []
    for item in data:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not all(isinstance(v, str) for v in item)
            or not _valid_pair(item[0], item[1])
        ):
            raise ValueError("bad session pair")
        pairs.append((item[0], item[1]))
    return tuple(pairs)


@dataclass(slots=True)
class Receiver:
    """Refuses what is not for this group, not from a member (at its own address), replayed
    or stale."""

    key: bytes
    group: str
    members: Mapping[str, str]  # node id -> the address its heartbeats come from
    self_id: str
    window_s: float = 2.0
    last_counter: dict[str, int] = field(default_factory=dict)
    refused: dict[Refusal, int] = field(default_factory=dict)

    def accept(self, packet: bytes, now_ns: int, source: str | None = None) -> Heartbeat:
        try:
            hb = decode(packet, self.key)
            if hb.group != self.group:
                raise HeartbeatRefused(Refusal.WRONG_GROUP, hb.group)
            expected = self.members.get(hb.node_id)
            if expected is None or hb.node_id == self.self_id:
                raise HeartbeatRefused(Refusal.UNKNOWN_SENDER, hb.node_id)
            if source is not None and source != expected:
                raise HeartbeatRefused(Refusal.UNKNOWN_SENDER, f"{hb.node_id} from {source}")
            if hb.counter <= self.last_counter.get(hb.node_id, -1):
                raise HeartbeatRefused(Refusal.REPLAY, hb.node_id)
            if abs(hb.counter - now_ns) > self.window_s * 1e9:
                raise HeartbeatRefused(Refusal.STALE, hb.node_id)
        except HeartbeatRefused as refused:
            self.refused[refused.reason] = self.refused.get(refused.reason, 0) + 1
            raise
        self.last_counter[hb.node_id] = hb.counter
        return hb


@dataclass(slots=True)
class Counter:
    """The sender's counter: wall-clock ns, strictly increasing even if the clock steps
    back, so a restarted sender starts above anything it sent before."""

    last: int = 0

    def next(self, now_ns: int) -> int:
        self.last = max(self.last + 1, now_ns)
        return self.last
