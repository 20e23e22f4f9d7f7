"""One service of a node at run time: its listeners, pool, health checks and state machine.

The agent (`edge.agent`) holds one per service of node.yaml (today's single-service shape
is one implicit service) and owns what is node-wide: the flow table, the node's state
machine and drain, the extensions. A service's backends are its own: their health
changes only its state (`edge.services`), which decides only its prefixes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from contract.schemas import ServiceReport
from edge.checks import HealthChecker
from edge.config import ActiveCheckConfig, ListenerConfig, ListenerKind, NodeConfig, ServiceConfig
from edge.flows import FlowTable
from edge.health import BackendHealth, HealthChange
from edge.pool import Affinity, Backend, Pool
from edge.proxy.common import DeadlineSweeper, ProxyContext, listening_socket
from edge.proxy.l4 import L4ClientProtocol
from edge.proxy.l7 import L7ClientProtocol
from edge.services import ServiceStateMachine, ServiceTransition
from edge.state import Observation, Thresholds

log = logging.getLogger("edge.service")

# (kind, cause, details): the agent's event log.
EventSink = Callable[..., None]


class ServiceRuntime:
    def __init__(
        self,
        node: NodeConfig,
        service: ServiceConfig,
        flows: FlowTable,
        sweeper: DeadlineSweeper,
        is_draining: Callable[[], bool],
        on_health: Callable[[], None],
        event: EventSink,
        affinity: Affinity | None = None,
    ) -> None:
        self.service = service
        # the node's sticky table (the agent owns it), used while the pool says `sticky`
        self._affinity = affinity
        self.view = node.for_service(service)
        self._on_health = on_health
        self._event = event
        view = self.view
        self.pool = Pool.from_config(
            view.backends,
            view.pool.algorithm,
            view.health.active.rise,
            view.health.active.fall,
            view.pool.maglev_table_size,
        )
        self._use_affinity()
        self.ctx = ProxyContext(
            view,
            self.pool,
            flows,
            sweeper,
            self._passive_failure,
            is_draining=is_draining,
            vrf=service.vrf,
        )
        self.machine = ServiceStateMachine(
            service.name, Thresholds(view.state.degraded_below, view.state.down_below)
        )
        self.servers: dict[str, tuple[ListenerConfig, asyncio.Server]] = {}
        # Removed by a reload and draining (`retire`): its listeners close on purpose.
        self.retiring = False
        self._checker = HealthChecker(self._check_result, vrf=service.vrf)

    @property
    def name(self) -> str:
        return self.service.name

    def _use_affinity(self) -> None:
        self.pool.affinity = self._affinity if self.view.pool.sticky else None
        self.pool.affinity_scope = self.service.name

    # -- listeners ---------------------------------------------------------------------
    async def open_listeners(self) -> None:
        loop = asyncio.get_running_loop()
        for cfg in self.view.listeners:
            if cfg.name in self.servers:
                continue
            try:
                sock = listening_socket(cfg.address, cfg.port, cfg.backlog, self.service.vrf)
            except OSError as error:
                raise OSError(
                    f"listeners.{cfg.name}: cannot listen on {cfg.address}:{cfg.port}: "
                    f"{error.strerror}"
                ) from None
            server = await loop.create_server(
                self._protocol_factory(cfg), sock=sock, backlog=cfg.backlog
            )
            self.servers[cfg.name] = (cfg, server)

    def _protocol_factory(self, cfg: ListenerConfig) -> Callable[[], asyncio.BaseProtocol]:
        ctx, name = self.ctx, cfg.name
        if cfg.kind is ListenerKind.TCP:
            return lambda: L4ClientProtocol(ctx, name)
        return lambda: L7ClientProtocol(ctx, name)

    def close_listeners(self, names: list[str] | None = None) -> None:
        for name in list(self.servers) if names is None else names:
            _, server = self.servers.pop(name)
            server.close()

    def listeners_ok(self) -> tuple[bool, str]:
        problems = []
        for cfg in self.view.listeners:
            entry = self.servers.get(cfg.name)
            if entry is None or not entry[1].is_serving():
                problems.append(f"{cfg.name} ({cfg.address}:{cfg.port}) is not serving")
        return not problems, "; ".join(problems)

    # -- health ------------------------------------------------------------------------
    def start_checks(self) -> None:
        active: ActiveCheckConfig = self.view.health.active
        self._checker.set_targets({b.name: (b.address, b.port, active) for b in self.view.backends})

    async def stop_checks(self) -> None:
        await self._checker.stop()

    def observe(self, draining: bool) -> ServiceTransition | None:
        """Look at listeners and backends; the service's transition, if any. While the node
        drains, its listeners are closed on purpose."""
        total, healthy, settled = self.pool.counts()
        ok, detail = (True, "") if draining or self.retiring else self.listeners_ok()
        return self.machine.observe(Observation(total, healthy, settled, ok, detail))

    def expire_ejections(self, now: float) -> None:
        for change in self.pool.expire_ejections(now):
            self._health_changed(self.pool.backends[change.backend], change)

    def _check_result(self, name: str, passed: bool, detail: str) -> None:
        backend = self.pool.backends.get(name)
        if backend is None or backend.retired:
            return
        rise_fall = backend.rise_fall
        change = rise_fall.check_passed(detail) if passed else rise_fall.check_failed(detail)
        self._health_changed(backend, change)
        if change is None and not self.machine.state.serving:
            self._on_health()  # still rising: every first verdict counts

    def _passive_failure(self, backend: Backend, detail: str) -> None:
        """A failed request that is evidence against `backend`: the pool's outlier rule
        ejects it only on sustained evidence, and never the last healthy ones."""
        if not self.view.health.passive.enabled:
            return
        policy = self.ctx.outlier_policy
        self._health_changed(
            backend, self.pool.passive_failure(backend, detail, time.monotonic(), policy)
        )

    def _health_changed(self, backend: Backend, change: HealthChange | None) -> None:
        if change is None:
            return
        self.pool.refresh()
        if change.new is not BackendHealth.UP:
            self.ctx.idle_upstreams.close_backend(backend)
        level = logging.WARNING if change.new is not BackendHealth.UP else logging.INFO
        log.log(
            level,
            "%s: %s",
            self.name,
            change.cause,
            extra={
                "event": "backend",
                "service": self.name,
                "backend": change.backend,
                "health": str(change.new),
                "reason": change.cause,
            },
        )
        self._event(
            "backend", change.cause, service=self.name, backend=change.backend, health=change.new
        )
        self._on_health()

    # -- reload ------------------------------------------------------------------------
    def retire(self) -> None:
        """A reload removed this service: it drains (its responses say `Connection: close`,
        its listeners close when the agent says) and is then closed."""
        self.retiring = True
        self.ctx.is_draining = _always

    async def reconfigure(self, node: NodeConfig, service: ServiceConfig, accept: bool) -> None:
        self.service = service
        self.view = view = node.for_service(service)
        self.ctx.update_config(view)
        self.ctx.vrf = service.vrf
        self.pool.reconfigure(
            view.backends,
            view.pool.algorithm,
            view.health.active.rise,
            view.health.active.fall,
            view.pool.maglev_table_size,
        )
        self._use_affinity()
        self.machine.thresholds = Thresholds(view.state.degraded_below, view.state.down_below)
        self.start_checks()
        wanted = {cfg.name: cfg for cfg in view.listeners}
        self.close_listeners([n for n, (cfg, _) in self.servers.items() if wanted.get(n) != cfg])
        if accept:
            await self.open_listeners()

    # -- views -------------------------------------------------------------------------
    def report(self) -> ServiceReport:
        total, healthy, _ = self.pool.counts()
        return ServiceReport(
            name=self.name,
            state=self.machine.state,
            cause=self.machine.cause[:500],
            prefixes=[str(prefix) for prefix in self.service.prefixes],
            backends_total=total,
            backends_healthy=healthy,
        )

    def status(self) -> dict[str, Any]:
        per_listener = {name: len(conns) for name, conns in self.ctx.connections.items()}
        serving = {name for name, (_, server) in self.servers.items() if server.is_serving()}
        total, healthy, _ = self.pool.counts()
        return {
            "name": self.name,
            "state": str(self.machine.state),
            "cause": self.machine.cause,
            "prefixes": [str(prefix) for prefix in self.service.prefixes],
            "vrf": self.service.vrf,
            "removing": self.retiring,
            "backends_total": total,
            "backends_healthy": healthy,
            "listeners": [
                {
                    "name": cfg.name,
                    "kind": str(cfg.kind),
                    "address": _address_port(cfg.address, cfg.port),
                    "serving": cfg.name in serving,
                    "connections": per_listener.get(cfg.name, 0),
                }
                for cfg in self.view.listeners
            ],
            "backends": [b.snapshot() for b in self.pool.active_backends],
        }


def _always() -> bool:
    return True


def _address_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
