"""Shared route machinery: the app context, authentication, and revisioned writes.

Every write goes through `revisioned_write`: it needs `If-Match` (428 without), answers 412
with the current state when the revision moved, and returns the new state with its ETag.
A weight change waits first, bounded, until the fleet's flow tables are in sync
(`_flow_sync_gate`, decided by `api.flowsync`).

An optional `Idempotency-Key` names the write, so a client that lost the answer to a write
can send it again and learn it succeeded instead of getting a 412 against itself. The key is
bound to the request it first came with (method, path, body): the same key with another
request is a client bug, answered 422, never the first request's result.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, Header, Path, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from api import flowsync
from api.auth import Identity, TokenTable
from api.budget import alive_services, alive_states, describe, judge
from api.failopen import FailOpen
from api.metrics import ApiMetrics
from api.settings import Settings
from api.store.base import EventDraft, RevisionConflict, Store, StoreUnavailable
from api.views import SnapshotCache
from contract.schemas import (
    REVISION_MISMATCH,
    BudgetBreach,
    DesiredSpec,
    DesiredState,
    NodeObserved,
    Problem,
)

log = logging.getLogger("api")
_bearer = HTTPBearer(auto_error=False, description="Bearer token (viewer, operator or node)")
IDEMPOTENCY_KEY_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
ETAG_PATTERN = r'^(?:W/)?"?(\d{1,18})"?$'
_ETAG = re.compile(ETAG_PATTERN)


@dataclass
class AppContext:
    store: Store
    settings: Settings
    tokens: TokenTable
    snapshots: SnapshotCache
    metrics: ApiMetrics
    fail_open: FailOpen


class ApiError(Exception):
    """An error answered as a Problem {"detail": ..., "field": ...} with a status code."""

    def __init__(
        self,
        status: int,
        detail: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        budget: list[BudgetBreach] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.field = field
        self.headers = headers or {}
        self.budget = budget


def etag(revision: int) -> str:
    return f'"{revision}"'


def state_response(state: DesiredState, status: int = 200) -> JSONResponse:
    return JSONResponse(
        state.model_dump(mode="json"), status_code=status, headers={"ETag": etag(state.revision)}
    )


def problem_response(
    status: int,
    detail: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
    budget: list[BudgetBreach] | None = None,
) -> JSONResponse:
    problem = Problem(detail=detail, field=field, budget=budget)
    return JSONResponse(problem_json(problem), status_code=status, headers=headers)


def api_error_response(exc: ApiError) -> JSONResponse:
    return problem_response(exc.status, exc.detail, exc.field, exc.headers, exc.budget)


def store_unavailable_response(exc: StoreUnavailable) -> JSONResponse:
    log.warning("store unavailable: %s", exc)
    return problem_response(503, "state store unavailable, retry", None, {"Retry-After": "1"})


def problem_json(problem: Problem) -> dict[str, Any]:
    """The wire form: `detail` and `field` always, the optional parts only when present."""
    body = problem.model_dump(mode="json")
    return {k: v for k, v in body.items() if v is not None or k in ("detail", "field")}


def conflict_response(current: DesiredState) -> JSONResponse:
    return JSONResponse(
        problem_json(Problem(detail=REVISION_MISMATCH, current=current)),
        status_code=412,
        headers={"ETag": etag(current.revision)},
    )


# Dependencies are `async def` on purpose: FastAPI runs plain `def` dependencies in a thread
# pool, a thread hop per dependency per request (it was most of a heartbeat's CPU).
async def context(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


Ctx = Annotated[AppContext, Depends(context)]


async def identity(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Identity:
    tokens = (await context(request)).tokens
    header = f"Bearer {credentials.credentials}" if credentials else None
    who = tokens.identify(header)
    if who is None:
        raise ApiError(
            401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"}
        )
    return who


async def reader(who: Annotated[Identity, Depends(identity)]) -> Identity:
    if not who.can_read():
        raise ApiError(403, f"role {who.role} may not read this")
    return who


async def operator(who: Annotated[Identity, Depends(identity)]) -> Identity:
    if not who.can_write():
        raise ApiError(403, f"role {who.role} may not change desired state")
    return who


Reader = Annotated[Identity, Depends(reader)]
Operator = Annotated[Identity, Depends(operator)]
AnyIdentity = Annotated[Identity, Depends(identity)]

IfMatch = Annotated[
    str | None,
    Header(
        alias="If-Match",
        description='The revision the write is based on, as returned in ETag (e.g. "17"). '
        "Required: without it the answer is 428.",
        pattern=ETAG_PATTERN,
    ),
]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="Names this write so a retry of it is recognised; bound to the request "
        "it first came with (another request with the same key is 422).",
        pattern=IDEMPOTENCY_KEY_PATTERN,  # FastAPI answers 422 for anything else
    ),
]


BudgetOverride = Annotated[
    str | None,
    Header(
        alias="Budget-Override",
        description="Write even though the disruption budget refuses it (409); the value is "
        "the reason, recorded with the author in a budget-override event.",
        min_length=1,
        max_length=500,
    ),
]


@dataclass(frozen=True, slots=True)
class WriteRequest:
    """What every revisioned write carries besides its body."""

    if_match: str | None
    idempotency_key: str | None
    target: str  # "PUT /v1/sites/a": what the idempotency key is bound to, with the body
    author: str
    budget_override: str | None


async def write_request(
    request: Request,
    who: Operator,
    if_match: IfMatch = None,
    idempotency_key: IdempotencyKey = None,
    budget_override: BudgetOverride = None,
) -> WriteRequest:
    target = f"{request.method} {request.url.path}"
    override = budget_override.strip() if budget_override else None
    return WriteRequest(if_match, idempotency_key, target, who.name, override or None)


Write = Annotated[WriteRequest, Depends(write_request)]

Mutation = Callable[[DesiredState], tuple[DesiredState, list[EventDraft]]]
_KEY_SEPARATOR = "~"  # not in IDEMPOTENCY_KEY_PATTERN's alphabet


def _write_id(write: WriteRequest, body: BaseModel | None) -> str:
    if write.idempotency_key is None:
        return uuid.uuid4().hex
    payload = body.model_dump_json() if body is not None else ""
    digest = hashlib.sha256(f"{write.target}\n{payload}".encode()).hexdigest()[:16]
    return f"{write.idempotency_key}{_KEY_SEPARATOR}{digest}"


def _reused_key(write: WriteRequest, write_id: str, current: DesiredState) -> bool:
    key = current.write_id.partition(_KEY_SEPARATOR)[0]
    return key == write.idempotency_key and current.write_id != write_id


def _key_reused() -> ApiError:
    return ApiError(
        422, "this Idempotency-Key was already used for another request", "Idempotency-Key"
    )


def _within_budget(
    ctx: AppContext,
    write: WriteRequest,
    current: DesiredState,
    new: DesiredState,
    observed: dict[str, NodeObserved],
) -> list[EventDraft]:
    """Refuse (409) a change the disruption budget does not allow, unless overridden; an
    override is an event. Judged against `current`, the state the write's compare-and-swap
    is on, so two racing changes are never both judged against the same before, and
    `observed`, read with it."""
    breaches = judge(
        current, new, alive_states(observed), ctx.settings.budget.budget(), alive_services(observed)
    )
    if not breaches:
        return []
    summary = "; ".join(describe(b) for b in breaches)
    if write.budget_override is None:
        ctx.metrics.budget_refusals.inc()
        raise ApiError(
            409,
            f"refused by the disruption budget: {summary}",
            "budget",
            budget=breaches,
        )
    cause = f"budget overridden: {summary}; reason: {write.budget_override}"
    return [EventDraft("budget-override", "budget", cause, write.author)]


FLOW_SYNC_POLL_S = 0.05


async def _flow_sync_gate(
    ctx: AppContext,
    current: DesiredState,
    new: DesiredState,
    observed: dict[str, NodeObserved],
) -> list[EventDraft]:
    """Before a weight change is stored: wait until every flow-sharing node reports its
    flow tables in sync, at most `flow_sync_bound_s`; the `flow-sync` event says which it
    was (and who was out of sync). A fleet that shares no flows waits for nothing and gets
    no event. `observed` is the first look (read with `current`); each wait reads again."""
    bound = ctx.settings.flow_sync_bound_s
    if bound <= 0 or not flowsync.moves_shares(current, new):
        return []
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        verdict = flowsync.judge(observed, loop.time() - started, bound)
        if verdict.proceed:
            break
        await asyncio.sleep(min(FLOW_SYNC_POLL_S, max(0.0, started + bound - loop.time())))
        observed = await ctx.store.read_observed(datetime.now(UTC))
    if verdict.sync is flowsync.Sync.NOT_SHARING:
        return []
    cause = verdict.describe()
    (log.warning if verdict.sync is flowsync.Sync.BOUND else log.info)("flow-sync: %s", cause)
    return [EventDraft("flow-sync", "fleet", cause, "control-plane")]


async def revisioned_write(
    ctx: AppContext, write: WriteRequest, body: BaseModel | None, mutate: Mutation
) -> JSONResponse:
    if write.if_match is None:
        raise ApiError(
            428, "this write needs If-Match with the revision it is based on", "If-Match"
        )
    write_id = _write_id(write, body)
    # One read of both (one round trip on etcd): the revision the write is on, and the
    # nodes' state the disruption budget and the flow-sync gate judge it by.
    current, observed = await ctx.store.read_state(datetime.now(UTC))
    match = _ETAG.match(write.if_match.strip())
    expected = int(match.group(1)) if match else -1
    if expected != current.revision:
        if write.idempotency_key and current.write_id == write_id:
            return state_response(current)  # our own earlier attempt committed
        if write.idempotency_key and _reused_key(write, write_id, current):
            raise _key_reused()
        return conflict_response(current)
    new, events = mutate(current)
    events = [*events, *_within_budget(ctx, write, current, new, observed)]
    events = [*events, *await _flow_sync_gate(ctx, current, new, observed)]
    new = new.model_copy(update={"write_id": write_id})
    try:
        stored = await ctx.store.write_desired(expected, new, events)
    except RevisionConflict as conflict:
        if write.idempotency_key and _reused_key(write, write_id, conflict.current):
            raise _key_reused() from None
        return conflict_response(conflict.current)
    return state_response(stored)


# --- what each route can answer, for the OpenAPI document ---------------------------------

_WHY = {
    400: "The body is not JSON.",
    401: "No bearer token, or not a known one.",
    403: "The token's role may not do this.",
    404: "No such resource.",
    409: "Refused: it conflicts with the current state, e.g. the disruption budget "
    "(`budget` lists the bounds it would break).",
    412: "If-Match is not the current revision: `current` holds the state someone else wrote.",
    413: "The body is larger than `max_body_bytes`.",
    422: "A field is invalid (named in `field`).",
    426: "The client speaks another node contract version than this API (`contract`).",
    428: "A write without If-Match.",
    503: "The state store is unavailable; retry after Retry-After.",
}
_STRING = {"type": "string"}
_HEADER_DOCS: dict[str, dict[str, Any]] = {
    "ETag": {
        "description": "The desired-state revision this answer reflects; send it as If-Match.",
        "schema": {"type": "string", "pattern": ETAG_PATTERN},
    },
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "string"},
    },
    "WWW-Authenticate": {
        "description": "The scheme to use (Bearer).",
        "schema": {"type": "string"},
    },
}


def _error_doc(status: int) -> dict[str, Any]:
    doc: dict[str, Any] = {"model": Problem, "description": _WHY[status]}
    headers = {412: "ETag", 503: "Retry-After", 401: "WWW-Authenticate"}.get(status)
    if headers:
        doc["headers"] = {headers: {**_HEADER_DOCS[headers], "required": True}}
    return doc


def answers(*statuses: int, etag: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for a route: its error statuses (each with the Problem body) and,
    with `etag`, the ETag header on its 200."""
    docs: dict[int | str, dict[str, Any]] = {s: _error_doc(s) for s in sorted(set(statuses))}
    if etag:
        docs[200] = {"headers": {"ETag": {**_HEADER_DOCS["ETag"], "required": True}}}
    return docs


#: Any authenticated read: bad token, wrong role, a bad parameter, the store down.
READ_ERRORS = (401, 403, 422, 503)
#: Any revisioned write, besides its own 404: 409 is the disruption budget's refusal.
WRITE_ERRORS = (400, 401, 403, 409, 412, 413, 422, 428, 503)
READ_DOCS = answers(*READ_ERRORS)
READ_ONE_DOCS = answers(*READ_ERRORS, 404)
WRITE_DOCS = answers(*WRITE_ERRORS, etag=True)
DELETE_DOCS = answers(*WRITE_ERRORS, 404, etag=True)


def require_site(state: DesiredState | DesiredSpec, site: str, field: str) -> None:
    if site not in state.sites:
        raise ApiError(422, f"unknown site {site!r}", field)


def require_node(state: DesiredState, node: str, field: str) -> None:
    if node not in state.nodes:
        raise ApiError(422, f"unknown node {node!r}", field)


def require_service(state: DesiredState, service: str, field: str) -> None:
    if service not in state.services:
        raise ApiError(422, f"unknown service {service!r}", field)


NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
NamePath = Annotated[str, Path(pattern=NAME_PATTERN, max_length=63)]
