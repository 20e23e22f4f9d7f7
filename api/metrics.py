"""Prometheus metrics of the GSLB API (GET /metrics), one registry per app.

- requests by route template, method and status, with latency histograms (an ASGI
  middleware: the route is FastAPI's template, so cardinality is bounded);
- store calls by operation, with latency histograms and errors (the store's methods are
  wrapped once at app creation);
- long-polls open (watches), etcd watch streams open, heartbeats (rate() = per second),
  nodes by liveness and live nodes behind the current revision (from the last published
  snapshot, no store read at scrape time), disruption-budget refusals and, per site and for
  the fleet, the share of healthy capacity in service beside the budget's floor for it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.budget import FLEET, Budget, Tally, alive_states, tallies
from api.failopen import FailOpen
from api.store.base import Store, StoreUnavailable
from api.views import Snapshot, SnapshotCache, convergence_view
from contract.schemas import Liveness

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: Paths whose requests may park (long-polls); counted while in flight.
_LONG_POLL_PATHS = frozenset({"/v1/watch", "/v1/events"})
STORE_OPERATIONS = (
    "read_desired",
    "write_desired",
    "record_heartbeat",
    "read_observed",
    "read_state",
    "sweep_dead",
    "list_events",
)


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "gslb_api_requests", "Requests answered", ["route", "method", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "gslb_api_request_seconds",
            "Time to answer (long-polls included)",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.long_polls = Gauge(
            "gslb_api_long_polls_open", "Long-polls (watches) waiting", ["route"], registry=r
        )
        self.store_seconds = Histogram(
            "gslb_api_store_call_seconds",
            "Store call latency",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "gslb_api_store_call_errors", "Store calls that failed", ["operation"], registry=r
        )
        self.heartbeats = Counter("gslb_api_heartbeats", "Heartbeats recorded", registry=r)
        self.budget_refusals = Counter(
            "gslb_api_budget_refusals", "Writes refused by the disruption budget", registry=r
        )

    def watch_store(self, store: Store) -> None:
        """Time every store operation (and count its failures)."""
        for name in STORE_OPERATIONS:
            setattr(store, name, self._timed(name, getattr(store, name)))
        writes = getattr(store, "heartbeat_writes", None)
        if isinstance(writes, dict):  # etcd: how its write rule had each heartbeat written
            self.registry.register(_HeartbeatWritesCollector(writes))
        gateway = getattr(store, "gateway", None)
        if gateway is not None:  # etcd
            streams = Gauge(
                "gslb_api_etcd_watch_streams", "etcd watch streams open", registry=self.registry
            )
            streams.set_function(lambda: len(gateway.watching))
            failovers = Gauge(
                "gslb_api_etcd_silent_member_failovers",
                "Watch streams moved off a member that stopped answering",
                registry=self.registry,
            )
            failovers.set_function(lambda: gateway.silent_member_failovers)

    def watch_snapshots(self, snapshots: SnapshotCache, budget: Budget) -> None:
        self.registry.register(_SnapshotCollector(snapshots, budget))

    def watch_fail_open(self, fail_open: FailOpen) -> None:
        held = Gauge(
            "gslb_api_fail_open_scopes",
            "Sites (or the fleet) whose last weights are kept: API starting or panic threshold",
            registry=self.registry,
        )
        held.set_function(lambda: len(fail_open.decision.scopes))

    def _timed(
        self, name: str, call: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        seconds = self.store_seconds.labels(name)
        errors = self.store_errors.labels(name)
        heartbeat = name == "record_heartbeat"

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                result = await call(*args, **kwargs)
            except StoreUnavailable:
                errors.inc()
                raise
            finally:
                seconds.observe(time.perf_counter() - started)
            if heartbeat:
                self.heartbeats.inc()
            return result

        return timed


class _HeartbeatWritesCollector(Collector):
    """gslb_api_heartbeat_writes_total{how}: skip, behind (answered before its write) or
    through (answered after it), from the store's own tally (api/heartbeat_writes.py)."""

    def __init__(self, writes: dict[Any, int]) -> None:
        self._writes = writes

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "gslb_api_heartbeat_writes",
            "Heartbeats by how the etcd write rule wrote them",
            labels=["how"],
        )
        for how, count in self._writes.items():
            family.add_metric([str(getattr(how, "value", how))], count)
        yield family


class _SnapshotCollector(Collector):
    """Series computed from the last published snapshot at scrape time."""

    def __init__(self, snapshots: SnapshotCache, budget: Budget) -> None:
        self._snapshots = snapshots
        self._budget = budget

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snapshot = self._snapshots.latest
        yield self._liveness(snapshot)
        lagging = GaugeMetricFamily(
            "gslb_api_nodes_lagging",
            "Live nodes that have not applied the current desired revision",
        )
        behind = convergence_view(snapshot).lagging if snapshot is not None else []
        lagging.add_metric([], sum(1 for n in behind if n.liveness is Liveness.ALIVE))
        yield lagging
        yield from self._budget_shares(snapshot)

    def _liveness(self, snapshot: Snapshot | None) -> GaugeMetricFamily:
        family = GaugeMetricFamily(
            "gslb_api_nodes", "Nodes by liveness (last published view)", labels=["liveness"]
        )
        counts = dict.fromkeys(Liveness, 0)
        if snapshot is not None:
            for name in snapshot.desired.nodes:
                observed = snapshot.observed.get(name)
                counts[observed.liveness if observed else Liveness.UNKNOWN] += 1
        for liveness, count in counts.items():
            family.add_metric([str(liveness)], count)
        return family

    def _budget_shares(self, snapshot: Snapshot | None) -> Iterator[GaugeMetricFamily]:
        share = GaugeMetricFamily(
            "gslb_api_budget_in_service_share",
            "Capacity in service over healthy capacity (1 when nothing is healthy), as the "
            "disruption budget counts it",
            labels=["scope"],
        )
        floor = GaugeMetricFamily(
            "gslb_api_budget_min_share",
            "The disruption budget's floor for that share",
            labels=["scope"],
        )
        counted = (
            tallies(snapshot.desired, alive_states(snapshot.observed))
            if snapshot is not None
            else {FLEET: Tally()}
        )
        for scope, tally in sorted(counted.items()):
            limits = self._budget.fleet if scope == FLEET else self._budget.site
            value = tally.in_service_mbps / tally.healthy_mbps if tally.healthy_mbps else 1.0
            share.add_metric([scope], value)
            floor.add_metric([scope], limits.min_share)
        yield share
        yield floor


class RequestMetrics:
    """ASGI middleware: count and time every HTTP request by its route template."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        path = scope.get("path", "")
        gauge = None
        if path in _LONG_POLL_PATHS or path.endswith("/desired"):
            template = "/v1/nodes/{node}/desired" if path.endswith("/desired") else path
            gauge = self.metrics.long_polls.labels(template)
            gauge.inc()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            if gauge is not None:
                gauge.dec()
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(template, method, str(status)).inc()
            self.metrics.request_seconds.labels(template, method).observe(
                time.perf_counter() - started
            )
