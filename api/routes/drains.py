"""Drains: take a node or a whole site out of traffic, with a reason and who asked; with a
service, only that service on the node or site."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query
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
    require_service,
    require_site,
    revisioned_write,
)
from api.store.base import EventDraft
from contract.schemas import DesiredState, Drain, DrainKind, DrainRequest

router = APIRouter(prefix="/v1/drains", tags=["drains"])

ServiceQuery = Annotated[
    str | None,
    Query(
        pattern=r"^[a-z0-9][a-z0-9-]{0,62}$",
        max_length=63,
        description="Undrain only this service's drain of the node or site.",
    ),
]


def _target(kind: DrainKind, name: str, service: str | None) -> str:
    return f"{kind} {name!r}" + (f" for service {service!r}" if service else "")


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
        if body.service is not None:
            require_service(state, body.service, "service")
        # Draining again replaces the reason: the latest operator intent is what shows.
        drains = [
            d
            for d in state.drains
            if not (d.kind == body.kind and d.name == body.name and d.service == body.service)
        ]
        drains.append(
            Drain(
                kind=body.kind,
                name=body.name,
                reason=body.reason,
                author=who.name,
                since=datetime.now(UTC),
                service=body.service,
            )
        )
        what = f"service {body.service} on " if body.service else ""
        return state.model_copy(update={"drains": drains}), [
            EventDraft("drain", body.name, f"{what}{body.kind} drained: {body.reason}", who.name)
        ]

    return await revisioned_write(ctx, write, body, mutate)


@router.delete("/{kind}/{name}", response_model=DesiredState, responses=DELETE_DOCS)
async def undrain(
    ctx: Ctx,
    who: Operator,
    kind: DrainKind,
    name: NamePath,
    write: Write,
    service: ServiceQuery = None,
) -> JSONResponse:
    """Ends the drain of the node or site (for all services), or with `service` only that
    service's drain of it: each drain is undone by its own undrain."""

    def mutate(state: DesiredState) -> tuple[DesiredState, list[EventDraft]]:
        drains = [
            d
            for d in state.drains
            if not (d.kind == kind and d.name == name and d.service == service)
        ]
        if len(drains) == len(state.drains):
            raise ApiError(
                404,
                f"{_target(kind, name, service)} is not drained",
                "service" if service else "name",
            )
        what = f"service {service} on " if service else ""
        return state.model_copy(update={"drains": drains}), [
            EventDraft("undrain", name, f"{what}{kind} undrained", who.name)
        ]

    return await revisioned_write(ctx, write, None, mutate)
