"""The edge node agent: wires config, pool, health, state machine, listeners and admin.

It offers `edge.ports.NodeControl` to its extensions (BGP announcer, control-plane link,
...), which `run_agent`, the composition root, builds and passes in as a list.

Drain order (what makes a planned drain fail no request), each step a phase of the
state machine's drain: announce that the node is leaving and let the routers move new
flows away first (moving traffic: the extensions' `before_stop_accepting`, e.g. the BGP
choreography, or else `drain.accept_grace`), then stop accepting and let open
connections finish up to the deadline (closing connections), then close what is left
(done). A SIGTERM drain ends the process when it is done.

A reload (SIGHUP) does what `edge.reload_plan` decides: a started service binds its
listeners first (one that cannot refuses the whole reload), then runs its checks and is
announced once it has risen; a removed service drains alone in the same order as the
node (leaving announcement, stop accepting, open connections up to its drain deadline),
then its prefixes are withdrawn and its runtime closed; the others are reconfigured in
place.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from edge.admin import AdminServer
from edge.config import ConfigError, NodeConfig, ServiceConfig
from edge.config import load_config as load_config_file
from edge.flows import FlowTable
from edge.ports import (
    AgentExtension,
    BeforeRouteChange,
    ExtensionSetupError,
    NodeReport,
    ServiceAnnouncer,
)
from edge.proxy.common import ClientConnection, DeadlineSweeper, ProxyContext
from edge.reload_plan import ReloadPlan, plan_reload
from edge.sdnotify import SystemdNotifier
from edge.service_runtime import ServiceRuntime
from edge.services import ServiceState, ServiceTransition, node_verdict
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
from edge.vip.sessions import SessionTable

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
        sessions: SessionTable | None = None,
    ) -> None:
        self.config = config
        # The node's sticky mappings (client key -> backend) for the pools that say
        # `sticky`; the vip_group extension is handed the same table to carry to a standby.
        self.sessions = SessionTable() if sessions is None else sessions
        self.extensions = tuple(extensions)
        self.config_path = config_path
        self.flows = FlowTable()
        self.sweeper = DeadlineSweeper()
        self.machine = NodeStateMachine(
            Thresholds(config.state.degraded_below, config.state.down_below)
        )
        # Every service of node.yaml (today's shape: one implicit service), by name.
        self.services: dict[str, ServiceRuntime] = {
            service.name: self._service_runtime(service) for service in config.service_list()
        }
        self.events: deque[dict[str, Any]] = deque(maxlen=200)
        self.transitions_total = 0
        self.state_since = time.time()
        self._tick_task: asyncio.Task[None] | None = None
        self._admin: AdminServer | None = None
        # Only a handle to cancel the drain's steps: whether and how far the node drains is
        # the state machine's `drain`, nothing else.
        self._drain_steps: asyncio.Task[None] | None = None
        self._started_extensions: list[AgentExtension] = []
        self._stopped = asyncio.Event()
        self._started_at = time.time()
        self._reloaded_at: float | None = None
        # Services a reload removed, still draining: the task that drains each.
        self._retiring: dict[str, asyncio.Task[None]] = {}
        self._reload_lock = asyncio.Lock()
        self._last_reload: dict[str, Any] | None = None

    # -- NodeControl --------------------------------------------------------------
    @property
    def state(self) -> NodeState:
        return self.machine.state

    @property
    def drain(self) -> Drain:
        return self.machine.drain

    def service_states(self) -> dict[str, ServiceState]:
        return {name: runtime.machine.state for name, runtime in self.services.items()}

    def report(self) -> NodeReport:
        total = healthy = 0
        for runtime in self.services.values():
            service_total, service_healthy, _ = runtime.pool.counts()
            total, healthy = total + service_total, healthy + service_healthy
        return NodeReport(
            node=self.config.node.name,
            site=self.config.node.site,
            state=self.machine.state,
            cause=self.machine.cause,
            drain=self.machine.drain,
            backends_total=total,
            backends_healthy=healthy,
            open_connections=self.open_connections(),
            accepted_total=self.flows.accepted_total,
            services=tuple(runtime.report() for runtime in self.services.values()),
        )

    # -- services ----------------------------------------------------------------
    def _service_runtime(
        self, service: ServiceConfig, node: NodeConfig | None = None
    ) -> ServiceRuntime:
        return ServiceRuntime(
            self.config if node is None else node,
            service,
            self.flows,
            self.sweeper,
            is_draining=self.machine.draining,
            on_health=self.evaluate,
            event=self._event,
            affinity=self.sessions,
        )

    def contexts(self) -> list[ProxyContext]:
        return [runtime.ctx for runtime in self.services.values()]

    def open_connections(self) -> int:
        return sum(ctx.open_connections() for ctx in self.contexts())

    def _client_connections(
        self, contexts: Sequence[ProxyContext] | None = None
    ) -> Iterator[ClientConnection]:
        for ctx in self.contexts() if contexts is None else contexts:
            for conns in ctx.connections.values():
                yield from list(conns)

    def _service_announcers(self) -> list[ServiceAnnouncer]:
        return [ext for ext in self._started_extensions if isinstance(ext, ServiceAnnouncer)]

    def _announce_services(self) -> None:
        """Tell the per-service announcers which services have a runtime and which of them
        a reload removed (they are leaving)."""
        if self.config.implicit_service:
            return
        services = [runtime.service for runtime in self.services.values()]
        for announcer in self._service_announcers():
            announcer.set_services(services, set(self._retiring))

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
        for runtime in self.services.values():
            runtime.start_checks()
        listeners = [cfg.name for cfg in self.config.all_listeners()]
        self._event("agent", "started", listeners=listeners, services=list(self.services))
        self.evaluate()
        self._tick_task = asyncio.get_running_loop().create_task(self._tick())
        for extension in self.extensions:
            await extension.start(self)
            self._started_extensions.append(extension)
        # A reload before the extensions started: they hear its services now.
        self._announce_services()
        # Extensions may hold the node at degraded (e.g. BFD lost): look again with them.
        self.evaluate()

    async def _tick(self) -> None:
        """Re-evaluate once a second: listener self-checks and degradations change unseen."""
        while True:
            await asyncio.sleep(1.0)
            try:
                for runtime in self.services.values():
                    runtime.expire_ejections(time.monotonic())
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
        for task in list(self._retiring.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while self._started_extensions:
            extension = self._started_extensions.pop()
            try:
                await extension.stop()
            except Exception:
                log.exception("stopping extension %s failed", extension.name)
        await self._close_listeners()
        for conn in self._client_connections():
            conn.abort()
        for runtime in self.services.values():
            await runtime.stop_checks()
        await self.sweeper.stop()
        if self._admin is not None:
            await self._admin.stop()
        self._stopped.set()

    # -- listeners ---------------------------------------------------------------
    async def _open_listeners(self) -> None:
        for runtime in self.services.values():
            if not runtime.retiring:
                await runtime.open_listeners()

    async def _close_listeners(self) -> None:
        for runtime in self.services.values():
            runtime.close_listeners()

    # -- health --------------------------------------------------------------------
    def evaluate(self) -> None:
        """Every service looks at its listeners and backends, then the node at itself: one
        service of today's shape decides the node's health as before; several decide it
        through `edge.services.node_verdict` (a service down is that service's)."""
        draining = self.machine.drain.active
        changes = [t for rt in self.services.values() if (t := rt.observe(draining))]
        degraded_by = tuple(r for ext in self._started_extensions if (r := ext.degraded_reason()))
        if self.config.implicit_service:
            runtime = next(iter(self.services.values()))
            total, healthy, settled = runtime.pool.counts()
            ok, detail = (True, "") if draining else runtime.listeners_ok()
            observation = Observation(total, healthy, settled, ok, detail, degraded_by)
        else:
            verdict = node_verdict([rt.machine for rt in self.services.values()])
            observation = Observation(0, 0, True, True, "", degraded_by, services_verdict=verdict)
        transition = self.machine.observe(observation)
        for change in changes:
            self._service_transitioned(change)
        if transition is None and changes:
            # The node's own state stands; its extensions still hear (the announcer's
            # prefixes are per service).
            causes = "; ".join(f"service {c.service}: {c.old} -> {c.new}" for c in changes)
            state = self.machine.state
            transition = Transition(state, state, causes, self.machine.drain)
            self._notify_extensions(transition)
            return
        self._transitioned(transition)

    def _service_transitioned(self, change: ServiceTransition) -> None:
        level = logging.WARNING if not change.new.serving else logging.INFO
        log.log(
            level, "service %s %s -> %s: %s", change.service, change.old, change.new, change.cause
        )
        self._event(
            "service",
            change.cause,
            service=change.service,
            old=str(change.old),
            new=str(change.new),
        )

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
        self._notify_extensions(transition)

    def _notify_extensions(self, transition: Transition) -> None:
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

    async def _finish_connections(self, contexts: Sequence[ProxyContext], deadline_s: float) -> int:
        """The drain's last phase for `contexts` (listeners already closed): idle keep-alive
        connections close, open ones finish up to `deadline_s`; what is left then is
        aborted and counted."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        for conn in self._client_connections(contexts):
            conn.close_when_idle(DRAIN_IDLE_GRACE)

        def still_open() -> int:
            return sum(ctx.open_connections() for ctx in contexts)

        while still_open() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        left = still_open()
        for conn in self._client_connections(contexts):
            conn.abort()
        return left

    async def _run_drain(self) -> None:
        moved = False
        for extension in list(self._started_extensions):
            moved = await extension.before_stop_accepting() or moved
        if not moved and self.config.drain.accept_grace:
            await asyncio.sleep(self.config.drain.accept_grace)
        self._transitioned(self.machine.stop_accepting())
        await self._close_listeners()
        self._event("drain", "stopped accepting new connections")
        left = await self._finish_connections(self.contexts(), self.config.drain.deadline)
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
        asyncio.get_running_loop().create_task(self.reload_file(self.config_path))
        return True

    async def reload_file(self, path: Path) -> bool:
        """Read and apply `path`; False when it was refused (nothing changed). Read off the
        event loop: checking the bgp addresses asks netlink, whose client runs its own."""
        try:
            new = await asyncio.to_thread(load_config_file, path)
        except ConfigError as error:
            self._reload_rejected(str(error))
            return False
        return await self.apply_config(new)

    def _reload_rejected(self, why: str) -> None:
        log.error("reload rejected, keeping the running config: %s", why)
        self._event("reload", f"rejected: {why}")
        self._last_reload = {"time": time.time(), "refused": why}

    async def apply_config(self, new: NodeConfig) -> bool:
        """Apply `new` as `edge.reload_plan` decides; False when refused (nothing changed)."""
        async with self._reload_lock:
            return await self._apply_config(new)

    async def _apply_config(self, new: NodeConfig) -> bool:
        old = self.config
        running = [runtime.service for runtime in self.services.values()]
        plan = plan_reload(old, new, running, set(self._retiring))
        if plan.refused is not None:
            self._reload_rejected(plan.refused)
            return False
        started = {
            service.name: self._service_runtime(service, new)
            for service in new.service_list()
            if service.name in plan.start
        }
        # A started service binds before anything changes: one that cannot refuses it all.
        accept = not self.machine.drain.active
        try:
            for runtime in started.values():
                await runtime.open_listeners()
        except OSError as error:
            for runtime in started.values():
                runtime.close_listeners()
            self._reload_rejected(str(error))
            return False
        if not accept:  # bound to prove it can; the node's undrain opens them
            for runtime in started.values():
                runtime.close_listeners()
        if new.admin != old.admin or new.metrics != old.metrics:
            log.warning("admin and metrics endpoint changes take effect at the next restart")
        if new.bgp != old.bgp:
            log.warning("bgp changes take effect at the next restart")
        self.config = new
        self.machine.thresholds = Thresholds(new.state.degraded_below, new.state.down_below)
        for service in new.service_list():
            if service.name in started:
                continue
            await self.services[service.name].reconfigure(new, service, accept)
        for name, runtime in started.items():
            self.services[name] = runtime
            runtime.start_checks()
        for name in plan.remove:
            runtime = self.services[name]
            runtime.retire()
            self._retiring[name] = asyncio.get_running_loop().create_task(self._retire(runtime))
        self._announce_services()
        self._reloaded(plan)
        self.evaluate()
        return True

    def _reloaded(self, plan: ReloadPlan) -> None:
        self._reloaded_at = time.time()
        summary = plan.summary()
        log.info("configuration reloaded: %s", summary, extra={"event": "reload"})
        self._event(
            "reload",
            f"configuration reloaded: {summary}",
            started=list(plan.start),
            draining=list(plan.remove),
            reconfigured=list(plan.reconfigure),
        )
        self._last_reload = {
            "time": self._reloaded_at,
            "refused": None,
            "steps": [
                {"service": step.service, "action": str(step.action), "reason": step.reason}
                for step in plan.steps
            ],
        }
        for name in plan.start:
            self._event("service", "started by a reload: announced once healthy", service=name)

    async def _retire(self, runtime: ServiceRuntime) -> None:
        """A removed service's drain, in the node's drain order but for it alone: leaving
        announcement (its prefixes with GRACEFUL_SHUTDOWN), stop accepting, open
        connections up to its drain deadline; then withdrawn and closed."""
        name = runtime.name
        drain = runtime.view.drain
        self._event("service", "removed by a reload: draining", service=name)
        try:
            moved = False
            for announcer in self._service_announcers():
                accepted = lambda: runtime.ctx.accepted_total  # noqa: E731
                moved = await announcer.before_service_stops_accepting(name, accepted) or moved
            if not moved and drain.accept_grace:
                await asyncio.sleep(drain.accept_grace)
            runtime.close_listeners()
            self._event("service", "removed by a reload: stopped accepting", service=name)
            left = await self._finish_connections([runtime.ctx], drain.deadline)
            await runtime.stop_checks()
            del self.services[name]
        finally:
            self._retiring.pop(name, None)
        self._announce_services()
        self._event(
            "service",
            f"removed by a reload: gone, {left} connections closed at the deadline",
            service=name,
        )
        self.evaluate()

    # -- views ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        services = [runtime.status() for runtime in self.services.values()]
        return {
            "node": self.config.node.name,
            "site": self.config.node.site,
            "state": str(self.state),
            "state_since": self.state_since,
            "drain": self.machine.drain.snapshot(),
            # Node-wide lists (every service's), as before services existed.
            "listeners": [listener for service in services for listener in service["listeners"]],
            "backends": [backend for service in services for backend in service["backends"]],
            "services": {
                service["name"]: {k: v for k, v in service.items() if k != "name"}
                for service in services
            },
            "flows": {
                "open": len(self.flows),
                "accepted_total": self.flows.accepted_total,
                "closed_total": self.flows.closed_total,
            },
            "events": list(self.events)[-20:],
            "uptime_s": round(time.time() - self._started_at, 3),
            "reloaded_at": self._reloaded_at,
            # What the last reload did (each service's step) or why it was refused, and
            # the services it removed that are still draining.
            "reload": {**(self._last_reload or {}), "removing": sorted(self._retiring)},
            **{ext.name: ext.status() for ext in self.extensions},
        }

    def status_section(self, name: str) -> dict[str, Any] | None:
        """One extension's /status section (e.g. "control_plane"), None without it."""
        return next((ext.status() for ext in self.extensions if ext.name == name), None)


def build_extensions(
    config: NodeConfig, sessions: SessionTable | None = None
) -> list[AgentExtension]:
    """The composition root's choice of extensions for this config, wired to each other.
    Raises ExtensionSetupError when one cannot run as configured."""
    extensions: list[AgentExtension] = []
    hold: BeforeRouteChange | None = None
    flowshare = None
    if config.flowshare is not None:
        # First: it starts (and takes its peers' flows) before anything announces, and the
        # announcer holds every planned change until the peers hold this node's flows.
        from edge.flowshare.extension import FlowShareExtension

        flowshare = FlowShareExtension(config)
        hold = flowshare.hold
        extensions.append(flowshare)
    announcer = None
    if config.bgp is not None:
        from edge.announcer import BgpAnnouncer

        services = () if config.implicit_service else config.service_list()
        # an active-passive member announced by BGP starts as a standby (worse MED)
        group = config.vip_group
        penalty = group.standby_med_penalty if group and group.announce == "bgp" else 0
        announcer = BgpAnnouncer(
            config.bgp,
            config.bgp.runtime_dir / config.node.name,
            services,
            before_change=hold,
            med_penalty=penalty,
        )
        extensions.append(announcer)
    vip = None
    if config.vip_group is not None:
        from edge.vip.extension import VipExtension

        vip = VipExtension(
            config.vip_group,
            config.node.name,
            sessions=sessions,
            set_med_penalty=announcer.set_med_penalty if announcer else None,
        )
    if config.control_plane is not None:
        from edge.control import ControlPlaneLink

        extensions.append(
            ControlPlaneLink(
                config.control_plane,
                config.node.name,
                on_link_bandwidth=announcer.set_link_bandwidth if announcer else None,
                on_service_desired=announcer.set_service_desired if announcer else None,
                bgp_sessions=announcer.sessions if announcer else None,
                bgp_report=announcer.bgp_report if announcer else None,
                vip_group=vip.report if vip else None,
                flowshare=flowshare.report if flowshare else None,
            )
        )
    if vip is not None:
        extensions.append(vip)
    return extensions


async def run_agent(config: NodeConfig, config_path: Path | None) -> int:
    try:
        sessions = SessionTable()
        extensions = build_extensions(config, sessions)
    except ExtensionSetupError as error:
        log.error("config error: %s", error)
        return 2
    agent = Agent(config, config_path, extensions, sessions)
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
        ", ".join(f"{c.kind}:{c.address}:{c.port}" for c in config.all_listeners()),
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
