"""The driver around api/panic.py: asks it at every snapshot build, remembers the answer (for
/v1/status and /metrics) and records an event whenever a scope enters or leaves panic (the
start grace is routine: /v1/status shows it, the event log does not)."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

from api.panic import PanicDecision, ScopeView, Trust, decide, hold
from api.store.base import EventDraft, Store, StoreUnavailable
from contract.schemas import DesiredState, NodeObserved

log = logging.getLogger(__name__)


class FailOpen:
    def __init__(self, store: Store, threshold: float, heartbeat_ttl_s: float) -> None:
        self._store = store
        self._threshold = threshold
        self._ttl_s = heartbeat_ttl_s
        self._started = time.monotonic()
        self.decision = PanicDecision(())
        self._writes: set[asyncio.Task[None]] = set()

    def begin(self) -> None:
        """The API starts serving now: the one-TTL grace counts from here."""
        self._started = time.monotonic()

    def up_s(self) -> float:
        return time.monotonic() - self._started

    def starting(self) -> bool:
        """Up for less than one heartbeat TTL: nobody is declared dead yet."""
        return self.up_s() < self._ttl_s

    def weigh_from(
        self, desired: DesiredState, observed: dict[str, NodeObserved]
    ) -> dict[str, NodeObserved]:
        if self._threshold == 0 and not self.starting():
            return observed
        decision = decide(
            desired,
            observed,
            threshold=self._threshold,
            up_s=self.up_s(),
            heartbeat_ttl_s=self._ttl_s,
        )
        self._record(self.decision, decision)
        self.decision = decision
        return hold(desired, observed, decision)

    def _record(self, before: PanicDecision, after: PanicDecision) -> None:
        def keys(d: PanicDecision) -> dict[tuple[str, str], ScopeView]:
            return {(v.scope, v.trust): v for v in d.scopes if v.trust is Trust.PANIC}

        was, now = keys(before), keys(after)
        events = [
            EventDraft("fail-open", v.scope, v.describe(), "control-plane")
            for k, v in now.items()
            if k not in was
        ] + [
            EventDraft("fail-open-ended", v.scope, f"{v.trust} ended", "control-plane")
            for k, v in was.items()
            if k not in now
        ]
        if events:
            task = asyncio.get_running_loop().create_task(self._append(events))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def _append(self, events: list[EventDraft]) -> None:
        try:
            await self._store.append_events(events, datetime.now(UTC))
        except StoreUnavailable as exc:
            log.warning("fail-open events not recorded: %s", exc)
