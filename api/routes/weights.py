"""Operator weights (several sites and nodes in one revision) and the effective weights."""

from __future__ import annotations

from collections.abc import Callable, Mapping

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
    require_service,
    require_site,
    revisioned_write,
)
from api.store.base import EventDraft
from api.views import weights_view
from contract.schemas import (
    DesiredState,
    EffectiveWeights,
    NodeSpec,
    ServiceWeights,
    SiteSpec,
    WeightsUpdate,
)

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
        service_weights = dict(state.service_weights)
        for service, wanted in body.services.items():
            require_service(state, service, f"services.{service}")
            own = service_weights.get(service, ServiceWeights())
            own_sites = _set_own(
                "site", service, wanted.sites, own.sites, sites, require_site, state, events
            )
            own_nodes = _set_own(
                "node", service, wanted.nodes, own.nodes, nodes, require_node, state, events
            )
            if own_sites or own_nodes:
                service_weights[service] = ServiceWeights(sites=own_sites, nodes=own_nodes)
            else:
                service_weights.pop(service, None)
        update = {"sites": sites, "nodes": nodes, "service_weights": service_weights}
        return state.model_copy(update=update), events

    def _set_own(
        kind: str,
        service: str,
        wanted: Mapping[str, int | None],
        own: Mapping[str, int],
        specs: Mapping[str, SiteSpec | NodeSpec],
        require: Callable[[DesiredState, str, str], None],
        state: DesiredState,
        events: list[EventDraft],
    ) -> dict[str, int]:
        """The service's own weights of sites (or nodes) after the update; null clears one."""
        result = dict(own)
        for name, weight in wanted.items():
            require(state, name, f"services.{service}.{kind}s.{name}")
            before = result.get(name, specs[name].weight)
            if weight is None:
                result.pop(name, None)
                after = f"{specs[name].weight} (the {kind}'s own)"
            else:
                result[name] = weight
                after = str(weight)
            cause = f"{kind} weight for service {service} {before} -> {after}"
            events.append(EventDraft("weight", name, cause, who.name))
        return result

    return await revisioned_write(ctx, write, body, mutate)


@router.get("/effective-weights", response_model=EffectiveWeights, responses=READ_DOCS)
async def get_effective_weights(ctx: Ctx, _: Reader) -> EffectiveWeights:
    return weights_view(await ctx.snapshots.get())
