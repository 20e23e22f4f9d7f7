"""What each peer owns, and which packets must go to which owner. Pure: no I/O, no clock.

`SenderTable` merges one sender's deltas and snapshots so that any order of arrival (and
duplicates) ends at the sender's table: a snapshot taken at seq S replaces everything
older than S; a delta counts only if it is newer than the last snapshot and than the
key's last change. `Directory` holds every peer's table and this node's own flows and
answers, for a key: owned by me -> local; owned by a live peer -> that peer; unknown ->
local (the kernel answers it, as without sharing). Keys it returns are those whose
answer may have changed, so a driver updates only those.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from edge.flowshare.wire import Delta, FlowKey, Op, Snapshot


class Verdict(enum.StrEnum):
    LOCAL_OWNED = "local_owned"  # this node's socket has it
    PEER = "peer"  # a live peer owns it: forward
    UNKNOWN = "unknown"  # nobody known owns it: local (as without sharing)


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    peer: str | None = None


@dataclass
class SenderTable:
    floor: int = -1  # as_of of the newest complete snapshot applied
    entries: dict[FlowKey, tuple[int, bool]] = field(default_factory=dict)  # version, present
    _parts: dict[int, dict[int, tuple[FlowKey, ...]]] = field(default_factory=dict)
    _count: int = 0  # present entries (len() is asked per frame: no scan)

    def owned(self) -> set[FlowKey]:
        return {key for key, (_, present) in self.entries.items() if present}

    def holds(self, key: FlowKey) -> bool:
        entry = self.entries.get(key)
        return entry is not None and entry[1]

    def __len__(self) -> int:
        return self._count

    def apply_delta(self, seq: int, delta: Delta) -> set[FlowKey]:
        """Returns the keys whose presence changed."""
        if seq <= self.floor:
            return set()
        was: dict[FlowKey, bool] = {}
        for op, key in delta.events:
            before = self.entries.get(key)
            if before is not None and seq < before[0]:
                continue
            was.setdefault(key, before is not None and before[1])
            self.entries[key] = (seq, op is Op.ACCEPT)
        changed = {key for key, present in was.items() if self.entries[key][1] != present}
        for key in changed:
            self._count += 1 if self.entries[key][1] else -1
        return changed

    def apply_snapshot(self, snapshot: Snapshot) -> set[FlowKey]:
        """Collects the parts; applies once all are in. Returns the keys that changed."""
        if snapshot.as_of <= self.floor:
            return set()
        parts = self._parts.setdefault(snapshot.as_of, {})
        parts[snapshot.part] = snapshot.keys
        if len(parts) < snapshot.parts:
            return set()
        for as_of in [a for a in self._parts if a <= snapshot.as_of]:
            del self._parts[as_of]
        before = self.owned()
        entries = {key: (snapshot.as_of, True) for chunk in parts.values() for key in chunk}
        for key, (version, present) in self.entries.items():
            if version > snapshot.as_of:  # a delta newer than the snapshot still counts
                entries[key] = (version, present)
        self.entries = entries
        self.floor = snapshot.as_of
        after = self.owned()
        self._count = len(after)
        return before ^ after

    def clear(self) -> set[FlowKey]:
        gone = self.owned()
        self.entries.clear()
        self._parts.clear()
        self.floor = -1
        self._count = 0
        return gone


@dataclass
class Directory:
    """Every peer's flows plus this node's own; peers marked dead own nothing."""

    peers: dict[str, SenderTable] = field(default_factory=dict)
    live: set[str] = field(default_factory=set)
    mine: set[FlowKey] = field(default_factory=set)

    def table(self, peer: str) -> SenderTable:
        return self.peers.setdefault(peer, SenderTable())

    def decide(self, key: FlowKey) -> Decision:
        if key in self.mine:
            return Decision(Verdict.LOCAL_OWNED)
        # Two live claims (a port reused after a lost close): the first name wins, so
        # every node decides alike; the stale claim ends with the owner's next snapshot.
        for name in sorted(self.live):
            table = self.peers.get(name)
            if table is not None and table.holds(key):
                return Decision(Verdict.PEER, name)
        return Decision(Verdict.UNKNOWN)

    def forwarded(self, keys: Iterable[FlowKey]) -> dict[FlowKey, str | None]:
        """For each key: the peer its packets go to, or None (local)."""
        return {key: self.decide(key).peer for key in keys}

    def set_live(self, peer: str, live: bool) -> set[FlowKey]:
        """Marks a peer live or dead; returns its keys (their answer may change)."""
        if (peer in self.live) == live:
            return set()
        if live:
            self.live.add(peer)
        else:
            self.live.discard(peer)
        return self.table(peer).owned()

    def desired(self) -> dict[FlowKey, str]:
        """The whole forwarding map: key -> owning peer (keys decided local are absent)."""
        keys = {key for name in self.live for key in self.table(name).owned()}
        return {key: peer for key, peer in self.forwarded(keys).items() if peer is not None}


def map_changes(
    installed: dict[FlowKey, int], wanted: dict[FlowKey, int | None]
) -> tuple[list[FlowKey], dict[FlowKey, int]]:
    """What to delete from and add to a map of key -> mark to reach `wanted` for these
    keys (None: absent). A changed mark is a delete plus an add."""
    deletes: list[FlowKey] = []
    adds: dict[FlowKey, int] = {}
    for key, mark in wanted.items():
        have = installed.get(key)
        if have == mark:
            continue
        if have is not None:
            deletes.append(key)
        if mark is not None:
            adds[key] = mark
    return deletes, adds
