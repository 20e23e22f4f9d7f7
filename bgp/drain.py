"""Drain choreography: move new flows away first, withdraw when they have moved.

Parameterised by callables so `bgp` needs nothing of the agent:
- `announce_draining()`: publish the draining announcement (GRACEFUL_SHUTDOWN + prepends);
  returns once it was sent (e.g. `driver.set_desired(...)` then `await driver.wait_sent()`).
- `new_connections_total()`: the node's monotonic counter of accepted connections.
- `withdraw()`: withdraw and return once sent.
The caller then lets its proxy finish the open connections.

Quiet means: the new-connection rate stayed below `quiet_rate_per_s` over a whole
`quiet_window_s`. Not a fixed sleep; `deadline_s` bounds the wait either way.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


class DrainOutcome(enum.StrEnum):
    TRAFFIC_MOVED = "traffic moved"
    DEADLINE = "deadline reached before traffic moved"


@dataclass(frozen=True, slots=True)
class DrainReport:
    outcome: DrainOutcome
    waited_s: float
    last_rate_per_s: float


class QuietDetector:
    """Pure: fed (time, counter) samples, says when the rate over the window is low."""

    def __init__(self, quiet_rate_per_s: float, quiet_window_s: float) -> None:
        self.quiet_rate_per_s = quiet_rate_per_s
        self.quiet_window_s = quiet_window_s
        self._samples: deque[tuple[float, int]] = deque()
        self.last_rate_per_s = float("inf")

    def add(self, now: float, total: int) -> bool:
        self._samples.append((now, total))
        # Keep exactly one sample at or before the window's start.
        while len(self._samples) >= 2 and self._samples[1][0] <= now - self.quiet_window_s:
            self._samples.popleft()
        first_time, first_total = self._samples[0]
        span = now - first_time
        if span < self.quiet_window_s:
            return False
        self.last_rate_per_s = (total - first_total) / span
        return self.last_rate_per_s < self.quiet_rate_per_s


async def drain(
    announce_draining: Callable[[], Awaitable[None]],
    new_connections_total: Callable[[], int],
    withdraw: Callable[[], Awaitable[None]],
    *,
    quiet_rate_per_s: float,
    quiet_window_s: float,
    deadline_s: float,
    poll_interval_s: float = 0.1,
) -> DrainReport:
    started = time.monotonic()
    await announce_draining()
    detector = QuietDetector(quiet_rate_per_s, quiet_window_s)
    outcome = DrainOutcome.DEADLINE
    while time.monotonic() - started < deadline_s:
        if detector.add(time.monotonic(), new_connections_total()):
            outcome = DrainOutcome.TRAFFIC_MOVED
            break
        await asyncio.sleep(poll_interval_s)
    await withdraw()
    return DrainReport(outcome, time.monotonic() - started, detector.last_rate_per_s)


async def undrain(
    is_healthy: Callable[[], bool],
    announce: Callable[[], Awaitable[None]],
    *,
    deadline_s: float,
    poll_interval_s: float = 0.1,
) -> bool:
    """The reverse: announce again, but only once the node is healthy. False (nothing
    announced) when health did not come within the deadline."""
    started = time.monotonic()
    while not is_healthy():
        if time.monotonic() - started >= deadline_s:
            return False
        await asyncio.sleep(poll_interval_s)
    await announce()
    return True


__all__ = ["DrainOutcome", "DrainReport", "QuietDetector", "drain", "undrain"]
