"""A small HTTP/1.1 backend that names itself (tests, demo, lab); keeps connections alive.

Run as a process (`python -m deploy.backend.named_backend --port P --name N`)
so that a test or chaos run can really kill it. Paths:
  /                 200, body "<name>\n"
  /health           200 unless a file named by --fail-file exists (then 503)
  /status/NNN       that status
  /slow/MS          answers after MS milliseconds
  /bytes/N          N bytes, Content-Length
  /chunked/N        N chunks of "<name>\n", chunked
  /eof/N            N bytes delimited by closing the connection
  /echo             the request body back (any method)
  /headers          the request headers it received, one per line
  /hop              a response carrying hop-by-hop headers
  /upgrade          with `Upgrade: echo`: 101, then echoes every byte (a WebSocket stand-in);
                    any other path refuses an upgrade with a plain 200 and closes
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path

import httptools


class BackendProtocol(asyncio.Protocol):
    def __init__(self, name: str, fail_file: Path | None) -> None:
        self.name = name.encode()
        self.fail_file = fail_file
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.method = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.echoing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.echoing:
            if self.transport is not None:
                self.transport.write(data)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # Protocol "echo": 101, then every byte comes back (bytes already sent too).
            if self.transport is not None and self.url.startswith(b"/upgrade"):
                self.transport.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\n"
                    b"Connection: Upgrade\r\nX-Backend: %b\r\n\r\n" % self.name
                )
                self.echoing = True
                self.transport.write(data[upgrade.args[0] :])
            elif self.transport is not None:
                self.send(200, b"no upgrade here\n", keep_alive=False)
        except httptools.HttpParserError:
            if self.transport:
                self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.parser.should_upgrade():
            return  # answered in data_received, where the parser stops
        self.method = self.parser.get_method()
        keep_alive = self.parser.should_keep_alive()
        headers = b"".join(b"%b: %b\n" % h for h in self.headers)
        asyncio.get_running_loop().create_task(
            self.respond(self.url, b"".join(self.body), keep_alive, headers)
        )

    def send(self, status: int, body: bytes, keep_alive: bool, extra: bytes = b"") -> None:
        if self.transport is None or self.transport.is_closing():
            return
        head = b"HTTP/1.1 %d X\r\nContent-Type: text/plain\r\nX-Backend: %b\r\n%b" % (
            status,
            self.name,
            extra,
        )
        if self.method == b"HEAD":
            head += b"Content-Length: %d\r\n" % len(body)
            body = b""
        else:
            head += b"Content-Length: %d\r\n" % len(body)
        if not keep_alive:
            head += b"Connection: close\r\n"
        self.transport.write(head + b"\r\n" + body)
        if not keep_alive:
            self.transport.close()

    async def respond(self, url: bytes, body: bytes, keep_alive: bool, headers: bytes) -> None:
        path = url.split(b"?")[0].decode()
        parts = path.strip("/").split("/")
        if path == "/":
            self.send(200, self.name + b"\n", keep_alive)
        elif path == "/health":
            failing = self.fail_file is not None and self.fail_file.exists()
            self.send(503 if failing else 200, b"ok\n", keep_alive)
        elif parts[0] == "status":
            self.send(int(parts[1]), self.name + b"\n", keep_alive)
        elif parts[0] == "slow":
            await asyncio.sleep(int(parts[1]) / 1000)
            self.send(200, self.name + b"\n", keep_alive)
        elif parts[0] == "bytes":
            self.send(200, b"x" * int(parts[1]), keep_alive)
        elif parts[0] == "headers":
            self.send(200, headers, keep_alive)
        elif parts[0] == "hop":
            self.send(
                200,
                b"hop\n",
                keep_alive,
                b"Connection: X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\n",
            )
        elif parts[0] == "echo":
            self.send(200, body, keep_alive)
        elif parts[0] == "chunked" and self.transport is not None:
            chunk = self.name + b"\n"
            out = [
                b"HTTP/1.1 200 OK\r\nX-Backend: %b\r\nTransfer-Encoding: chunked\r\n\r\n"
                % self.name
            ]
            for _ in range(int(parts[1])):
                out.append(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            out.append(b"0\r\n\r\n")
            self.transport.write(b"".join(out))
        elif parts[0] == "eof" and self.transport is not None:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nX-Backend: %b\r\nConnection: close\r\n\r\n" % self.name
            )
            self.transport.write(b"y" * int(parts[1]))
            self.transport.close()
        else:
            self.send(404, b"not found\n", keep_alive)


async def serve(host: str, port: int, name: str, fail_file: Path | None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: BackendProtocol(name, fail_file), host, port, reuse_address=True
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print(f"ready {os.getpid()}", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--fail-file", type=Path)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.name, args.fail_file))


if __name__ == "__main__":
    main()
