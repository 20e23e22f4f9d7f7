"""The admin endpoint on localhost: /status, /metrics, /flows, drain and undrain.

Starlette served by uvicorn inside the agent's own event loop. Counters live in
plain attributes on the data path and are read at scrape time by a collector,
so serving traffic never pays for metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections import deque
from collections.abc import AsyncIterator, Generator, Iterator
from typing import Any, Protocol

import uvicorn
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bgp.metrics import BgpCollector
from edge.flows import FlowTable
from edge.flowshare.metrics import FlowShareCollector
from edge.ports import NodeControl
from edge.proxy.metrics import proxy_metrics
from edge.service_runtime import ServiceRuntime
from edge.services import ServiceState
from edge.state import DrainSource, NodeState


class AdminTarget(NodeControl, Protocol):
    """What the admin endpoint needs of the agent: its control port and what it shows."""

    flows: FlowTable
    services: dict[str, ServiceRuntime]
    events: deque[dict[str, Any]]
    transitions_total: int

    def status(self) -> dict[str, Any]: ...

    def status_section(self, name: str) -> dict[str, Any] | None: ...


class AgentCollector(Collector):
    def __init__(self, agent: AdminTarget) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        agent = self.agent
        state = GaugeMetricFamily(
            "anycast_edge_node_state", "1 for the node's current state", labels=["state"]
        )
        for s in NodeState:
            state.add_metric([s.value], 1.0 if agent.state is s else 0.0)
        yield state
        transitions = CounterMetricFamily(
            "anycast_edge_state_transitions", "Node state transitions", labels=[]
        )
        transitions.add_metric([], agent.transitions_total)
        yield transitions
        service_state = GaugeMetricFamily(
            "anycast_edge_service_state",
            "1 for each service's current state (its prefixes are announced while it serves)",
            labels=["service", "state"],
        )
        for name, runtime in agent.services.items():
            for each in ServiceState:
                current = runtime.machine.state is each
                service_state.add_metric([name, each.value], 1.0 if current else 0.0)
        yield service_state
        labels = ["backend", "service"]
        up = GaugeMetricFamily("anycast_edge_backend_up", "Backend health", labels=labels)
        active = GaugeMetricFamily(
            "anycast_edge_backend_active", "Open connections/in-flight requests", labels=labels
        )
        requests = CounterMetricFamily(
            "anycast_edge_backend_requests", "HTTP requests sent", labels=labels
        )
        conns = CounterMetricFamily(
            "anycast_edge_backend_connections", "TCP connections proxied", labels=labels
        )
        failures = CounterMetricFamily(
            "anycast_edge_backend_failures", "Connect errors, resets, timeouts", labels=labels
        )
        for name, runtime in agent.services.items():
            for b in runtime.pool.active_backends:
                up.add_metric([b.name, name], 1.0 if b.eligible else 0.0)
                active.add_metric([b.name, name], b.active_connections)
                requests.add_metric([b.name, name], b.requests_total)
                conns.add_metric([b.name, name], b.connections_total)
                failures.add_metric([b.name, name], b.failures_total)
        yield from (up, active, requests, conns, failures)
        flows = GaugeMetricFamily("anycast_edge_flows", "Established client flows")
        flows.add_metric([], len(agent.flows))
        yield flows
        accepted = CounterMetricFamily("anycast_edge_flows_accepted", "Client flows accepted")
        accepted.add_metric([], agent.flows.accepted_total)
        yield accepted
        yield from proxy_metrics({name: rt.ctx for name, rt in agent.services.items()})
        if (control := agent.status_section("control_plane")) is not None:
            stale = GaugeMetricFamily(
                "anycast_edge_control_plane_stale",
                "1 while no GSLB API answers and the last known good state is in force",
            )
            stale.add_metric([], 1.0 if control["stale"] else 0.0)
            yield stale


def _drain_body(agent: AdminTarget) -> dict[str, Any]:
    return {"state": str(agent.state), "drain": agent.drain.snapshot()}


def create_admin_app(agent: AdminTarget) -> Starlette:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    registry.register(BgpCollector(lambda: agent.status_section("bgp")))
    registry.register(FlowShareCollector(lambda: agent.status_section("flowshare")))

    async def status(request: Request) -> Response:
        return JSONResponse(agent.status())

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    async def drain(request: Request) -> Response:
        reason = request.query_params.get("reason", "local drain via admin endpoint")
        agent.request_drain(DrainSource.LOCAL, reason)
        # The state it moved to (draining, or down when it was not serving); 202: the drain's
        # later phases run on.
        return JSONResponse(_drain_body(agent), status_code=202)

    async def undrain(request: Request) -> Response:
        await agent.undrain(DrainSource.LOCAL, "local undrain via admin endpoint")
        return JSONResponse(_drain_body(agent))

    async def flows(request: Request) -> Response:
        raw_limit = request.query_params.get("limit", "1000")
        if not raw_limit.isdigit():
            return JSONResponse({"error": "limit: expected a non-negative integer"}, 400)
        limit = int(raw_limit)
        items = [f.snapshot() for _, f in zip(range(limit), agent.flows, strict=False)]
        return JSONResponse({"count": len(agent.flows), "flows": items})

    async def flow_stream(request: Request) -> Response:
        # Subscribed before the response starts: a client that has the headers
        # misses no event that happens after.
        sub = agent.flows.subscribe()

        async def events() -> AsyncIterator[bytes]:
            with sub:
                while True:
                    event = await sub.queue.get()
                    line = {"event": event.kind, **event.flow, "dropped": sub.dropped}
                    yield (json.dumps(line) + "\n").encode()

        return StreamingResponse(events(), media_type="application/x-ndjson")

    async def events(request: Request) -> Response:
        return JSONResponse({"events": list(agent.events)})

    return Starlette(
        routes=[
            Route("/status", status),
            Route("/metrics", metrics),
            Route("/drain", drain, methods=["POST"]),
            Route("/undrain", undrain, methods=["POST"]),
            Route("/flows", flows),
            Route("/flows/stream", flow_stream),
            Route("/events", events),
        ]
    )


class _EmbeddedServer(uvicorn.Server):
    """uvicorn in our loop: the agent owns the signals, not uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class _Listener:
    """One uvicorn server in the agent's loop, bound by us first."""

    def __init__(self, app: Starlette, field: str, host: str, port: int) -> None:
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, lifespan="off"
        )
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None
        self._field, self._host, self._port = field, host, port

    async def start(self) -> None:
        # Bind here, so a port in use is our clear error and not uvicorn's exit.
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._host, self._port))
        except OSError as error:
            sock.close()
            where = f"{self._host}:{self._port}"
            raise OSError(f"{self._field}: cannot bind {where}: {error.strerror}") from None
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises the bind error
                raise OSError(f"{self._field}: endpoint stopped during start")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._server.should_exit = True
        self._server.force_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._task, 2)


class AdminServer:
    """The admin endpoint on loopback and, when configured, the read-only /metrics listener
    (`metrics:` in node.yaml) for a Prometheus elsewhere; both read one registry."""

    def __init__(
        self, agent: AdminTarget, host: str, port: int, metrics: tuple[str, int] | None = None
    ) -> None:
        admin = create_admin_app(agent)
        self._listeners = [_Listener(admin, "admin.port", host, port)]
        if metrics is not None:
            scrape = Starlette(
                routes=[r for r in admin.routes if getattr(r, "path", "") == "/metrics"]
            )
            self._listeners.append(_Listener(scrape, "metrics.port", *metrics))

    async def start(self) -> None:
        for listener in self._listeners:
            await listener.start()

    async def stop(self) -> None:
        for listener in self._listeners:
            await listener.stop()
