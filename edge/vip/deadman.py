"""What the VIP guard (`edge.vip.guard`, a process of its own) does: a pure rule.

The guard holds what it takes to undo an ownership (the VIP on its interface, the etcd
lease behind the ownership key) while the agent owns it ("armed"). It fires when the agent's
beats stopped for `bound_s` (a frozen or stalled loop) or the agent's end of the pipe
closed (the agent died): it removes the VIP and revokes the lease at once, so a standby
can take the key without waiting for the lease to expire. Once fired it stays quiet until
the agent beats again (the agent then goes through the election again).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Verdict(enum.StrEnum):
    WAIT = "wait"  # the agent beats (or nothing is armed): nothing to do yet
    FIRE = "fire"  # undo the ownership now
    DONE = "done"  # fired already: wait for the agent to beat again


class Cause(enum.StrEnum):
    NONE = "none"
    SILENT = "silent"  # no beat for the bound
    AGENT_GONE = "agent_gone"  # the agent's end of the pipe closed


@dataclass(frozen=True, slots=True)
class GuardDecision:
    verdict: Verdict
    cause: Cause
    # Seconds until the guard must look again (None: only when something arrives).
    wake_in_s: float | None


def decide(
    now: float, last_beat: float, bound_s: float, *, armed: bool, fired: bool, agent_gone: bool
) -> GuardDecision:
    """`now`, `last_beat`: seconds of one monotonic clock."""
    if fired:
        return GuardDecision(Verdict.DONE, Cause.NONE, None)
    if agent_gone:
        return GuardDecision(Verdict.FIRE, Cause.AGENT_GONE, None)
    silent = now - last_beat
    if silent >= bound_s:
        return GuardDecision(Verdict.FIRE if armed else Verdict.DONE, Cause.SILENT, None)
    return GuardDecision(Verdict.WAIT, Cause.NONE, bound_s - silent)
