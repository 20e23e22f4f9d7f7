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


async def _until(condition: object, what: str) -> None:
    for _ in range(500):  # bounded: 10 s
        if callable(condition) and condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(what)


async def test_pacing_freezes_and_the_full_collection_frees_frozen_cycles() -> None:
    # No automatic collection meanwhile (it could free the young cycle before a tick
    # freezes it); explicit ones, the pacer's included, still run. The full collections
    # are timed by a clock the test moves, so none comes early on a slow machine.
    enabled = gc.isenabled()
    gc.disable()
    now = [0.0]
    pacer = asyncio.create_task(
        gc_pacing.pace(freeze_every_s=0.02, collect_every_s=60.0, clock=lambda: now[0])
    )
    try:
        await _until(lambda: gc.get_freeze_count() > 0, "the pacer never froze")
        cycle = Node()
        cycle.me = cycle
        gone = weakref.ref(cycle)
        del cycle
        # The next tick freezes everything tracked, the cycle included...
        before = gc.get_freeze_count()
        await _until(lambda: gc.get_freeze_count() > before, "no tick froze the cycle")
        gc.collect()  # collects every generation but the permanent one
        assert gone() is not None
        # ...until the periodic full collection thaws and collects everything.
        now[0] = 61.0
        await _until(lambda: gone() is None, "the full collection left the frozen cycle")
    finally:
        pacer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pacer
        if enabled:
            gc.enable()
    assert gc.get_freeze_count() == 0  # nothing left frozen behind the caller
