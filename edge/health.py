"""Backend health: a rise/fall dampener per backend. Pure, no I/O.

Active checks move a backend up after `rise` consecutive successes and down
after `fall` consecutive failures, so one lost probe does not flap it.

Passive evidence from live traffic is outlier ejection, as Envoy does it, and
no single request can trigger it: a backend is ejected after
`consecutive_failures` failed requests in a row (a failed connect, no first
byte in time, a malformed answer, a 502/503/504; one per request, whatever
its retries did), never when that would eject more than `max_ejected_share`
of the backends (so the last healthy ones always stay), for an ejection time
that doubles with each ejection up to a cap. Any good answer resets the count.
A backend that closes or resets a connection it had accepted fails that
request only: that is not evidence it is down.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class BackendHealth(enum.StrEnum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"
    EJECTED = "ejected"  # up by its active checks, out of rotation by live-traffic evidence


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

    def _set(self, new: BackendHealth, cause: str) -> HealthChange:
        change = HealthChange(self.backend, self.health, new, f"backend {self.backend} {cause}")
        self.health = new
        return change


class PassiveVerdict(enum.StrEnum):
    COUNTED = "counted"  # evidence noted, not (yet) enough
    EJECTED = "ejected"
    CAPPED = "capped"  # enough evidence, but the ejected share is at its maximum
    IGNORED = "ignored"  # not in rotation anyway


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    consecutive_failures: int = 5
    max_ejected_share: float = 0.5
    ejection_time: float = 10.0
    max_ejection_time: float = 300.0


@dataclass(slots=True)
class Outlier:
    """Live-traffic evidence against one backend."""

    consecutive: int = 0
    ejections: int = 0
    ejected_until: float = 0.0  # monotonic seconds; 0 when not ejected

    def failed(
        self, policy: OutlierPolicy, now: float, *, in_rotation: int, ejected: int
    ) -> PassiveVerdict:
        """One failed request. `in_rotation`: backends up by their active checks
        (ejected ones included); `ejected`: how many of them are ejected now."""
        if self.ejected_until:
            return PassiveVerdict.IGNORED
        self.consecutive += 1
        if self.consecutive < policy.consecutive_failures:
            return PassiveVerdict.COUNTED
        if ejected + 1 > int(in_rotation * policy.max_ejected_share):
            return PassiveVerdict.CAPPED
        duration = min(policy.ejection_time * 2**self.ejections, policy.max_ejection_time)
        self.ejections += 1
        self.consecutive = 0
        self.ejected_until = now + duration
        return PassiveVerdict.EJECTED

    def expired(self, now: float) -> bool:
        """The ejection time is over: back in rotation (if its checks still pass)."""
        if self.ejected_until and now >= self.ejected_until:
            self.ejected_until = 0.0
            return True
        return False
