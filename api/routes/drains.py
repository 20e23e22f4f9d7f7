"""Drains: take a node or a whole site out of traffic, with a reason and who asked."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.routes.common import (
    DELETE_DOCS,
    READ_DOCS,
    WRITE_DOCS,
    ApiError,
    Ctx,
    NamePath,
    Operator,
    Reader,
    Write,
    require_node,
    require_site,
    revisioned_write,
)
from api.store.base import EventDraft
from contract.schemas import DesiredState, Drain, DrainKind, DrainRequest

router = APIRouter(prefix="/v1/drains", tags=["drains"])


@router.get("", response_model=list[Drain], responses=READ_DOCS)
async def list_drains(ctx: Ctx, _: Reader) -> list[Drain]:
    return (await ctx.store.read_desired()).drains


@router.post("", response_model=DesiredState, responses=WRITE_DOCS)
async def drain(
    ctx: Ctx,
    who: Operator,
    body: DrainRequest,
    write: Write,
) -> JSONResponse:
    def mutate(state: DesiredState) -> tuple[DesiredState, list[EventDraft]]:
        if body.kind is DrainKind.NODE:
            require_node(state, body.name, "name")
        else:
            require_site(state, body.name, "name")
        # Draining again replaces the reason: the latest operator intent is what shows.
        drains = [d for d in state.drains if not (d.kind == body.kind and d.name == body.name)]
        drains.append(
            Drain(
                kind=body.kind,
                name=body.name,
                reason=body.reason,
                author=who.name,
                since=datetime.now(UTC),
            )
        )
        return state.model_copy(update={"drains": drains}), [
            EventDraft("drain", body.name, f"{body.kind} drained: {body.reason}", who.name)
        ]

    return await revisioned_write(ctx, write, body, mutate)


@router.delete("/{kind}/{name}", response_model=DesiredState, responses=DELETE_DOCS)
async def undrain(
    ctx: Ctx,
    who: Operator,
    kind: DrainKind,
    name: NamePath,
    write: Write,
) -> JSONResponse:
    def mutate(state: DesiredState) -> tuple[DesiredState, list[EventDraft]]:
        drains = [d for d in state.drains if not (d.kind == kind and d.name == name)]
        if len(drains) == len(state.drains):
            raise ApiError(404, f"{kind} {name!r} is not drained", "name")
        return state.model_copy(update={"drains": drains}), [
            EventDraft("undrain", name, f"{kind} undrained", who.name)
        ]

    return await revisioned_write(ctx, write, None, mutate)
