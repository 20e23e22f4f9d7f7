"""GET /v1/convergence: which nodes have applied the latest desired revision."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter

from api.routes.common import READ_DOCS, Ctx, Reader
from api.views import build_snapshot, convergence_view
from contract.schemas import Convergence

router = APIRouter(prefix="/v1", tags=["convergence"])


@router.get("/convergence", response_model=Convergence, responses=READ_DOCS)
async def convergence(ctx: Ctx, _: Reader) -> Convergence:
    # Fresh reads: applied revisions arrive in heartbeats, which do not invalidate the cache.
    desired, observed = await ctx.store.read_state(datetime.now(UTC))
    return convergence_view(build_snapshot(desired, observed, -1, 0.0))
