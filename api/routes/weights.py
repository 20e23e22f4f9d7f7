"""Operator weights (several sites and nodes in one revision) and the effective weights."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.routes.common import (
    READ_DOCS,
    WRITE_DOCS,
    Ctx,
    Operator,
    Reader,
    Write,
    require_node,
    require_site,
    revisioned_write,
)
from api.store.base import EventDraft
from api.views import weights_view
from contract.schemas import DesiredState, EffectiveWeights, WeightsUpdate

router = APIRouter(prefix="/v1", tags=["weights"])


@router.put("/weights", response_model=DesiredState, responses=WRITE_DOCS)
async def set_weights(
    ctx: Ctx,
    who: Operator,
    body: WeightsUpdate,
    write: Write,
) -> JSONResponse:
    def mutate(state: DesiredState) -> tuple[DesiredState, list[EventDraft]]:
        events: list[EventDraft] = []
        sites = dict(state.sites)
        for name, weight in body.sites.items():
            require_site(state, name, f"sites.{name}")
            events.append(
                EventDraft(
                    "weight", name, f"site weight {sites[name].weight} -> {weight}", who.name
                )
            )
            sites[name] = sites[name].model_copy(update={"weight": weight})
        nodes = dict(state.nodes)
        for name, weight in body.nodes.items():
            require_node(state, name, f"nodes.{name}")
            events.append(
                EventDraft(
                    "weight", name, f"node weight {nodes[name].weight} -> {weight}", who.name
                )
            )
            nodes[name] = nodes[name].model_copy(update={"weight": weight})
        return state.model_copy(update={"sites": sites, "nodes": nodes}), events

    return await revisioned_write(ctx, write, body, mutate)


@router.get("/effective-weights", response_model=EffectiveWeights, responses=READ_DOCS)
async def get_effective_weights(ctx: Ctx, _: Reader) -> EffectiveWeights:
    return weights_view(await ctx.snapshots.get())
