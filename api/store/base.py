"""The store interface: desired state (revisioned, compare-and-swap), observed state (heartbeats
under a TTL or lease), the event log, and change notification for long-polls.

Two implementations: `api.store.sqlite` (one process, embedded) and `api.store.etcd` (several
API instances against one etcd cluster). The same integration suite runs against both.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from contract.schemas import DesiredState, DrainPhase, Event, Heartbeat, NodeObserved


class StoreUnavailable(Exception):
    """The store could not be reached or did not answer in time (the API answers 503)."""


class RevisionConflict(Exception):
    """Someone else wrote first: the expected revision is not the current one."""

    def __init__(self, current: DesiredState) -> None:
        super().__init__(f"revision mismatch (current {current.revision})")
        self.current = current


@dataclass(frozen=True, slots=True)
class EventDraft:
    """An event before the store gives it an id and a time."""

    kind: str
    subject: str
    cause: str
    author: str


@dataclass(frozen=True, slots=True)
class ObservedRecord:
    """What the store keeps per node between heartbeats (serialised as JSON in both stores)."""

    heartbeat: Heartbeat
    last_seen: datetime
    dead_reported: bool = False


def heartbeat_events(
    node: str, previous: ObservedRecord | None, heartbeat: Heartbeat, author: str
) -> list[EventDraft]:
    """Observed transitions worth an event, each with its cause as the node reported it:
    first contact, revival, state changes, BGP reason changes, and what the node's BGP
    side did on its own (flap hold-downs, dead-man firings; cumulative counters, so an
    increase is seen even across lost heartbeats)."""
    cause = _cause(heartbeat)
    if previous is None:
        return [EventDraft("node-alive", node, f"first heartbeat, state {cause}", author)]
    if previous.dead_reported:
        return [EventDraft("node-alive", node, f"heartbeats resumed, state {cause}", author)]
    events: list[EventDraft] = []
    before = previous.heartbeat
    if before.state != heartbeat.state:
        events.append(EventDraft("node-state", node, f"{before.state} -> {cause}", author))
    old_phase = before.drain.phase if before.drain else DrainPhase.NONE
    if heartbeat.drain is not None and heartbeat.drain.phase is not old_phase:
        drain = heartbeat.drain
        events.append(
            EventDraft(
                "node-drain",
                node,
                f"drain {old_phase} -> {drain.phase} ({drain.source}: {drain.reason})",
                author,
            )
        )
    elif heartbeat.drain is None and old_phase is not DrainPhase.NONE:
        events.append(EventDraft("node-drain", node, f"drain {old_phase} -> ended", author))
    old_bgp, new_bgp = before.bgp, heartbeat.bgp
    if new_bgp is not None:
        # A changed reason with a changed state is already in the state event.
        if (
            old_bgp is not None
            and new_bgp.reason
            and old_bgp.reason != new_bgp.reason
            and before.state == heartbeat.state
        ):
            events.append(EventDraft("node-bgp", node, f"BGP {new_bgp.reason}", author))
        held = _increase(old_bgp.flap_holddowns if old_bgp else 0, new_bgp.flap_holddowns)
        if held:
            events.append(
                EventDraft(
                    "bgp-flap-holddown",
                    node,
                    f"{held} announcement change(s) held back by the flap budget "
                    f"({new_bgp.flap_holddowns} since the agent started)",
                    author,
                )
            )
        fired = _increase(old_bgp.deadman_firings if old_bgp else 0, new_bgp.deadman_firings)
        if fired:
            events.append(
                EventDraft(
                    "bgp-deadman",
                    node,
                    f"the dead-man switch withdrew every route {fired} time(s): the agent's "
                    f"event loop stopped beating ({new_bgp.deadman_firings} since it started)",
                    author,
                )
            )
    return events


def _cause(heartbeat: Heartbeat) -> str:
    text = str(heartbeat.state)
    if heartbeat.health.detail:
        text += f": {heartbeat.health.detail}"
    if heartbeat.bgp is not None and heartbeat.bgp.reason:
        text += f"; BGP {heartbeat.bgp.reason}"
    return text


def _increase(before: int, after: int) -> int:
    # A counter below the last one: the agent restarted and counts from 0 again.
    return after - before if after >= before else after


def dead_event(node: str, record: ObservedRecord, ttl_s: float) -> EventDraft:
    return EventDraft(
        "node-dead",
        node,
        f"no heartbeat for {ttl_s:g} s (lease expired), last seen {record.last_seen.isoformat()}",
        "control-plane",
    )


class ChangeNotifier:
    """A counter that long-polls wait on; bumped whenever a published view may have changed.

    Waiters re-read the store when woken, so a spurious wake-up costs one read, never a wrong
    answer; a missed one costs at most the long-poll timeout.
    """

    def __init__(self) -> None:
        self._generation = 0
        self._changed = asyncio.Event()

    @property
    def generation(self) -> int:
        return self._generation

    def notify(self) -> None:
        self._generation += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, after_generation: int, timeout_s: float) -> int:
        if self._generation == after_generation:
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout_s)
        return self._generation


class Store(abc.ABC):
    """What the API needs from a store. All methods raise StoreUnavailable on I/O failure."""

    def __init__(self) -> None:
        self.changes = ChangeNotifier()

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open connections and start background tasks (watches)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Stop background tasks and close connections."""

    @abc.abstractmethod
    async def read_desired(self) -> DesiredState: ...

    @abc.abstractmethod
    async def write_desired(
        self, expected_revision: int, new: DesiredState, events: Sequence[EventDraft]
    ) -> DesiredState:
        """Store `new` if the current revision is `expected_revision`, with its events, atomically.

        Returns the stored state with its new revision. Raises RevisionConflict with the
        current state otherwise, except when the current state was produced by this very
        write (same `write_id`): a retry whose first attempt committed is a success.
        """

    @abc.abstractmethod
    async def record_heartbeat(
        self, node: str, heartbeat: Heartbeat, now: datetime, ttl_s: float, author: str
    ) -> None:
        """Store the node's latest heartbeat under a TTL/lease, with transition events."""

    @abc.abstractmethod
    async def read_observed(self, now: datetime) -> dict[str, NodeObserved]: ...

    async def read_state(self, now: datetime) -> tuple[DesiredState, dict[str, NodeObserved]]:
        """The desired state and every node's observed state, for a snapshot or a write's
        checks. A store that can read both at one revision in one round trip does (etcd)."""
        return await self.read_desired(), await self.read_observed(now)

    @abc.abstractmethod
    async def sweep_dead(self, now: datetime, ttl_s: float) -> list[str]:
        """Report every node whose lease expired as dead, once (an event each). Safe to run
        concurrently from several API instances."""

    @abc.abstractmethod
    async def append_events(self, events: Sequence[EventDraft], now: datetime) -> None:
        """Record events that belong to no write (the control plane's own decisions)."""

    @abc.abstractmethod
    async def list_events(self, limit: int, after: str | None) -> list[Event]:
        """The last `limit` events (oldest first), or the first `limit` after the id `after`."""
