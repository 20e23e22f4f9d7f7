"""Active health checks: the probes (TCP connect, HTTP GET) and their schedule.

Thin driver: a probe says passed or failed with a detail; the rise/fall
verdict is `edge.health.RiseFall`'s, applied by the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from edge.config import ActiveCheckConfig, CheckKind
from edge.proxy.common import connected_socket

log = logging.getLogger(__name__)

# (backend name, passed, detail)
CheckResult = Callable[[str, bool, str], None]


async def probe(
    address: str, port: int, cfg: ActiveCheckConfig, vrf: str | None = None
) -> tuple[bool, str]:
    """One check of one backend (IPv4 or IPv6; through the service's VRF, if any); never
    raises."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(cfg.timeout):
            if vrf is None:
                reader, writer = await asyncio.open_connection(address, port)
            else:
                sock = await connected_socket(address, port, vrf)
                reader, writer = await asyncio.open_connection(sock=sock)
            if cfg.kind is CheckKind.TCP:
                return True, "connect ok"
            host = cfg.host or (f"[{address}]:{port}" if ":" in address else f"{address}:{port}")
            writer.write(
                f"GET {cfg.path} HTTP/1.1\r\nHost: {host}\r\n"
                "User-Agent: anycast-edge-health\r\nConnection: close\r\n\r\n".encode()
            )
            status_line = await reader.readline()
    except TimeoutError:
        return False, f"timed out after {cfg.timeout:g}s"
    except OSError as error:
        return False, error.strerror or str(error)
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(0.1):
                    await writer.wait_closed()
    parts = status_line.split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return False, "not an HTTP response"
    status = int(parts[1])
    if status != cfg.expect_status:
        return False, f"HTTP {status}, expected {cfg.expect_status}"
    return True, f"HTTP {status}"


class HealthChecker:
    """One loop per backend, probing every `interval`."""

    def __init__(self, on_result: CheckResult, vrf: str | None = None) -> None:
        self._on_result = on_result
        self._vrf = vrf
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._targets: dict[str, tuple[str, int, ActiveCheckConfig]] = {}

    def set_targets(self, targets: dict[str, tuple[str, int, ActiveCheckConfig]]) -> None:
        """Start, restart or stop loops so that exactly `targets` are probed."""
        for name in list(self._tasks):
            if targets.get(name) != self._targets.get(name):
                self._tasks.pop(name).cancel()
        self._targets = dict(targets)
        for name, (address, port, cfg) in targets.items():
            if name not in self._tasks:
                self._tasks[name] = asyncio.get_running_loop().create_task(
                    self._loop(name, address, port, cfg), name=f"check-{name}"
                )

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self, name: str, address: str, port: int, cfg: ActiveCheckConfig) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            passed, detail = await probe(address, port, cfg, self._vrf)
            try:
                self._on_result(name, passed, detail)
            except Exception:
                log.exception("health result handler failed for %s", name)
            await asyncio.sleep(max(0.0, cfg.interval - (loop.time() - started)))
