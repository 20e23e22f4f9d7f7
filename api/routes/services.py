"""Services: the anycast prefixes (and ports) the edges announce and serve."""

from __future__ import annotations

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
    revisioned_write,
)
from api.store.base import EventDraft
from contract.schemas import DesiredState, ServiceSpec

router = APIRouter(prefix="/v1/services", tags=["services"])


@router.get("", response_model=dict[str, ServiceSpec], responses=READ_DOCS)
async def list_services(ctx: Ctx, _: Reader) -> dict[str, ServiceSpec]:
    return (await ctx.store.read_desired()).services


@router.put("/{name}", response_model=DesiredState, responses=WRITE_DOCS)
async def put_service(
    ctx: Ctx,
    who: Operator,
    name: NamePath,
    body: ServiceSpec,
    write: Write,
) -> JSONResponse:
    def mutate(state: DesiredState) -> tuple[DesiredState, list[EventDraft]]:
        services = {**state.services, name: body}
        return state.model_copy(update={"services": services}), [
            EventDraft("service-set", name, f"service prefix {body.prefix}", who.name)
        ]

    return await revisioned_write(ctx, write, body, mutate)


@router.delete("/{name}", response_model=DesiredState, responses=DELETE_DOCS)
async def delete_service(
    ctx: Ctx,
    who: Operator,
    name: NamePath,
    write: Write,
) -> JSONResponse:
    def mutate(state: DesiredState) -> tuple[DesiredState, list[EventDraft]]:
        if name not in state.services:
            raise ApiError(404, f"no service {name!r}", "name")
        services = {k: v for k, v in state.services.items() if k != name}
        # Its drains and weights go with it.
        update = {
            "services": services,
            "drains": [d for d in state.drains if d.service != name],
            "service_weights": {k: v for k, v in state.service_weights.items() if k != name},
        }
        return state.model_copy(update=update), [
            EventDraft("service-deleted", name, "service deleted", who.name)
        ]

    return await revisioned_write(ctx, write, None, mutate)
