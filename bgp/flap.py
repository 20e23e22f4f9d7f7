"""Flap budget: a flapping node must not make the routers churn.

Pure: the caller passes the clock. Changes that take traffic away (withdraws, starting a
drain) always pass at once: damping them would keep sending traffic to a node that said
it cannot take it. Only changes that attract traffic (announces, re-announces, attribute
changes) spend the budget: at most N a minute, beyond that an exponential hold-down.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Set
from dataclasses import dataclass, field

from bgp.config import FlapBudget
from bgp.policy import GRACEFUL_SHUTDOWN, Advertisement

WINDOW_S = 60.0


class ChangeKind(enum.StrEnum):
    NONE = "none"
    # Takes traffic away: prefixes withdrawn, or GRACEFUL_SHUTDOWN added. Never delayed.
    RETREAT = "retreat"
    # Attracts traffic or reshapes it: damped by the budget.
    ADVANCE = "advance"


def classify_change(current: Set[Advertisement], desired: Set[Advertisement]) -> ChangeKind:
    if current == desired:
        return ChangeKind.NONE
    current_by_prefix = {adv.prefix: adv for adv in current}
    for adv in desired:
        before = current_by_prefix.get(adv.prefix)
        if before is None:
            return ChangeKind.ADVANCE
        entering_drain = (
            GRACEFUL_SHUTDOWN in adv.communities and GRACEFUL_SHUTDOWN not in before.communities
        )
        if before != adv and not entering_drain:
            return ChangeKind.ADVANCE
    return ChangeKind.RETREAT


@dataclass
class FlapDamper:
    """Admits or delays changes. `admit` returns 0.0 when the change may go now (and counts
    it), else the seconds to wait before asking again."""

    budget: FlapBudget
    _recent: deque[float] = field(default_factory=deque)
    _hold_until: float = 0.0
    _backoff_s: float = 0.0
    _hold_pending: bool = False

    def _forget_old(self, now: float) -> None:
        while self._recent and self._recent[0] <= now - WINDOW_S:
            self._recent.popleft()
        # A full quiet minute after the last hold forgives the flapping.
        if not self._recent and now >= self._hold_until + WINDOW_S:
            self._backoff_s = 0.0
            self._hold_pending = False

    @property
    def backoff_s(self) -> float:
        return self._backoff_s

    def admit(self, kind: ChangeKind, now: float) -> float:
        if kind is ChangeKind.NONE:
            return 0.0
        self._forget_old(now)
        if kind is ChangeKind.RETREAT:
            self._recent.append(now)
            return 0.0
        if self._hold_pending:
            if now < self._hold_until:
                return self._hold_until - now
            # The hold-down was served: this one change is the reward.
            self._hold_pending = False
            self._recent.append(now)
            return 0.0
        if len(self._recent) < self.budget.max_changes_per_minute:
            self._recent.append(now)
            return 0.0
        self._backoff_s = (
            self.budget.initial_backoff_s
            if self._backoff_s == 0.0
            else min(self.budget.max_backoff_s, self._backoff_s * 2)
        )
        self._hold_until = now + self._backoff_s
        self._hold_pending = True
        return self._backoff_s


__all__ = ["WINDOW_S", "ChangeKind", "FlapDamper", "classify_change"]
