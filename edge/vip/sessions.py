"""The session table handed to the standby: sticky mappings (client key -> backend).

The active records what it decided; every heartbeat carries as much of the table as fits
in one datagram: recent changes first, then the next slice of the whole table (a cursor
that wraps around), so a standby that lost packets or started late converges anyway. An
empty backend is a tombstone (the key was forgotten). Only the active's table is applied,
so a standby's stale view never overwrites it. Pure: no I/O, no clock.

Established TCP connections do not move with the VIP (their sockets live on the failed
node); what moves is where the *next* connection of a sticky client goes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from edge.vip.heartbeat import MAX_SESSION_BYTES, Sessions, sessions_that_fit

MAX_ENTRIES = 65536


@dataclass(slots=True)
class SessionTable:
    max_entries: int = MAX_ENTRIES
    entries: OrderedDict[str, str] = field(default_factory=OrderedDict)
    pending: OrderedDict[str, str] = field(default_factory=OrderedDict)
    _cursor: list[str] = field(default_factory=list)

    def lookup(self, key: str) -> str | None:
        return self.entries.get(key)

    def record(self, key: str, backend: str) -> None:
        """A sticky decision made here (on the active)."""
        if self.entries.get(key) == backend:
            self.entries.move_to_end(key)  # in use: the last to be evicted
            return
        self._set(key, backend)
        self.pending[key] = backend
        self.pending.move_to_end(key)
        while len(self.pending) > self.max_entries:
            # nobody takes the changes (no group, or a long heartbeat outage): the oldest
            # go; the cursor's pass over the whole table still carries what is kept
            self.pending.popitem(last=False)

    def forget(self, key: str) -> None:
        if self.entries.pop(key, None) is not None:
            self.pending[key] = ""

    def _set(self, key: str, backend: str) -> None:
        self.entries[key] = backend
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)  # the oldest mapping goes first

    def apply(self, pairs: Sessions) -> None:
        """What the active sent (on the standby)."""
        for key, backend in pairs:
            if backend:
                self._set(key, backend)
            else:
                self.entries.pop(key, None)

    def next_delta(self, budget: int = MAX_SESSION_BYTES) -> Sessions:
        """Pending changes first, then the next slice of the whole table, within `budget`."""
        out = sessions_that_fit(tuple(self.pending.items()), budget)
        for key, _ in out:
            del self.pending[key]
        if self.pending:
            return out  # more changes than fit: they go first next time too
        if not self._cursor:
            self._cursor = list(reversed(self.entries))  # pop() from the end: oldest first
        while self._cursor:
            key = self._cursor[-1]
            if key not in self.entries or key in self.pending:
                self._cursor.pop()
                continue
            candidate = (*out, (key, self.entries[key]))
            if len(sessions_that_fit(candidate, budget)) < len(candidate):
                break
            out = candidate
            self._cursor.pop()
        return out
