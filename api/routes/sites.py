"""Sites: name, capacity and operator weight."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.routes.common import (
    ApiError,
    Ctx,
    NamePath,
    Operator,
    Reader,
    Write,
    revisioned_write,
)
from api.store.base import EventDraft
from contract.schemas import DesiredState, SiteSpec

router = APIRouter(prefix="/v1/sites", tags=["sites"])


@router.get("", response_model=dict[str, SiteSpec])
async def list_sites(ctx: Ctx, _: Reader) -> dict[str, SiteSpec]:
    return (await ctx.store.read_desired()).sites


@router.get("/{name}", response_model=SiteSpec)
async def get_site(ctx: Ctx, _: Reader, name: NamePath) -> SiteSpec:
    site = (await ctx.store.read_desired()).sites.get(name)
    if site is None:
        raise ApiError(404, f"no site {name!r}", "name")
    return site


@router.put("/{name}", response_model=DesiredState, responses={412: {}, 428: {}})
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


@router.delete("/{name}", response_model=DesiredState, responses={412: {}, 428: {}})
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
