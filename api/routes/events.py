"""The event log: every desired change and every observed transition, with cause and author."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query

from api.routes.common import READ_DOCS, Ctx, Reader
from contract.schemas import EventPage

router = APIRouter(prefix="/v1/events", tags=["events"])


@router.get("", response_model=EventPage, responses=READ_DOCS)
async def list_events(
    ctx: Ctx,
    _: Reader,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(pattern=r"^\d{16}\.\d{2}$")] = None,
    wait_s: Annotated[float, Query(ge=0, le=300)] = 0,
) -> EventPage:
    """The last `limit` events, or those after the id `after` (for `--follow`: pass the last
    id seen and `wait_s` to long-poll until there is something new)."""
    deadline = time.monotonic() + min(wait_s, ctx.settings.long_poll_max_s)
    while True:
        generation = ctx.store.changes.generation
        events = await ctx.store.list_events(limit, after)
        remaining = deadline - time.monotonic()
        if events or after is None or remaining <= 0:
            return EventPage(events=events)
        await ctx.store.changes.wait(generation, min(remaining, 1.0))
