"""Flap budget: a flapping node must not make the routers churn.

Pure: the caller passes the clock. The budget damps flaps of reachability, nothing else:

* Changes that take traffic away (withdraws, starting a drain) always pass at once:
  damping them would keep sending traffic to a node that said it cannot take it. They
  count, so that a node going away and back repeatedly is seen flapping.
* Changes that bring a prefix back (an announce, leaving a drain) spend the budget: at
  most N a minute, beyond that an exponential hold-down.
* Changes of attributes only (the link bandwidth the GSLB's share sets, the reduced
  bandwidth of a DEGRADED node, a MED) on prefixes that stay as reachable as they were
  are no flap: they pass at once and do not count. Each has its own owner that damps it
  (the GSLB computes shares from leased heartbeats; the node's health has its rise/fall
  dampener), and holding one here would keep routers splitting traffic by a share the
  operator already changed.
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
    # Brings a prefix back: announced again, or GRACEFUL_SHUTDOWN removed. Damped.
    ADVANCE = "advance"
    # The same prefixes, each as reachable as before (GRACEFUL_SHUTDOWN neither added nor
    # removed); only attributes such as the link bandwidth differ. Never delayed, not
    # counted.
    RESHAPE = "reshape"


def classify_change(current: Set[Advertisement], desired: Set[Advertisement]) -> ChangeKind:
    """The strongest kind among the per-prefix changes: ADVANCE over RETREAT over RESHAPE."""
    if current == desired:
        return ChangeKind.NONE
    current_by_prefix = {adv.prefix: adv for adv in current}
    desired_prefixes = {adv.prefix for adv in desired}
    retreat = not current_by_prefix.keys() <= desired_prefixes  # something withdrawn
    for adv in desired:
        before = current_by_prefix.get(adv.prefix)
        if before is None:
            return ChangeKind.ADVANCE
        draining_now = GRACEFUL_SHUTDOWN in adv.communities
        draining_before = GRACEFUL_SHUTDOWN in before.communities
        if draining_before and not draining_now:
            return ChangeKind.ADVANCE
        retreat = retreat or (draining_now and not draining_before)
    return ChangeKind.RETREAT if retreat else ChangeKind.RESHAPE


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
        if kind in (ChangeKind.NONE, ChangeKind.RESHAPE):
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
