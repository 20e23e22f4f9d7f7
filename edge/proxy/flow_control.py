"""Flow control both ways: a transport's reading is paused while any reason holds.

Reasons add up: a client connection may be paused because a pipelined request
waits its turn, because its body waits for a backend connection, and because
the backend reads slower than the client sends, all at once; it resumes only
when none holds any more. The peer's `pause_writing` / `resume_writing` (its
write buffer above / below the high-water mark) set and clear PEER_FULL.
"""

from __future__ import annotations

import asyncio

# Reasons (bits).
PIPELINE = 1  # an earlier request on this connection is still being answered
BACKLOG = 2  # bytes held for a peer that is not connected (yet)
PEER_FULL = 4  # the other side's write buffer is above its high-water mark


class ReadGate:
    __slots__ = ("_reasons", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._reasons = 0

    def pause(self, reason: int) -> None:
        if not self._reasons and self.transport is not None:
            self.transport.pause_reading()
        self._reasons |= reason

    def resume(self, reason: int) -> None:
        if not self._reasons & reason:
            return
        self._reasons &= ~reason
        if not self._reasons and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def paused_for(self, reason: int) -> bool:
        return bool(self._reasons & reason)

    @property
    def paused(self) -> bool:
        return bool(self._reasons)
