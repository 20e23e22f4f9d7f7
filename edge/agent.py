"""The edge node agent: wires config, pool, health, state machine, listeners and admin.

Drain order (what makes a planned drain fail no request): announce that the
node is leaving and let the routers move new flows away first (`accept_grace`,
or the BGP choreography through `before_stop_accepting`), then stop accepting,
then let open connections finish up to the deadline, then close what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from edge.admin import AdminServer
from edge.checks import HealthChecker
from edge.config import ActiveCheckConfig, ConfigError, ListenerConfig, ListenerKind, NodeConfig
from edge.config import load_config as load_config_file
from edge.flows import FlowTable
from edge.health import BackendHealth, HealthChange
from edge.pool import Backend, Pool
from edge.proxy.common import DeadlineSweeper, ProxyContext, listening_socket
from edge.proxy.l4 import L4ClientProtocol
from edge.proxy.l7 import L7ClientProtocol
from edge.state import NodeState, NodeStateMachine, Observation, Thresholds, Transition

log = logging.getLogger("edge.agent")

# How long an idle keep-alive client connection may stay once draining stopped accepting.
DRAIN_IDLE_GRACE = 1.0

StateListener = Callable[[Transition], None]


class Agent:
    def __init__(self, config: NodeConfig, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.pool = Pool.from_config(
            config.backends,
            config.pool.algorithm,
            config.health.active.rise,
            config.health.active.fall,
            config.pool.maglev_table_size,
        )
        self.flows = FlowTable()
        self.sweeper = DeadlineSweeper()
        self.ctx = ProxyContext(config, self.pool, self.flows, self.sweeper, self._passive_failure)
        self.machine = NodeStateMachine(
            Thresholds(config.state.degraded_below, config.state.down_below)
        )
        self.events: deque[dict[str, Any]] = deque(maxlen=200)
        self.transitions_total = 0
        self.state_since = time.time()
        self.state_listeners: list[StateListener] = []
        # Set by the BGP side: returns once the routers have moved traffic away.
        self.before_stop_accepting: Callable[[str], Awaitable[None]] | None = None
        # Extra sections of /status, e.g. "bgp" from the BGP bridge.
        self.status_extras: dict[str, Callable[[], Any]] = {}
        # Named checks that can hold an otherwise healthy node at degraded (reason or None).
        self.degradations: dict[str, Callable[[], str | None]] = {}
        self._tick_task: asyncio.Task[None] | None = None
        self._servers: dict[str, tuple[ListenerConfig, asyncio.Server]] = {}
        self._checker = HealthChecker(self._check_result)
        self._admin: AdminServer | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._exit_after_drain = False
        self._stopped = asyncio.Event()
        self._started_at = time.time()
        self._reloaded_at: float | None = None

    @property
    def state(self) -> NodeState:
        return self.machine.state

    # -- life cycle ------------------------------------------------------------
    async def start(self) -> None:
        """Bind listeners and admin, start checks. Raises OSError with a clear message."""
        self.sweeper.start()
        try:
            await self._open_listeners()
            self._admin = AdminServer(self, self.config.admin.address, self.config.admin.port)
            await self._admin.start()
        except OSError:
            await self._close_listeners()
            await self.sweeper.stop()
            raise
        self._checker.set_targets(self._check_targets())
        self._event("agent", "started", listeners=[cfg.name for cfg in self.config.listeners])
        self.evaluate()
        self._tick_task = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        """Re-evaluate once a second: listener self-checks and degradations change unseen."""
        while True:
            await asyncio.sleep(1.0)
            try:
                for change in self.pool.expire_ejections(time.monotonic()):
                    self._health_changed(self.pool.backends[change.backend], change)
                self.evaluate()
            except Exception:
                log.exception("state evaluation failed")

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_sigterm)
        loop.add_signal_handler(signal.SIGINT, self._on_sigint)
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    def _on_sigterm(self) -> None:
        if self._drain_task is not None and not self._drain_task.done():
            if self._exit_after_drain:
                log.warning("second SIGTERM: stopping now")
                self._stopped.set()
            self._exit_after_drain = True
            return
        self.start_drain("SIGTERM", exit_when_done=True)

    def _on_sigint(self) -> None:
        log.warning("SIGINT: stopping now, without a drain")
        self._stopped.set()

    async def run_until_stopped(self) -> None:
        await self._stopped.wait()
        await self.stop()

    async def stop(self) -> None:
        if self._tick_task is not None:
            self._tick_task.cancel()
        if self._drain_task is not None and not self._drain_task.done():
            self._drain_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain_task
        await self._close_listeners()
        for conns in self.ctx.connections.values():
            for conn in list(conns):
                conn.abort()
        await self._checker.stop()
        await self.sweeper.stop()
        if self._admin is not None:
            await self._admin.stop()
        self._stopped.set()

    # -- listeners ---------------------------------------------------------------
    async def _open_listeners(self) -> None:
        loop = asyncio.get_running_loop()
        for cfg in self.config.listeners:
            if cfg.name in self._servers:
                continue
            try:
                sock = listening_socket(cfg.address, cfg.port, cfg.backlog)
            except OSError as error:
                raise OSError(
                    f"listeners.{cfg.name}: cannot listen on {cfg.address}:{cfg.port}: "
                    f"{error.strerror}"
                ) from None
            server = await loop.create_server(
                self._protocol_factory(cfg), sock=sock, backlog=cfg.backlog
            )
            self._servers[cfg.name] = (cfg, server)

    def _protocol_factory(self, cfg: ListenerConfig) -> Callable[[], asyncio.BaseProtocol]:
        ctx, name = self.ctx, cfg.name
        if cfg.kind is ListenerKind.TCP:
            return lambda: L4ClientProtocol(ctx, name)
        return lambda: L7ClientProtocol(ctx, name)

    async def _close_listeners(self, names: list[str] | None = None) -> None:
        for name in list(self._servers) if names is None else names:
            _, server = self._servers.pop(name)
            server.close()

    def _listeners_ok(self) -> tuple[bool, str]:
        problems = []
        for cfg in self.config.listeners:
            entry = self._servers.get(cfg.name)
            if entry is None or not entry[1].is_serving():
                problems.append(f"{cfg.name} ({cfg.address}:{cfg.port}) is not serving")
        return not problems, "; ".join(problems)

    # -- health --------------------------------------------------------------------
    def _check_targets(self) -> dict[str, tuple[str, int, ActiveCheckConfig]]:
        active = self.config.health.active
        return {b.name: (b.address, b.port, active) for b in self.config.backends}

    def _check_result(self, name: str, passed: bool, detail: str) -> None:
        backend = self.pool.backends.get(name)
        if backend is None or backend.retired:
            return
        rise_fall = backend.rise_fall
        change = rise_fall.check_passed(detail) if passed else rise_fall.check_failed(detail)
        self._health_changed(backend, change)
        if self.state is NodeState.STARTING:
            self.evaluate()

    def _passive_failure(self, backend: Backend, detail: str) -> None:
        """A failed request that is evidence against `backend`: the pool's outlier rule
        ejects it only on sustained evidence, and never the last healthy ones."""
        if not self.config.health.passive.enabled:
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
        log.log(level, "%s", change.cause)
        self._event("backend", change.cause, backend=change.backend, health=change.new)
        self.evaluate()

    def evaluate(self) -> None:
        total, healthy, settled = self.pool.counts()
        ok, detail = self._listeners_ok()
        if self._drain_task is not None:
            ok, detail = True, ""  # listeners closed on purpose by the drain
        degraded_by = tuple(r for check in self.degradations.values() if (r := check()))
        observation = Observation(total, healthy, settled, ok, detail, degraded_by)
        self._transitioned(self.machine.observe(observation))

    def _transitioned(self, transition: Transition | None) -> None:
        if transition is None:
            return
        self.transitions_total += 1
        self.state_since = time.time()
        log.info("state %s -> %s: %s", transition.old, transition.new, transition.cause)
        self._event("state", transition.cause, old=str(transition.old), new=str(transition.new))
        for listener in list(self.state_listeners):
            try:
                listener(transition)
            except Exception:
                log.exception("state listener failed")

    def _event(self, kind: str, cause: str, **details: Any) -> None:
        self.events.append({"time": time.time(), "kind": kind, "cause": cause, **details})

    # -- drain -------------------------------------------------------------------
    def start_drain(self, reason: str, exit_when_done: bool) -> None:
        self._exit_after_drain = self._exit_after_drain or exit_when_done
        if self._drain_task is not None and not self._drain_task.done():
            return
        self._drain_task = asyncio.get_running_loop().create_task(self._drain(reason))

    async def _drain(self, reason: str) -> None:
        loop = asyncio.get_running_loop()
        self._transitioned(self.machine.request_drain(reason))
        self.ctx.draining = True
        self._event("drain", f"drain started: {reason}")
        if self.before_stop_accepting is not None:
            await self.before_stop_accepting(reason)
        elif self.config.drain.accept_grace:
            await asyncio.sleep(self.config.drain.accept_grace)
        await self._close_listeners()
        self._event("drain", "stopped accepting new connections")
        deadline = loop.time() + self.config.drain.deadline
        for conns in self.ctx.connections.values():
            for conn in list(conns):
                conn.close_when_idle(DRAIN_IDLE_GRACE)
        while self.ctx.open_connections() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        left = self.ctx.open_connections()
        for conns in self.ctx.connections.values():
            for conn in list(conns):
                conn.abort()
        self._event("drain", f"drain complete, {left} connections closed at the deadline")
        self._transitioned(self.machine.mark_drained())
        if self._exit_after_drain:
            self._stopped.set()

    async def undrain(self, reason: str) -> None:
        if self._drain_task is not None:
            self._drain_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain_task
            self._drain_task = None
        self._exit_after_drain = False
        self.ctx.draining = False
        await self._open_listeners()
        self._event("drain", f"undrained: {reason}")
        self._transitioned(self.machine.cancel_drain(reason))
        self.evaluate()

    # -- reload ------------------------------------------------------------------
    def reload(self) -> bool:
        """SIGHUP: apply the config file again without dropping connections."""
        if self.config_path is None:
            return False
        try:
            new = load_config_file(self.config_path)
        except ConfigError as error:
            log.error("reload rejected, keeping the running config: %s", error)
            self._event("reload", f"rejected: {error}")
            return False
        asyncio.get_running_loop().create_task(self.apply_config(new))
        return True

    async def apply_config(self, new: NodeConfig) -> None:
        old = self.config
        if new.admin != old.admin:
            log.warning("admin endpoint changes take effect at the next restart")
        if new.bgp != old.bgp:
            log.warning("bgp changes take effect at the next restart")
        self.config = new
        self.ctx.update_config(new)
        self.pool.reconfigure(
            new.backends,
            new.pool.algorithm,
            new.health.active.rise,
            new.health.active.fall,
            new.pool.maglev_table_size,
        )
        self.machine.thresholds = Thresholds(new.state.degraded_below, new.state.down_below)
        self._checker.set_targets(self._check_targets())
        wanted = {cfg.name: cfg for cfg in new.listeners}
        changed = [name for name, (cfg, _) in self._servers.items() if wanted.get(name) != cfg]
        await self._close_listeners(changed)
        if self._drain_task is None:
            await self._open_listeners()
        self._reloaded_at = time.time()
        self._event("reload", "configuration reloaded")
        self.evaluate()

    # -- views ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        per_listener = {name: len(conns) for name, conns in self.ctx.connections.items()}
        serving = {name for name, (_, server) in self._servers.items() if server.is_serving()}
        return {
            "node": self.config.node.name,
            "site": self.config.node.site,
            "state": str(self.state),
            "state_since": self.state_since,
            "drain": {
                "requested": self.machine.drain_requested,
                "reason": self.machine.drain_reason,
                "complete": self.machine.drain_complete,
            },
            "listeners": [
                {
                    "name": cfg.name,
                    "kind": str(cfg.kind),
                    "address": f"{cfg.address}:{cfg.port}",
                    "serving": cfg.name in serving,
                    "connections": per_listener.get(cfg.name, 0),
                }
                for cfg in self.config.listeners
            ],
            "backends": [b.snapshot() for b in self.pool.active_backends],
            "flows": {
                "open": len(self.flows),
                "accepted_total": self.flows.accepted_total,
                "closed_total": self.flows.closed_total,
            },
            "events": list(self.events)[-20:],
            "uptime_s": round(time.time() - self._started_at, 3),
            "reloaded_at": self._reloaded_at,
            **{name: extra() for name, extra in self.status_extras.items()},
        }


async def run_agent(config: NodeConfig, config_path: Path | None) -> int:
    agent = Agent(config, config_path)
    try:
        await agent.start()
    except OSError as error:
        log.error("%s", error)
        return 1
    agent.install_signal_handlers()
    announcer = None
    if config.bgp is not None:
        from edge.announcer import BgpAnnouncer

        announcer = BgpAnnouncer(agent, config.bgp)
        await announcer.start()
    link = None
    if config.control_plane is not None:
        from edge.control import ControlPlaneLink

        link = ControlPlaneLink(agent, config.control_plane, announcer)
        await link.start()
    # Everything allocated so far lives as long as the process: keep it out of
    # the collector's full passes, which would otherwise walk it on the hot path.
    gc.freeze()
    log.info(
        "node %s (site %s) serving %s; admin on %s:%d",
        config.node.name,
        config.node.site,
        ", ".join(f"{c.kind}:{c.address}:{c.port}" for c in config.listeners),
        config.admin.address,
        config.admin.port,
    )
    await agent.run_until_stopped()
    if link is not None:
        await link.stop()
    if announcer is not None:
        await announcer.stop()
    return 0
