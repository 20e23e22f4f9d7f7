"""The FastAPI application factory: `create_app(store, settings)`. Nothing is created at import.

The app owns the store's lifecycle (started and closed in the lifespan) and runs one
background task, the sweeper, that reports nodes whose heartbeat lease expired as dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import gc_pacing, ui
from api.auth import TokenTable
from api.failopen import FailOpen
from api.metrics import ApiMetrics, RequestMetrics
from api.routes import (
    convergence,
    drains,
    events,
    heartbeats,
    nodes,
    services,
    sites,
    state,
    status,
    weights,
)
from api.routes.common import (
    ApiError,
    AppContext,
    Reader,
    answers,
    api_error_response,
    problem_response,
    store_unavailable_response,
)
from api.settings import Settings
from api.store.base import Store, StoreUnavailable
from api.views import SnapshotCache
from contract.schemas import NODE_CONTRACT_VERSION

log = logging.getLogger("api")


class BodyLimit:
    """Refuse request bodies above `limit` bytes with 413, whether announced by
    Content-Length or streamed in chunks, before the app buffers them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    await self._refuse(send)
                    return
        received = 0
        started = refused = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit and not refused:
                    # Answer now and tell the app the client went away: FastAPI would turn
                    # an exception raised here into a 400 of its own.
                    refused = True
                    if not started:
                        await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 is already out; whatever the app says is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)

    async def _refuse(self, send: Send) -> None:
        body = b'{"detail":"request body too large","field":"body"}'
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class GslbApi(FastAPI):
    """The FastAPI app, with heartbeats answered before its middleware stack
    (`heartbeats.HeartbeatFastPath`, installed by `create_app`); everything else, and every
    heartbeat the fast path is not sure of, goes through FastAPI as usual."""

    fast_path: heartbeats.HeartbeatFastPath | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.fast_path is not None and scope["type"] == "http":
            await self.fast_path(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def routed(self, scope: Scope, receive: Receive, send: Send) -> None:
        """FastAPI's own handling (with its middleware), for what the fast path passes on."""
        await super().__call__(scope, receive, send)


def _field_of(loc: tuple[int | str, ...]) -> str:
    # ("body", "nodes", "a1", "weight") -> "nodes.a1.weight"; ("header", "If-Match") -> "If-Match"
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header") and len(parts) > 1:
        parts = parts[1:]
    return ".".join(parts)


def _methods_for(app: FastAPI, path: str) -> list[str]:
    methods: set[str] = set()
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path_regex.match(path):
            methods |= route.methods or set()
    return sorted(methods)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return api_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        field = _field_of(tuple(first.get("loc", ())))
        if first.get("type") == "json_invalid":
            return problem_response(400, "the body is not valid JSON", "body")
        return problem_response(422, f"{field}: {first.get('msg', 'invalid')}", field)

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(_: Request, exc: StoreUnavailable) -> JSONResponse:
        return store_unavailable_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the first route matching the path; the resource is all of them.
            headers["Allow"] = ", ".join(_methods_for(request.app, request.url.path))
        return problem_response(exc.status_code, str(exc.detail), None, headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug: log it with the route (never headers, which carry tokens).
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(500, "internal error")


def _describe(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI document, completed where FastAPI cannot know: If-Match is required
    (the route answers 428 itself rather than a generic 422, so FastAPI sees it optional),
    header parameters are plain strings, the node contract version is required and is the
    one this API speaks (a route answers 426 itself to any other, or to none, so an older
    agent learns why), and every answer carrying an ETag links to every
    write's If-Match, so a generated client can chain a read and a write."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    operations = [op for ops in schema["paths"].values() for op in ops.values()]
    writes: list[str] = []
    for op in operations:
        for param in op.get("parameters", []):
            if param["in"] == "query" and param["name"] == "contract":
                param["required"] = True
                param["schema"] = {"type": "integer", "enum": [NODE_CONTRACT_VERSION]}
            if param["in"] != "header":
                continue
            variants = param["schema"].get("anyOf", [param["schema"]])
            param["schema"] = next(v for v in variants if v.get("type") != "null")
            if param["name"] == "If-Match":
                param["required"] = True
                writes.append(op["operationId"])
    for op in operations:
        ok = op["responses"].get("200", {})
        if "ETag" in ok.get("headers", {}):
            ok["links"] = {
                f"IfMatch-{target}": {
                    "operationId": target,
                    "parameters": {"header.If-Match": "$response.header.ETag"},
                }
                for target in writes
            }
    # /metrics answers text only; FastAPI adds a JSON 200 to every route.
    schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"].pop("application/json")
    app.openapi_schema = schema
    return schema


async def _sweep_forever(store: Store, settings: Settings, fail_open: FailOpen) -> None:
    while True:
        await asyncio.sleep(settings.sweep_interval_s)
        if fail_open.starting():
            continue  # leases that expired while this API was down prove nothing yet
        try:
            dead = await store.sweep_dead(datetime.now(UTC), settings.heartbeat_ttl_s)
        except StoreUnavailable as exc:
            log.warning("dead-node sweep skipped: %s", exc)
            continue
        except Exception:
            log.exception("dead-node sweep failed")
            continue
        for node in dead:
            log.info("node %s is dead: heartbeat lease expired", node)


def create_app(
    store: Store, settings: Settings, tokens: TokenTable | None = None, *, pace_gc: bool = False
) -> FastAPI:
    """`pace_gc`: pace the process's garbage collector (api/gc_pacing.py) while the app
    runs; for the API's own process (`python -m api`), not for an app embedded in another."""
    metrics = ApiMetrics()
    metrics.watch_store(store)
    fail_open = FailOpen(store, settings.panic_threshold, settings.heartbeat_ttl_s)
    snapshots = SnapshotCache(store, fail_open.weigh_from)
    metrics.watch_snapshots(snapshots, settings.budget.budget())
    metrics.watch_fail_open(fail_open)
    ctx = AppContext(
        store=store,
        settings=settings,
        tokens=tokens or TokenTable.from_settings(settings),
        snapshots=snapshots,
        metrics=metrics,
        fail_open=fail_open,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await store.start()
        tasks = [
            asyncio.create_task(
                _sweep_forever(store, settings, fail_open), name="dead-node-sweeper"
            )
        ]
        if pace_gc:
            tasks.append(asyncio.create_task(gc_pacing.pace(), name="gc-pacing"))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await store.close()

    app = GslbApi(
        title="anycast-edge GSLB API",
        version="1",
        lifespan=lifespan,
        description="Desired state (revisioned, If-Match), heartbeats, events, convergence.",
    )
    app.state.ctx = ctx
    app.openapi = lambda: _describe(app)  # type: ignore[method-assign]
    _install_error_handlers(app)
    routers = (state, sites, nodes, services, weights, drains, heartbeats, events, convergence)
    for module in (*routers, status):
        app.include_router(module.router)
    app.include_router(ui.router)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/metrics",
        tags=["health"],
        # No response_class: FastAPI would then document the errors' Problem as text/plain.
        responses={
            200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}},
            **answers(401, 403),
        },
    )
    async def prometheus(_: Reader) -> PlainTextResponse:
        """Prometheus text format (needs a viewer or operator token, like every read)."""
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # Outside the whole stack; what it passes on goes through BodyLimit and RequestMetrics.
    app.fast_path = heartbeats.HeartbeatFastPath(app.routed, ctx)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app
