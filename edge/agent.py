"""The edge node agent: wires config, pool, health, state machine, listeners and admin.

It offers `edge.ports.NodeControl` to its extensions (BGP announcer, control-plane link,
...), which `run_agent`, the composition root, builds and passes in as a list.

Drain order (what makes a planned drain fail no request), each step a phase of the
state machine's drain: announce that the node is leaving and let the routers move new
flows away first (moving traffic: the extensions' `before_stop_accepting`, e.g. the BGP
choreography, or else `drain.accept_grace`), then stop accepting and let open
connections finish up to the deadline (closing connections), then close what is left
(done). A SIGTERM drain ends the process when it is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edge.admin import AdminServer
from edge.checks import HealthChecker
from edge.config import ActiveCheckConfig, ConfigError, ListenerConfig, ListenerKind, NodeConfig
from edge.config import load_config as load_config_file
from edge.flows import FlowTable
from edge.health import BackendHealth, HealthChange
from edge.pool import Backend, Pool
from edge.ports import AgentExtension, ExtensionSetupError, NodeReport
from edge.proxy.common import DeadlineSweeper, ProxyContext, listening_socket
from edge.proxy.l4 import L4ClientProtocol
from edge.proxy.l7 import L7ClientProtocol
from edge.sdnotify import SystemdNotifier
from edge.state import (
    Drain,
    DrainPhase,
    DrainSource,
    NodeState,
    NodeStateMachine,
    Observation,
    Thresholds,
    Transition,
)

log = logging.getLogger("edge.agent")

# How long an idle keep-alive client connection may stay once draining stopped accepting.
DRAIN_IDLE_GRACE = 1.0
#: What a stop needs beyond the drain's own deadlines: the extensions' stop (ExaBGP's
#: withdraw and exit, bfdd), the admin endpoint, the event loop's close. Generous on purpose.
STOP_MARGIN_S = 30.0


def sigterm_stop_bound_s(config: NodeConfig) -> float:
    """The longest a SIGTERM drain can take before the process exits: moving traffic (the
    BGP drain deadline, or `drain.accept_grace` without BGP), then the open connections'
    `drain.deadline`, then the stop margin. A service manager's stop timeout must exceed it
    (deploy/systemd/anycast-edge.service; `anycast-edge check-config` prints it)."""
    moving = config.bgp.drain_deadline_s if config.bgp is not None else config.drain.accept_grace
    return moving + config.drain.deadline + STOP_MARGIN_S


class Agent:
    def __init__(
        self,
        config: NodeConfig,
        config_path: Path | None = None,
        extensions: Sequence[AgentExtension] = (),
    ) -> None:
        self.config = config
        self.extensions = tuple(extensions)
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
        self.machine = NodeStateMachine(
            Thresholds(config.state.degraded_below, config.state.down_below)
        )
        self.ctx = ProxyContext(
            config,
            self.pool,
            self.flows,
            self.sweeper,
            self._passive_failure,
            is_draining=lambda: self.machine.drain.active,
        )
        self.events: deque[dict[str, Any]] = deque(maxlen=200)
        self.transitions_total = 0
        self.state_since = time.time()
        self._tick_task: asyncio.Task[None] | None = None
        self._servers: dict[str, tuple[ListenerConfig, asyncio.Server]] = {}
        self._checker = HealthChecker(self._check_result)
        self._admin: AdminServer | None = None
        # Only a handle to cancel the drain's steps: whether and how far the node drains is
        # the state machine's `drain`, nothing else.
        self._drain_steps: asyncio.Task[None] | None = None
        self._started_extensions: list[AgentExtension] = []
        self._stopped = asyncio.Event()
        self._started_at = time.time()
        self._reloaded_at: float | None = None

    # -- NodeControl --------------------------------------------------------------
    @property
    def state(self) -> NodeState:
        return self.machine.state

    @property
    def drain(self) -> Drain:
        return self.machine.drain

    def report(self) -> NodeReport:
        total, healthy, _ = self.pool.counts()
        return NodeReport(
            node=self.config.node.name,
            site=self.config.node.site,
            state=self.machine.state,
            cause=self.machine.cause,
            drain=self.machine.drain,
            backends_total=total,
            backends_healthy=healthy,
            open_connections=self.ctx.open_connections(),
            accepted_total=self.flows.accepted_total,
        )

    # -- life cycle ------------------------------------------------------------
    async def start(self) -> None:
        """Bind listeners and admin, start checks. Raises OSError with a clear message."""
        self.sweeper.start()
        try:
            await self._open_listeners()
            metrics = self.config.metrics
            self._admin = AdminServer(
                self,
                self.config.admin.address,
                self.config.admin.port,
                (metrics.address, metrics.port) if metrics is not None else None,
            )
            await self._admin.start()
        except OSError:
            await self._close_listeners()
            await self.sweeper.stop()
            raise
        self._checker.set_targets(self._check_targets())
        self._event("agent", "started", listeners=[cfg.name for cfg in self.config.listeners])
        self.evaluate()
        self._tick_task = asyncio.get_running_loop().create_task(self._tick())
        for extension in self.extensions:
            await extension.start(self)
            self._started_extensions.append(extension)
        # Extensions may hold the node at degraded (e.g. BFD lost): look again with them.
        self.evaluate()

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
        if self.machine.drain.source is DrainSource.SIGTERM:
            log.warning("second SIGTERM: stopping now")
            self._stopped.set()
            return
        self.request_drain(DrainSource.SIGTERM, "SIGTERM")

    def _on_sigint(self) -> None:
        log.warning("SIGINT: stopping now, without a drain")
        self._stopped.set()

    async def run_until_stopped(self) -> None:
        await self._stopped.wait()
        await self.stop()

    async def stop(self) -> None:
        if self._tick_task is not None:
            self._tick_task.cancel()
        await self._cancel_drain_steps()
        while self._started_extensions:
            extension = self._started_extensions.pop()
            try:
                await extension.stop()
            except Exception:
                log.exception("stopping extension %s failed", extension.name)
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
        log.log(
            level,
            "%s",
            change.cause,
            extra={
                "event": "backend",
                "backend": change.backend,
                "health": str(change.new),
                "reason": change.cause,
            },
        )
        self._event("backend", change.cause, backend=change.backend, health=change.new)
        self.evaluate()

    def evaluate(self) -> None:
        total, healthy, settled = self.pool.counts()
        ok, detail = self._listeners_ok()
        if self.machine.drain.active:
            ok, detail = True, ""  # listeners closed on purpose by the drain
        degraded_by = tuple(r for ext in self._started_extensions if (r := ext.degraded_reason()))
        observation = Observation(total, healthy, settled, ok, detail, degraded_by)
        self._transitioned(self.machine.observe(observation))

    def _transitioned(self, transition: Transition | None) -> None:
        if transition is None:
            return
        if transition.new is not transition.old:
            self.transitions_total += 1
            self.state_since = time.time()
        log.info(
            "state %s -> %s (drain %s): %s",
            transition.old,
            transition.new,
            transition.drain.phase,
            transition.cause,
            extra={
                "event": "state",
                "state": str(transition.new),
                "old_state": str(transition.old),
                "drain": str(transition.drain.phase),
                "reason": transition.cause,
            },
        )
        self._event(
            "state",
            transition.cause,
            old=str(transition.old),
            new=str(transition.new),
            drain=str(transition.drain.phase),
        )
        for extension in self._started_extensions:
            try:
                extension.on_transition(transition)
            except Exception:
                log.exception("extension %s failed on a transition", extension.name)

    def _event(self, kind: str, cause: str, **details: Any) -> None:
        self.events.append({"time": time.time(), "kind": kind, "cause": cause, **details})

    # -- drain -------------------------------------------------------------------
    def request_drain(self, source: DrainSource, reason: str) -> None:
        before = self.machine.drain
        self._transitioned(self.machine.request_drain(source, reason))
        drain = self.machine.drain
        if not before.active and drain.active:
            self._event("drain", f"drain started ({source}): {reason}")
            self._drain_steps = asyncio.get_running_loop().create_task(self._run_drain())
        elif drain.phase is DrainPhase.DONE and drain.source is DrainSource.SIGTERM:
            self._stopped.set()  # SIGTERM after a finished drain: nothing left to wait for

    async def _run_drain(self) -> None:
        loop = asyncio.get_running_loop()
        moved = False
        for extension in list(self._started_extensions):
            moved = await extension.before_stop_accepting() or moved
        if not moved and self.config.drain.accept_grace:
            await asyncio.sleep(self.config.drain.accept_grace)
        self._transitioned(self.machine.stop_accepting())
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
        if self.machine.drain.source is DrainSource.SIGTERM:
            self._stopped.set()

    async def _cancel_drain_steps(self) -> None:
        steps, self._drain_steps = self._drain_steps, None
        if steps is not None and not steps.done():
            steps.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await steps

    async def undrain(self, source: DrainSource, reason: str) -> None:
        if not self.machine.drain.active:
            return
        transition = self.machine.cancel_drain(source, reason)
        if self.machine.drain.active:
            return  # `source` may not end this drain (the GSLB ends only its own)
        await self._cancel_drain_steps()
        await self._open_listeners()
        self._event("drain", f"undrained ({source}): {reason}")
        self._transitioned(transition)
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
        if new.admin != old.admin or new.metrics != old.metrics:
            log.warning("admin and metrics endpoint changes take effect at the next restart")
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
        if not self.machine.drain.active:
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
            "drain": self.machine.drain.snapshot(),
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
            **{ext.name: ext.status() for ext in self.extensions},
        }

    def status_section(self, name: str) -> dict[str, Any] | None:
        """One extension's /status section (e.g. "control_plane"), None without it."""
        return next((ext.status() for ext in self.extensions if ext.name == name), None)


def build_extensions(config: NodeConfig) -> list[AgentExtension]:
    """The composition root's choice of extensions for this config, wired to each other."""
    extensions: list[AgentExtension] = []
    announcer = None
    if config.bgp is not None:
        from edge.announcer import BgpAnnouncer

        announcer = BgpAnnouncer(config.bgp, config.bgp.runtime_dir / config.node.name)
        extensions.append(announcer)
    vip = None
    if config.vip_group is not None:
        from edge.vip.extension import VipExtension

        vip = VipExtension(config.vip_group, config.node.name)
    if config.control_plane is not None:
        from edge.control import ControlPlaneLink

        extensions.append(
            ControlPlaneLink(
                config.control_plane,
                config.node.name,
                on_link_bandwidth=announcer.set_link_bandwidth if announcer else None,
                bgp_sessions=announcer.sessions if announcer else None,
                bgp_report=announcer.bgp_report if announcer else None,
                vip_group=vip.report if vip else None,
            )
        )
    if vip is not None:
        extensions.append(vip)
    return extensions


async def run_agent(config: NodeConfig, config_path: Path | None) -> int:
    agent = Agent(config, config_path, build_extensions(config))
    # Before the extensions start (ExaBGP takes a moment): a SIGTERM then is a drain too.
    agent.install_signal_handlers()
    try:
        await agent.start()
    except ExtensionSetupError as error:
        log.error("config error: %s", error)
        await agent.stop()
        return 2
    except OSError as error:
        log.error("%s", error)
        await agent.stop()
        return 1
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
    # READY=1, then WATCHDOG=1 from this loop, when systemd runs us (Type=notify).
    notifier = SystemdNotifier()
    notifier.start()
    try:
        await agent.run_until_stopped()
    finally:
        notifier.stop()
    return 0
