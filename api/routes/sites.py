"""Sites: name, capacity and operator weight."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.routes.common import (
    READ_DOCS,
    READ_ONE_DOCS,
    WRITE_DOCS,
    WRITE_ERRORS,
    ApiError,
    Ctx,
    NamePath,
    Operator,
    Reader,
    Write,
    answers,
    revisioned_write,
)
from api.store.base import EventDraft
from contract.schemas import DesiredState, SiteSpec

router = APIRouter(prefix="/v1/sites", tags=["sites"])


@router.get("", response_model=dict[str, SiteSpec], responses=READ_DOCS)
async def list_sites(ctx: Ctx, _: Reader) -> dict[str, SiteSpec]:
    return (await ctx.store.read_desired()).sites


@router.get("/{name}", response_model=SiteSpec, responses=READ_ONE_DOCS)
async def get_site(ctx: Ctx, _: Reader, name: NamePath) -> SiteSpec:
    site = (await ctx.store.read_desired()).sites.get(name)
    if site is None:
        raise ApiError(404, f"no site {name!r}", "name")
    return site


@router.put("/{name}", response_model=DesiredState, responses=WRITE_DOCS)
async def put_site(
    ctx: Ctx,
    who: Operator,
    name: NamePath,
    body: SiteSpec,
    write: Write,
) -> JSONResponse:
    def mutate(state: DesiredState) -> tuple[DesiredState, list[EventDraft]]:
        verb = "updated" if name in state.sites else "created"
        sites = {**state.sites, name: body}
        cause = f"site {verb}: weight {body.weight}, capacity {body.capacity_mbps} Mbit/s"
        return state.model_copy(update={"sites": sites}), [
            EventDraft("site-set", name, cause, who.name)
        ]

    return await revisioned_write(ctx, write, body, mutate)


@router.delete(
    "/{name}",
    response_model=DesiredState,
    responses=answers(*WRITE_ERRORS, 404, 409, etag=True),
)
async def delete_site(
    ctx: Ctx,
    who: Operator,
    name: NamePath,
    write: Write,
) -> JSONResponse:
    def mutate(state: DesiredState) -> tuple[DesiredState, list[EventDraft]]:
        if name not in state.sites:
            raise ApiError(404, f"no site {name!r}", "name")
        members = sorted(n for n, spec in state.nodes.items() if spec.site == name)
        if members:
            raise ApiError(409, f"site {name!r} still has nodes: {', '.join(members)}", "name")
        sites = {k: v for k, v in state.sites.items() if k != name}
        drains = [d for d in state.drains if not (d.kind == "site" and d.name == name)]
        return state.model_copy(update={"sites": sites, "drains": drains}), [
            EventDraft("site-deleted", name, "site deleted", who.name)
        ]

    return await revisioned_write(ctx, write, None, mutate)
