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


async def wait_quiet(
    new_connections_total: Callable[[], int],
    *,
    quiet_rate_per_s: float,
    quiet_window_s: float,
    deadline_s: float,
    started: float | None = None,
    poll_interval_s: float = 0.1,
) -> DrainReport:
    """Wait until the new-connection rate is quiet, or `deadline_s` after `started`
    (time.monotonic(); default now)."""
    started = time.monotonic() if started is None else started
    detector = QuietDetector(quiet_rate_per_s, quiet_window_s)
    outcome = DrainOutcome.DEADLINE
    while time.monotonic() - started < deadline_s:
        if detector.add(time.monotonic(), new_connections_total()):
            outcome = DrainOutcome.TRAFFIC_MOVED
            break
        await asyncio.sleep(poll_interval_s)
    return DrainReport(outcome, time.monotonic() - started, detector.last_rate_per_s)


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
    """The whole choreography in one call (benchmarks drive a bare driver with it; the agent
    runs the same steps from its drain phases)."""
    started = time.monotonic()
    await announce_draining()
    report = await wait_quiet(
        new_connections_total,
        quiet_rate_per_s=quiet_rate_per_s,
        quiet_window_s=quiet_window_s,
        deadline_s=deadline_s,
        started=started,
        poll_interval_s=poll_interval_s,
    )
    await withdraw()
    return DrainReport(report.outcome, time.monotonic() - started, report.last_rate_per_s)


__all__ = ["DrainOutcome", "DrainReport", "QuietDetector", "drain", "wait_quiet"]
