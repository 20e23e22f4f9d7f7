"""api/gc_pacing.py: what survives is frozen each tick (the automatic collector then scans
only what is newer), and cyclic garbage among frozen objects is still collected by the
periodic full collection."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref

from api import gc_pacing


class Node:
    def __init__(self) -> None:
        self.me: Node | None = None


async def test_pacing_freezes_and_the_full_collection_frees_frozen_cycles() -> None:
    # No automatic collection meanwhile (it could free the young cycle before a tick
    # freezes it); explicit ones, the pacer's included, still run.
    enabled = gc.isenabled()
    gc.disable()
    pacer = asyncio.create_task(gc_pacing.pace(freeze_every_s=0.02, collect_every_s=0.5))
    try:
        await asyncio.sleep(0.1)
        assert gc.get_freeze_count() > 0  # the startup heap and every tick's survivors
        cycle = Node()
        cycle.me = cycle
        gone = weakref.ref(cycle)
        del cycle
        # Frozen at the next tick: no automatic collection reaches it any more...
        await asyncio.sleep(0.05)
        gc.collect()  # collects every generation but the permanent one
        assert gone() is not None
        # ...until the periodic full collection thaws and collects everything.
        for _ in range(100):
            if gone() is None:
                break
            await asyncio.sleep(0.02)
        assert gone() is None
    finally:
        pacer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pacer
        if enabled:
            gc.enable()
    assert gc.get_freeze_count() == 0  # nothing left frozen behind the caller
