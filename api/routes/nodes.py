"""Nodes: site, addresses, capacity and operator weight; and what they report (observed)."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.routes.common import (
    DELETE_DOCS,
    READ_DOCS,
    READ_ONE_DOCS,
    WRITE_DOCS,
    ApiError,
    Ctx,
    NamePath,
    Operator,
    Reader,
    Write,
    require_site,
    revisioned_write,
)
from api.store.base import EventDraft
from api.views import build_snapshot, observed_view
from contract.schemas import DesiredState, NodeObserved, NodeSpec

router = APIRouter(prefix="/v1", tags=["nodes"])


@router.get("/nodes", response_model=dict[str, NodeSpec], responses=READ_DOCS)
async def list_nodes(ctx: Ctx, _: Reader) -> dict[str, NodeSpec]:
    return (await ctx.store.read_desired()).nodes


@router.get("/nodes/{name}", response_model=NodeSpec, responses=READ_ONE_DOCS)
async def get_node(ctx: Ctx, _: Reader, name: NamePath) -> NodeSpec:
    node = (await ctx.store.read_desired()).nodes.get(name)
    if node is None:
        raise ApiError(404, f"no node {name!r}", "name")
    return node


@router.put("/nodes/{name}", response_model=DesiredState, responses=WRITE_DOCS)
async def put_node(
    ctx: Ctx,
    who: Operator,
    name: NamePath,
    body: NodeSpec,
    write: Write,
) -> JSONResponse:
    def mutate(state: DesiredState) -> tuple[DesiredState, list[EventDraft]]:
        require_site(state, body.site, "site")
        verb = "updated" if name in state.nodes else "created"
        nodes = {**state.nodes, name: body}
        cause = f"node {verb}: site {body.site}, weight {body.weight}"
        return state.model_copy(update={"nodes": nodes}), [
            EventDraft("node-set", name, cause, who.name)
        ]

    return await revisioned_write(ctx, write, body, mutate)


@router.delete("/nodes/{name}", response_model=DesiredState, responses=DELETE_DOCS)
async def delete_node(
    ctx: Ctx,
    who: Operator,
    name: NamePath,
    write: Write,
) -> JSONResponse:
    def mutate(state: DesiredState) -> tuple[DesiredState, list[EventDraft]]:
        if name not in state.nodes:
            raise ApiError(404, f"no node {name!r}", "name")
        nodes = {k: v for k, v in state.nodes.items() if k != name}
        drains = [d for d in state.drains if not (d.kind == "node" and d.name == name)]
        return state.model_copy(update={"nodes": nodes, "drains": drains}), [
            EventDraft("node-deleted", name, "node deleted", who.name)
        ]

    return await revisioned_write(ctx, write, None, mutate)


async def _fresh_observed(ctx: Ctx) -> list[NodeObserved]:
    # Not the cached snapshot: heartbeats that change nothing but last_seen or the applied
    # revision do not bump the change generation, and these reads must show them.
    desired, observed = await ctx.store.read_state(datetime.now(UTC))
    return observed_view(build_snapshot(desired, observed, -1, 0.0))


@router.get(
    "/observed",
    response_model=list[NodeObserved],
    tags=["observed"],
    responses=READ_DOCS,
)
async def list_observed(ctx: Ctx, _: Reader) -> list[NodeObserved]:
    return await _fresh_observed(ctx)


@router.get(
    "/nodes/{name}/observed",
    response_model=NodeObserved,
    tags=["observed"],
    responses=READ_ONE_DOCS,
)
async def get_observed(ctx: Ctx, _: Reader, name: NamePath) -> NodeObserved:
    for observed in await _fresh_observed(ctx):
        if observed.node == name:
            return observed
    raise ApiError(404, f"no node {name!r}", "name")
