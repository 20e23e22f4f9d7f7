"""`make bench-soak`: many short flows with every close pattern, then count what is left.

100,000 L4 and 100,000 L7 flows (SOAK_FLOWS) through the real agent to two
script backends (a subprocess of this module), with mixed close patterns:

- L4: client FIN first; backend FIN first, then client data and FIN (half-close
  with data after it); client RST; backend RST; client FIN then backend RST.
- L7: keep-alive requests then a client close; `Connection: close`; a client RST
  before reading the answer; a backend that closes without answering (502);
  a client half-close after its request.

Before and after each phase: the agent's open fds (/proc/PID/fd), its flow table
(/status) and its RSS. Target: fds back to baseline, RSS growth under 5 MB.
Bounded: SOAK_MAX_SECONDS per phase (default 150), loopback only. About 2,000
flows a second per listener on this 2-core machine when it is quiet.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from bench.proxy import LOAD_CORE, ROOT, Lab, free_port, rss_mb, wait_port

FLOWS = int(os.environ.get("SOAK_FLOWS", "100000"))
MAX_SECONDS = float(os.environ.get("SOAK_MAX_SECONDS", "150"))
CONCURRENCY = int(os.environ.get("SOAK_CONCURRENCY", "64"))
WARMUP = 1000
LINGER_RST = struct.pack("ii", 1, 0)


# -- the backend (a subprocess: `python -m bench.soak backend PORT`) --------------------
class ScriptBackend(asyncio.Protocol):
    """HTTP when the first bytes are a request, else an L4 command line."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.mode = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        transport = self.transport
        assert transport is not None
        if self.mode == "echo":
            return
        if self.buf.startswith((b"GET ", b"POST")):
            while (end := self.buf.find(b"\r\n\r\n")) >= 0:
                head, self.buf = self.buf[:end], self.buf[end + 4 :]
                if head.startswith(b"GET /close "):
                    transport.close()
                    return
                transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            return
        if b"\n" not in self.buf:
            return
        command, _, self.buf = self.buf.partition(b"\n")
        self.mode = command.decode()
        if self.mode == "fin":
            transport.write(b"bye")
            transport.write_eof()
        elif self.mode == "rst":
            transport.write(b"x")
            self._reset()

    def _reset(self) -> None:
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        self.transport.abort()

    def eof_received(self) -> bool:
        assert self.transport is not None
        if self.mode == "echo":
            self.transport.write(b"got " + self.buf)
            self.transport.write_eof()
            return True
        if self.mode == "rstfin":
            self._reset()
            return True
        return False


async def serve_backend(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(ScriptBackend, "127.0.0.1", port, backlog=4096)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


# -- the client side -------------------------------------------------------------------
def _rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    writer.transport.abort()


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    with contextlib.suppress(ConnectionError):
        return await reader.read()
    return b""


async def _send_then_read_to_end(port: int, data: bytes, *, fin: bool) -> None:
    """Send `data` (then a FIN when `fin`), read until the other side closes, close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    if fin:
        writer.write_eof()
    await _read_all(reader)
    writer.close()


async def _send_then_rst(port: int, data: bytes) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await asyncio.sleep(0)
    _rst(writer)


async def l4_client_fin_first(port: int) -> None:
    await _send_then_read_to_end(port, b"echo\nhello", fin=True)


async def l4_backend_fin_first(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"fin\n")
    await _read_all(reader)
    writer.write(b"data after the backend's FIN")
    writer.write_eof()
    writer.close()


async def l4_client_rst(port: int) -> None:
    await _send_then_rst(port, b"hold\nsome")


async def l4_backend_rst(port: int) -> None:
    await _send_then_read_to_end(port, b"rst\n", fin=False)


async def l4_client_fin_backend_rst(port: int) -> None:
    await _send_then_read_to_end(port, b"rstfin\n", fin=True)


GET = b"GET / HTTP/1.1\r\nHost: soak\r\n\r\n"


async def l7_keep_alive_then_close(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(3):
        writer.write(GET)
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)
    writer.close()


async def l7_connection_close(port: int) -> None:
    request = b"GET / HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n"
    await _send_then_read_to_end(port, request, fin=False)


async def l7_client_rst(port: int) -> None:
    await _send_then_rst(port, GET)


async def l7_backend_closes(port: int) -> None:
    request = b"GET /close HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n"
    await _send_then_read_to_end(port, request, fin=False)


async def l7_half_close(port: int) -> None:
    await _send_then_read_to_end(port, GET, fin=True)


L4_PATTERNS = [
    l4_client_fin_first,
    l4_backend_fin_first,
    l4_client_rst,
    l4_backend_rst,
    l4_client_fin_backend_rst,
]
L7_PATTERNS = [
    l7_keep_alive_then_close,
    l7_connection_close,
    l7_client_rst,
    l7_backend_closes,
    l7_half_close,
]


async def drive(
    port: int, patterns: Sequence[Callable[[int], Awaitable[None]]], flows: int, limit: float
) -> tuple[int, int, float]:
    """Run `flows` flows, the patterns in turn, CONCURRENCY at once; (done, errors, seconds)."""
    started = time.monotonic()
    deadline = started + limit
    next_flow = 0
    done = errors = 0

    async def worker() -> None:
        nonlocal next_flow, done, errors
        while next_flow < flows and time.monotonic() < deadline:
            pattern = patterns[next_flow % len(patterns)]
            next_flow += 1
            try:
                async with asyncio.timeout(10):
                    await pattern(port)
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                errors += 1
            done += 1

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return done, errors, time.monotonic() - started


def agent_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


#: Idle pooled upstream connections close after this (node.yaml timeouts.upstream_idle):
#: the soak waits it out, so "after" counts leaks, not the keep-alive pool doing its job.
UPSTREAM_IDLE_S = 2.0


def settled(pid: int, status_url: str) -> tuple[int, int]:
    """(open fds, open flows) once the flow table is empty and idle pooled upstream
    connections have timed out (polled, bounded)."""
    deadline = time.monotonic() + 15
    flows = -1
    while time.monotonic() < deadline:
        flows = httpx.get(status_url, timeout=2).json()["flows"]["open"]
        if flows == 0:
            break
        time.sleep(0.1)
    # Idle pooled upstream connections close, and the active checks' own short
    # connections come and go.
    time.sleep(UPSTREAM_IDLE_S + 1.5)
    return min(agent_fds(pid) for _ in range(20)), flows


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "backend":
        asyncio.run(serve_backend(int(sys.argv[2])))
        return 0
    console = Console()
    results: dict[str, float | int] = {}
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp_dir:
        lab = Lab(Path(tmp_dir))
        try:
            ports = [free_port(), free_port()]
            for port in ports:
                lab.spawn(
                    [sys.executable, "-m", "bench.soak", "backend", str(port)], LOAD_CORE, cwd=ROOT
                )
                wait_port(port)
            l7_port, l4_port, status_url, agent = lab.agent(
                ports, timeouts={"upstream_idle": UPSTREAM_IDLE_S}
            )
            pid = agent.pid
            for name, port, patterns in (
                ("l4", l4_port, L4_PATTERNS),
                ("l7", l7_port, L7_PATTERNS),
            ):
                asyncio.run(drive(port, patterns, WARMUP, MAX_SECONDS))
                fds_before, _ = settled(pid, status_url)
                if name == "l4":
                    results["rss_mb_before"] = round(rss_mb(pid), 1)
                done, errors, seconds = asyncio.run(drive(port, patterns, FLOWS, MAX_SECONDS))
                gc.collect()
                fds_after, flows_after = settled(pid, status_url)
                results |= {
                    f"{name}_flows": done,
                    f"{name}_client_errors": errors,
                    f"{name}_seconds": round(seconds, 1),
                    f"{name}_fds_before": fds_before,
                    f"{name}_fds_after": fds_after,
                    f"{name}_open_flows_after": flows_after,
                }
            results["rss_mb_after"] = round(rss_mb(pid), 1)
        finally:
            lab.close()
    table = Table(title=f"bench-soak: {FLOWS:,} flows per listener, {CONCURRENCY} at once")
    for column in ("listener", "flows", "s", "open fds before", "open fds after", "flows after"):
        table.add_column(column, justify="right")
    for name in ("l4", "l7"):
        table.add_row(
            name.upper(),
            f"{results[f'{name}_flows']:,}",
            str(results[f"{name}_seconds"]),
            str(results[f"{name}_fds_before"]),
            str(results[f"{name}_fds_after"]),
            str(results[f"{name}_open_flows_after"]),
        )
    console.print(table)
    console.print(
        f"agent RSS: {results['rss_mb_before']} MB before, {results['rss_mb_after']} MB after"
    )
    out = ROOT / "bench-results" / "soak.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
