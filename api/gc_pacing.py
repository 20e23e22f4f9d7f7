"""Garbage-collector pacing for a long-running asyncio process (the API; the benchmark's
load generator).

Why: CPython's cyclic collector scans every tracked object of a generation. The API holds
about forty per open keep-alive connection (uvicorn's protocol, parser, flow control,
timers), plus each node's records and views: at a thousand nodes heartbeating over a
thousand connections, about 65,000 objects besides the ~80,000 of the imported code. A
full collection of those took 40-115 ms on this project's 2-core machine, and at the default
thresholds one came every ~2 s: the heartbeats that arrived meanwhile waited, and that
pause *was* the heartbeat latency's p99 (measured with gc.callbacks, issue 15).

What: `pace` moves everything that survived into the permanent generation once a second
(`gc.freeze()`, a constant-time list splice), so the automatic collections only ever see
the last second's objects (a few thousand; well under a millisecond). Objects frozen are
still freed by reference counting the moment they are unreferenced; only garbage *cycles*
among them wait, until the next full collection: every `collect_every_s` the permanent
generation is thawed and collected once (one pause of the old size, once a minute instead
of every two seconds). Memory held by cyclic garbage is so bounded by a minute of it.

Raising the young-generation threshold instead was measured too and is worse: each young
collection then scans tens of thousands of objects (20-35 ms each, a 150 ms middle one).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

FREEZE_EVERY_S = 1.0
COLLECT_EVERY_S = 60.0


def full_collection() -> float:
    """Thaw the permanent generation and collect everything; the pause, in seconds."""
    started = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    return time.perf_counter() - started


async def pace(
    freeze_every_s: float = FREEZE_EVERY_S,
    collect_every_s: float = COLLECT_EVERY_S,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Run until cancelled (then thaws, so nothing stays frozen behind the caller). `clock`
    times the full collections (a test moves it)."""
    pause = full_collection()
    last_full = clock()
    gc.freeze()
    log.debug("gc pacing on: startup collection %.1f ms", pause * 1000)
    try:
        while True:
            await asyncio.sleep(freeze_every_s)
            if clock() - last_full >= collect_every_s:
                pause = full_collection()
                last_full = clock()
                log.debug("gc: full collection %.1f ms", pause * 1000)
            gc.freeze()
    finally:
        gc.unfreeze()
