"""GET /v1/status: the control plane's own state (fail-open scopes among it)."""

from __future__ import annotations

from fastapi import APIRouter

from api.routes.common import READ_DOCS, Ctx, Reader
from contract.schemas import ApiStatus, HeldScope

router = APIRouter(prefix="/v1", tags=["status"])


@router.get("/status", response_model=ApiStatus, responses=READ_DOCS)
async def api_status(ctx: Ctx, _: Reader) -> ApiStatus:
    snapshot = await ctx.snapshots.get()  # builds (and so decides) if the view moved
    return ApiStatus(
        revision=snapshot.desired.revision,
        up_s=round(ctx.fail_open.up_s(), 3),
        fail_open=[
            HeldScope(
                scope=v.scope,
                trust=str(v.trust),
                alive=v.alive,
                reported=v.reported,
                detail=v.describe(),
            )
            for v in ctx.fail_open.decision.scopes
        ],
    )
