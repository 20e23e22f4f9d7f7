"""The whole desired state in one document, and its long-poll watch."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from api.routes.common import (
    READ_ERRORS,
    WRITE_DOCS,
    Ctx,
    Operator,
    Reader,
    Write,
    answers,
    require_site,
    revisioned_write,
    state_response,
)
from api.store.base import EventDraft
from contract.schemas import DesiredSpec, DesiredState, DrainKind, ServiceWeights

router = APIRouter(prefix="/v1", tags=["desired state"])
READ_STATE_DOCS = answers(*READ_ERRORS, etag=True)


@router.get("/state", response_model=DesiredState, responses=READ_STATE_DOCS)
async def get_state(ctx: Ctx, _: Reader) -> JSONResponse:
    return state_response(await ctx.store.read_desired())


@router.put("/state", response_model=DesiredState, responses=WRITE_DOCS)
async def put_state(
    ctx: Ctx,
    who: Operator,
    body: DesiredSpec,
    write: Write,
) -> JSONResponse:
    """Replace sites, nodes and services in one revision (declarative apply). Drains and
    per-service weights are kept where their targets still exist."""

    def mutate(state: DesiredState) -> tuple[DesiredState, list[EventDraft]]:
        for name, node in body.nodes.items():
            require_site(body, node.site, f"nodes.{name}.site")
        drains = [
            d
            for d in state.drains
            if (
                (d.kind is DrainKind.NODE and d.name in body.nodes)
                or (d.kind is DrainKind.SITE and d.name in body.sites)
            )
            and (d.service is None or d.service in body.services)
        ]
        service_weights = {}
        for service, own in state.service_weights.items():
            kept = ServiceWeights(
                sites={n: w for n, w in own.sites.items() if n in body.sites},
                nodes={n: w for n, w in own.nodes.items() if n in body.nodes},
            )
            if service in body.services and (kept.sites or kept.nodes):
                service_weights[service] = kept
        cause = (
            f"state applied: {len(body.sites)} sites, {len(body.nodes)} nodes, "
            f"{len(body.services)} services"
        )
        new = state.model_copy(
            update={
                "sites": body.sites,
                "nodes": body.nodes,
                "services": body.services,
                "drains": drains,
                "service_weights": service_weights,
            }
        )
        return new, [EventDraft("state-applied", "state", cause, who.name)]

    return await revisioned_write(ctx, write, body, mutate)


@router.get("/watch", response_model=DesiredState, responses=READ_STATE_DOCS)
async def watch_state(
    ctx: Ctx,
    _: Reader,
    after_revision: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
    timeout_s: Annotated[float, Query(ge=0, le=300)] = 25.0,
) -> JSONResponse:
    """Long-poll: answers as soon as the desired revision is above `after_revision`, or with
    the unchanged state when `timeout_s` (capped by the server) runs out."""
    deadline = time.monotonic() + min(timeout_s, ctx.settings.long_poll_max_s)
    while True:
        generation = ctx.store.changes.generation
        state = (await ctx.snapshots.get()).desired
        remaining = deadline - time.monotonic()
        if state.revision > after_revision or remaining <= 0:
            return state_response(state)
        await ctx.store.changes.wait(generation, remaining)
