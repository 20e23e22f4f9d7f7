"""Heartbeats (observed state, written by nodes under a TTL/lease) and each node's published
desired view, with a long-poll so a node learns a change within milliseconds."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import Identity
from api.routes.common import (
    NAME_PATTERN,
    READ_ERRORS,
    AnyIdentity,
    ApiError,
    AppContext,
    Ctx,
    NamePath,
    answers,
    api_error_response,
    problem_response,
    store_unavailable_response,
)
from api.store.base import StoreUnavailable
from api.views import Snapshot, node_view, node_view_json
from contract.schemas import (
    NODE_CONTRACT_VERSION,
    NODE_CONTRACT_VERSIONS,
    Heartbeat,
    NodeDesired,
)

router = APIRouter(prefix="/v1/nodes", tags=["heartbeats"])
log = logging.getLogger("api")


#: The node contract an agent speaks, sent as `?contract=N` (agents before version 2 send none).
ContractQuery = Annotated[int | None, Query(ge=0, le=1000)]


def _may_act_for(who: Identity, node: str) -> None:
    if not who.may_act_for_node(node):
        raise ApiError(403, f"token {who.name!r} may not act for node {node!r}", "node")


def _check_contract(contract: int | None) -> int:
    if contract not in NODE_CONTRACT_VERSIONS:
        spoken = "1 (no contract parameter)" if contract is None else str(contract)
        versions = " and ".join(str(v) for v in sorted(NODE_CONTRACT_VERSIONS))
        raise ApiError(
            426,
            f"this GSLB API publishes node contract versions {versions}; "
            f"the client speaks version {spoken}: upgrade the agent (README: Upgrading)",
            "contract",
        )
    return contract


def _answer(view: NodeDesired) -> NodeDesired | JSONResponse:
    """A view of contract 2 goes out without the fields that agent's schema does not know."""
    if view.contract_version >= NODE_CONTRACT_VERSION:
        return view
    return JSONResponse(view.model_dump(mode="json", exclude={"service_desired"}))


@router.post(
    "/{node}/heartbeat",
    response_model=NodeDesired,
    responses=answers(400, 401, 403, 413, 422, 426, 503),
)
async def heartbeat(
    ctx: Ctx, who: AnyIdentity, node: NamePath, body: Heartbeat, contract: ContractQuery = None
) -> NodeDesired | JSONResponse:
    """Record the node's heartbeat; answers with the node's desired view (up to a second old:
    the long-poll is authoritative). A heartbeat of an older contract is still recorded (the
    node is alive and its state counts for the others' shares), then answered 426."""
    return _answer(await accept_heartbeat(ctx, who, node, body, contract))


async def accept_heartbeat(
    ctx: AppContext, who: Identity, node: str, body: Heartbeat, contract: int | None
) -> NodeDesired:
    """The heartbeat route's work once its request is parsed."""
    return (await _accept(ctx, who, node, body, contract))[1]


async def _accept(
    ctx: AppContext, who: Identity, node: str, body: Heartbeat, contract: int | None
) -> tuple[Snapshot, NodeDesired]:
    """`accept_heartbeat`, with the snapshot the view comes from (HeartbeatFastPath answers
    that snapshot's rendering of it)."""
    _may_act_for(who, node)
    # A snapshot up to a second old is fine here: the view in the answer is a backstop, the
    # long-poll is what delivers changes promptly. Rebuilding per heartbeat would not scale.
    snapshot = await ctx.snapshots.get(allow_stale=True)
    # The view is built in the newest shape; an unknown contract is refused below, after
    # the heartbeat is recorded.
    version = contract if contract in NODE_CONTRACT_VERSIONS else NODE_CONTRACT_VERSION
    view = node_view(snapshot, node, version)
    if view is None:
        # The stale snapshot may predate the node's creation: first the current one (one
        # rebuild shared by every heartbeat that missed, e.g. a fleet just added), then the
        # store itself, which a change made through another instance may not have reached
        # in a notification yet (one read, so an unknown name costs little).
        snapshot = await ctx.snapshots.get()
        view = node_view(snapshot, node, version)
    if view is None:
        if node not in (await ctx.store.read_desired()).nodes:
            raise ApiError(422, f"unknown node {node!r}", "node")
        snapshot = await ctx.snapshots.get(fresh=True)
        view = node_view(snapshot, node, version)
        if view is None:
            raise ApiError(422, f"unknown node {node!r}", "node")
    await ctx.store.record_heartbeat(
        node, body, datetime.now(UTC), ctx.settings.heartbeat_ttl_s, who.name
    )
    _check_contract(contract)
    return snapshot, view


_HEARTBEAT_PREFIX = "/v1/nodes/"
_HEARTBEAT_SUFFIX = "/heartbeat"
_NAME = re.compile(NAME_PATTERN)
_CURRENT_CONTRACT = f"contract={NODE_CONTRACT_VERSION}".encode()
_JSON = b"application/json"
_TEMPLATE = "/v1/nodes/{node}/heartbeat"


class HeartbeatFastPath:
    """The outermost ASGI layer of the app (`api.app.GslbApi`): a well-formed heartbeat is
    answered here, before FastAPI's middleware stack, routing, dependency solving and
    exception middleware (measured at a thousand heartbeats a second: most of the API's CPU
    per heartbeat). It does what the route does, by calling the same `_accept`, answers the
    same bytes (the view's JSON, rendered once per snapshot) and records the request in the
    same metrics as RequestMetrics would. Anything it is not sure of before the heartbeat is
    recorded (no or a bad token, another content type or query, no Content-Length or one
    above the body limit, a body that does not validate, a node name out of pattern) goes
    to `app`, FastAPI with its whole middleware stack, untouched, so every refusal
    (413 included) is the route's own."""

    def __init__(self, app: ASGIApp, ctx: AppContext) -> None:
        self.app = app
        self.ctx = ctx
        self.route = next(
            r for r in router.routes if isinstance(r, APIRoute) and r.endpoint is heartbeat
        )
        self._limit = ctx.settings.max_body_bytes
        metrics = ctx.metrics
        self._answered = metrics.requests.labels(_TEMPLATE, "POST", "200")
        self._seconds = metrics.request_seconds.labels(_TEMPLATE, "POST")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if (
            scope["method"] != "POST"
            or not path.startswith(_HEARTBEAT_PREFIX)
            or not path.endswith(_HEARTBEAT_SUFFIX)
            or scope.get("query_string") != _CURRENT_CONTRACT
        ):
            await self.app(scope, receive, send)
            return
        node = path[len(_HEARTBEAT_PREFIX) : -len(_HEARTBEAT_SUFFIX)]
        if "/" in node or not _NAME.match(node):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        authorization = content_type = length = None
        for name, value in scope["headers"]:
            # the first of repeated headers, as Starlette
            if name == b"authorization":
                authorization = authorization or value
            elif name == b"content-type":
                content_type = content_type or value
            elif name == b"content-length":
                length = length or value
        if (
            content_type != _JSON
            or length is None
            or not length.isdigit()
            or int(length) > self._limit
        ):
            await self.app(scope, receive, send)
            return
        who = self.ctx.tokens.identify(
            authorization.decode("latin-1") if authorization is not None else None
        )
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        body = None
        if who is not None and who.may_act_for_node(node):
            # As FastAPI does it (json.loads, then validation of the Python value), so the
            # same bodies are accepted.
            with contextlib.suppress(ValueError):
                body = Heartbeat.model_validate(json.loads(raw))
        if who is None or body is None:
            await self.app(scope, _replay(raw, receive), send)
            return
        scope["route"] = self.route  # as the router would set it
        try:
            snapshot, view = await _accept(self.ctx, who, node, body, NODE_CONTRACT_VERSION)
            rendered = node_view_json(snapshot, node, view.contract_version)
        except ApiError as exc:
            await self._answer(api_error_response(exc), scope, receive, send, started)
            return
        except StoreUnavailable as exc:
            await self._answer(store_unavailable_response(exc), scope, receive, send, started)
            return
        except Exception:
            # A bug: as the app's own handler of unexpected errors (never headers, tokens).
            log.exception("unhandled error on %s %s", scope["method"], path)
            await self._answer(
                problem_response(500, "internal error"), scope, receive, send, started
            )
            return
        assert rendered is not None  # the view exists in that snapshot
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-length", str(len(rendered)).encode()),
                    (b"content-type", _JSON),
                ],
            }
        )
        await send({"type": "http.response.body", "body": rendered})
        self._answered.inc()
        self._seconds.observe(time.perf_counter() - started)

    async def _answer(
        self, response: Response, scope: Scope, receive: Receive, send: Send, started: float
    ) -> None:
        await response(scope, receive, send)
        metrics = self.ctx.metrics
        metrics.requests.labels(_TEMPLATE, "POST", str(response.status_code)).inc()
        self._seconds.observe(time.perf_counter() - started)


def _replay(body: bytes, receive: Receive) -> Receive:
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


@router.get(
    "/{node}/desired", response_model=NodeDesired, responses=answers(*READ_ERRORS, 404, 426)
)
async def node_desired(
    ctx: Ctx,
    who: AnyIdentity,
    node: NamePath,
    after_revision: Annotated[int | None, Query(ge=0, le=2**63 - 1)] = None,
    fingerprint: Annotated[str | None, Query(max_length=64)] = None,
    timeout_s: Annotated[float, Query(ge=0, le=300)] = 25.0,
    contract: ContractQuery = None,
) -> NodeDesired | JSONResponse:
    """The node's desired view. Long-poll: with `after_revision` and/or `fingerprint`, it
    answers as soon as the revision is above `after_revision` or the view's fingerprint
    differs (effective weights move with other nodes' health without a new revision), or
    with the unchanged view when `timeout_s` (capped by the server) runs out."""
    if not (who.can_read() or who.may_act_for_node(node)):
        _may_act_for(who, node)
    version = _check_contract(contract)
    deadline = time.monotonic() + min(timeout_s, ctx.settings.long_poll_max_s)
    while True:
        generation = ctx.store.changes.generation
        view = node_view(await ctx.snapshots.get(), node, version)
        if view is None:
            raise ApiError(404, f"no node {node!r}", "node")
        changed = (after_revision is not None and view.revision > after_revision) or (
            fingerprint is not None and view.fingerprint != fingerprint
        )
        remaining = deadline - time.monotonic()
        if changed or (after_revision is None and fingerprint is None) or remaining <= 0:
            return _answer(view)
        await ctx.store.changes.wait(generation, remaining)
