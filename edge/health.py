"""Backend health: a rise/fall dampener per backend. Pure, no I/O.

Active checks move a backend up after `rise` consecutive successes and down
after `fall` consecutive failures, so one lost probe does not flap it.
Passive evidence (a refused connect, a reset, a 5xx from real traffic) ejects
a backend at once: real requests are worth more than probes, and waiting for
`fall` probes would fail requests meanwhile. Only active checks bring an
ejected backend back.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class BackendHealth(enum.StrEnum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class HealthChange:
    backend: str
    old: BackendHealth
    new: BackendHealth
    cause: str


@dataclass(slots=True)
class RiseFall:
    """Consecutive-result counter with hysteresis for one backend."""

    backend: str
    rise: int
    fall: int
    health: BackendHealth = BackendHealth.UNKNOWN
    successes: int = 0
    failures: int = 0
    last_detail: str = ""

    def check_passed(self, detail: str = "") -> HealthChange | None:
        self.successes += 1
        self.failures = 0
        self.last_detail = detail
        # A backend with no verdict yet comes up after `rise` like any other:
        # fail closed, traffic goes only where health has risen.
        if self.health is not BackendHealth.UP and self.successes >= self.rise:
            return self._set(BackendHealth.UP, f"passed {self.successes} checks")
        return None

    def check_failed(self, detail: str) -> HealthChange | None:
        self.failures += 1
        self.successes = 0
        self.last_detail = detail
        if self.health is BackendHealth.UNKNOWN:
            # First verdict: one failure is enough to say it is not up yet.
            return self._set(BackendHealth.DOWN, f"failed its first check: {detail}")
        if self.health is BackendHealth.UP and self.failures >= self.fall:
            return self._set(BackendHealth.DOWN, f"failed {self.failures} checks: {detail}")
        return None

    def passive_failure(self, detail: str) -> HealthChange | None:
        self.successes = 0
        self.last_detail = detail
        if self.health is BackendHealth.UP:
            return self._set(BackendHealth.DOWN, f"ejected by live traffic: {detail}")
        return None

    def _set(self, new: BackendHealth, cause: str) -> HealthChange:
        change = HealthChange(self.backend, self.health, new, f"backend {self.backend} {cause}")
        self.health = new
        return change
