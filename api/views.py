"""What the API publishes: a snapshot of desired + observed state and the views derived from it
(shares, each node's desired view, convergence). The derivations are pure; the
snapshot is cached per store change generation so a thousand long-polls woken by one change
share one store read and one share computation.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from api.gslb import (
    NodeDrain,
    NodeHealth,
    Shares,
    admin_state,
    drained_nodes,
    service_drained_nodes,
    service_health,
    service_shares,
    shares,
)
from api.store.base import Store
from contract.schemas import (
    NODE_CONTRACT_VERSION,
    Convergence,
    ConvergenceNode,
    DesiredState,
    EffectiveWeights,
    Liveness,
    NodeDesired,
    NodeObserved,
    ServiceDesired,
    ServiceShares,
)

log = logging.getLogger(__name__)

#: Even without a change notification, a snapshot older than this is rebuilt: the bound on
#: staleness if a notification is ever missed (e.g. an etcd watch that stalls silently).
SNAPSHOT_MAX_AGE_S = 1.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    desired: DesiredState
    observed: dict[str, NodeObserved]
    health: dict[str, NodeHealth]
    shares: Shares
    drained: dict[str, NodeDrain]
    generation: int
    built_at: float
    #: Per service of the GSLB: its shares, its drains, and the health its nodes report.
    service_shares: dict[str, Shares]
    service_drained: dict[str, dict[str, NodeDrain]]
    service_health: dict[str, dict[str, NodeHealth]]
    #: (node, contract version) -> its desired view, derived once per snapshot (a snapshot
    #: never changes, and a thousand heartbeats a second, or long-polls woken together, ask
    #: for the same views).
    views: dict[tuple[str, int], NodeDesired] = field(
        default_factory=dict, compare=False, repr=False
    )
    #: The same views as JSON (what the heartbeat fast path answers), rendered once each.
    rendered: dict[tuple[str, int], bytes] = field(default_factory=dict, compare=False, repr=False)


def build_snapshot(
    desired: DesiredState,
    observed: dict[str, NodeObserved],
    generation: int,
    built_at: float,
    weigh_from: dict[str, NodeObserved] | None = None,
    previous: Snapshot | None = None,
) -> Snapshot:
    """`weigh_from`: the observed view the weights are computed from, when it differs from
    what is shown (fail-open, api/panic.py).

    `previous`: the snapshot this one replaces. When the desired revision and every node's
    health are the same as its, so is everything derived from them (shares, drains, each
    node's view): those are carried over instead of derived again. Snapshots are rebuilt
    at least once a second whatever happens (SNAPSHOT_MAX_AGE_S), and with a thousand
    nodes deriving the views again each time cost more than the rest of the rebuild."""
    health = {
        name: NodeHealth(
            o.liveness,
            o.heartbeat.state if o.heartbeat else None,
            {s.name: s.state for s in o.heartbeat.services}
            if o.heartbeat and o.heartbeat.services
            else None,
        )
        for name, o in (observed if weigh_from is None else weigh_from).items()
    }
    if (
        previous is not None
        and previous.desired.revision == desired.revision
        and previous.desired == desired
        and previous.health == health
    ):
        return replace(
            previous, desired=desired, observed=observed, generation=generation, built_at=built_at
        )
    return Snapshot(
        desired=desired,
        observed=observed,
        health=health,
        shares=shares(desired, health),
        drained=drained_nodes(desired),
        generation=generation,
        built_at=built_at,
        service_shares={s: service_shares(desired, health, s) for s in desired.services},
        service_drained={s: service_drained_nodes(desired, s) for s in desired.services},
        service_health={s: service_health(health, s) for s in desired.services},
    )


def _service_desired(snapshot: Snapshot, node: str) -> dict[str, ServiceDesired]:
    result = {}
    for service, service_shares_ in snapshot.service_shares.items():
        drain = snapshot.service_drained[service].get(node)
        result[service] = ServiceDesired(
            admin_state=admin_state(drain, snapshot.service_health[service].get(node)),
            drain_source=drain.source if drain else None,
            drain_reason=drain.reason if drain else "",
            link_bandwidth_mbps=round(service_shares_.link_bandwidth_mbps.get(node, 0.0), 3),
        )
    return result


def node_view(
    snapshot: Snapshot, node: str, contract: int = NODE_CONTRACT_VERSION
) -> NodeDesired | None:
    """The node's desired view in the shape of its contract version (2: no per-service
    fields; `NodeDesired.service_desired`)."""
    view = snapshot.views.get((node, contract))
    if view is None:
        view = _derive_node_view(snapshot, node, contract)
        if view is not None:
            snapshot.views[(node, contract)] = view
    return view


def node_view_json(
    snapshot: Snapshot, node: str, contract: int = NODE_CONTRACT_VERSION
) -> bytes | None:
    """`node_view` as JSON, as FastAPI serialises it (`model_dump_json`), rendered once per
    view."""
    rendered = snapshot.rendered.get((node, contract))
    if rendered is None:
        view = node_view(snapshot, node, contract)
        if view is None:
            return None
        rendered = snapshot.rendered[(node, contract)] = view.model_dump_json().encode()
    return rendered


def _derive_node_view(snapshot: Snapshot, node: str, contract: int) -> NodeDesired | None:
    spec = snapshot.desired.nodes.get(node)
    if spec is None:
        return None
    drain = snapshot.drained.get(node)
    fields = {
        "contract_version": contract,
        "revision": snapshot.desired.revision,
        "node": node,
        "site": spec.site,
        "admin_state": admin_state(drain, snapshot.health.get(node)),
        "drain_source": drain.source if drain else None,
        "drain_reason": drain.reason if drain else "",
        "operator_weight": spec.weight,
        # Rounded so float noise never changes the fingerprint.
        "link_bandwidth_mbps": round(snapshot.shares.link_bandwidth_mbps.get(node, 0.0), 3),
        "services": snapshot.desired.services,
    }
    if contract >= 3:
        fields["service_desired"] = _service_desired(snapshot, node)
    canonical = NodeDesired.model_validate({**fields, "fingerprint": ""}).model_dump_json()
    fingerprint = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    return NodeDesired.model_validate({**fields, "fingerprint": fingerprint})


def weights_view(snapshot: Snapshot) -> EffectiveWeights:
    def rounded(values: dict[str, float]) -> dict[str, float]:
        return {name: round(value, 3) for name, value in values.items()}

    desired = snapshot.desired
    return EffectiveWeights(
        revision=desired.revision,
        nodes=rounded(snapshot.shares.nodes),
        sites=rounded(snapshot.shares.sites(desired)),
        services={
            service: ServiceShares(nodes=rounded(s.nodes), sites=rounded(s.sites(desired)))
            for service, s in snapshot.service_shares.items()
        },
    )


def observed_view(snapshot: Snapshot) -> list[NodeObserved]:
    names = sorted(set(snapshot.desired.nodes) | set(snapshot.observed))
    return [
        snapshot.observed.get(name) or NodeObserved(node=name, liveness=Liveness.UNKNOWN)
        for name in names
    ]


def convergence_view(snapshot: Snapshot) -> Convergence:
    """Which nodes have applied the latest desired revision. Only live nodes can block
    convergence: a dead node is listed as lagging but waiting for it would never end."""
    revision = snapshot.desired.revision
    applied: list[str] = []
    lagging: list[ConvergenceNode] = []
    blocking = False
    for name in sorted(snapshot.desired.nodes):
        observed = snapshot.observed.get(name)
        liveness = observed.liveness if observed else Liveness.UNKNOWN
        applied_revision = (
            observed.heartbeat.applied_revision if observed and observed.heartbeat else None
        )
        if applied_revision is not None and applied_revision >= revision:
            applied.append(name)
            continue
        lagging.append(
            ConvergenceNode(node=name, applied_revision=applied_revision, liveness=liveness)
        )
        blocking = blocking or liveness is Liveness.ALIVE
    return Convergence(revision=revision, converged=not blocking, applied=applied, lagging=lagging)


class SnapshotCache:
    """One snapshot per change generation, rebuilt lazily.

    Rebuilds are spaced by at least twice the last rebuild's duration: a burst of changes
    (a fleet of nodes sending their first heartbeat) then costs at most about a third of a
    core instead of one full rebuild per change, at the price of a few ms of latency.
    """

    def __init__(
        self,
        store: Store,
        weigh_from: Callable[[DesiredState, dict[str, NodeObserved]], dict[str, NodeObserved]]
        | None = None,
    ) -> None:
        self._store = store
        self._weigh_from = weigh_from
        self._snapshot: Snapshot | None = None
        self._lock = asyncio.Lock()
        self._last_build_s = 0.0
        self._last_started = 0.0  # when the reads of the newest snapshot began
        self._refresh: asyncio.Task[Snapshot] | None = None

    @property
    def latest(self) -> Snapshot | None:
        """The last snapshot built, whatever its age (for metrics; never triggers a read)."""
        return self._snapshot

    def _fresh(self, generation: int) -> Snapshot | None:
        snapshot = self._snapshot
        if (
            snapshot is not None
            and snapshot.generation == generation
            and time.monotonic() - snapshot.built_at < SNAPSHOT_MAX_AGE_S
        ):
            return snapshot
        return None

    def _usable(self, *, fresh: bool, allow_stale: bool) -> Snapshot | None:
        if fresh:
            return None
        snapshot = self._snapshot
        if allow_stale and snapshot is not None:
            age = time.monotonic() - snapshot.built_at
            if age < SNAPSHOT_MAX_AGE_S:
                # Early enough that the rebuild ends before the bound (it may take a while
                # with thousands of nodes), late enough to rebuild about once per bound.
                lead_s = min(SNAPSHOT_MAX_AGE_S / 2, 2 * self._last_build_s + 0.05)
                if age >= SNAPSHOT_MAX_AGE_S - lead_s:
                    self._refresh_soon()
                return snapshot
        return self._fresh(self._store.changes.generation)

    def _refresh_soon(self) -> None:
        """Rebuild in the background while the snapshot is still young enough to serve:
        heartbeats then never wait for a rebuild (at a thousand a second, the ones that
        arrived during each rebuild were the slowest)."""
        if self._refresh is not None or self._lock.locked():
            return
        self._refresh = asyncio.create_task(self.get(fresh=True), name="snapshot-refresh")
        self._refresh.add_done_callback(self._refreshed)

    def _refreshed(self, task: asyncio.Task[Snapshot]) -> None:
        self._refresh = None
        if not task.cancelled() and task.exception() is not None:
            # The store is unavailable: the next caller past the age bound reads and fails.
            log.debug("snapshot refresh failed: %s", task.exception())

    async def get(self, *, fresh: bool = False, allow_stale: bool = False) -> Snapshot:
        """The cached snapshot, or a new one if the store changed since (or `fresh`).

        `allow_stale`: any snapshot younger than SNAPSHOT_MAX_AGE_S will do (heartbeat
        answers: the long-poll, not the heartbeat, is what delivers changes promptly).
        """
        cached = self._usable(fresh=fresh, allow_stale=allow_stale)
        if cached is not None:
            return cached
        asked = time.monotonic()
        async with self._lock:
            # Another waiter may have rebuilt it while we queued for the lock; for `fresh`,
            # a snapshot whose reads began after we asked is fresh (a burst of such callers
            # shares one rebuild instead of queueing one each).
            cached = self._usable(fresh=fresh, allow_stale=allow_stale)
            if cached is not None:
                return cached
            if fresh and self._snapshot is not None and self._last_started >= asked:
                return self._snapshot
            latest = self._snapshot
            if latest is not None and not fresh:
                pause = latest.built_at + 2 * self._last_build_s - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
            generation = self._store.changes.generation
            started = self._last_started = time.monotonic()
            desired, observed = await self._store.read_state(datetime.now(UTC))
            weigh_from = self._weigh_from(desired, observed) if self._weigh_from else None
            self._snapshot = build_snapshot(
                desired, observed, generation, time.monotonic(), weigh_from, latest
            )
            self._last_build_s = self._snapshot.built_at - started
            return self._snapshot
