"""bgp.exabgp.LoopWatchdog: a stalled event loop is noticed from another thread."""

from __future__ import annotations

import asyncio
import threading
import time

from bgp.exabgp import LoopWatchdog


async def test_stall_fires_once_and_a_healthy_loop_never() -> None:
    fired = threading.Event()
    calls: list[float] = []

    def on_stall() -> None:
        calls.append(time.monotonic())
        fired.set()

    watchdog = LoopWatchdog(0.2, on_stall)
    watchdog.start()
    try:
        await asyncio.sleep(0.6)  # a loop that keeps beating
        assert calls == []
        time.sleep(0.8)  # noqa: ASYNC251 - the stall under test
        assert fired.is_set()  # fired while the loop was still blocked
        await asyncio.sleep(0.2)
        assert len(calls) == 1 and watchdog.stalls == 1
    finally:
        watchdog.stop()
