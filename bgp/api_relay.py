"""The process ExaBGP runs as its API helper: relays ExaBGP's stdin/stdout to the agent's
unix socket, and is the dead-man switch that lives outside the agent's process.

No files are polled: ExaBGP writes JSON to our stdin and reads commands from our stdout;
the agent owns the other end of the socket.

Dead-man switches here:
- Either side closing ends the relay. ExaBGP runs with `exabgp.api.terminate=true`, so a
  relay that ends (the agent died or closed the socket) takes ExaBGP down with it, its TCP
  sessions close, and the routers drop the routes.
- Liveness beats: the agent's event loop writes `#beat` every 100-200 ms. When no beat
  came for `--deadman-ms`, the relay itself tells ExaBGP `clear adj-rib out` (every route
  withdrawn from every peer, sessions kept up) and tells the agent `#deadman fired`; a
  frozen agent (SIGSTOP, a GC pause, a blocked loop, a stalled disk write) cannot stop
  this process from doing so. When the agent wakes it reads that line and re-announces
  from its own state, which is whatever its health allows by then.

ExaBGP acknowledges every command (`done`/`error`) in order; the relay remembers which
commands it injected and swallows their acknowledgements, so the agent's own count of
acks stays right.

Standard library only, and no import of the `bgp` package, so it starts fast.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import select
import socket
import sys
import time

BEAT = b"#beat"
FIRED = b"#deadman fired"
WITHDRAW_ALL = b"clear adj-rib out"
ACKS = (b"done", b"error")


class Relay:
    """One select() loop: agent socket <-> ExaBGP pipes, plus the dead-man deadline."""

    def __init__(
        self, sock: socket.socket, from_exabgp: int, to_exabgp: int, deadman_s: float
    ) -> None:
        self.sock = sock
        self.from_exabgp = from_exabgp
        self.to_exabgp = to_exabgp
        self.deadman_s = deadman_s
        self.last_beat = time.monotonic()
        self.fired = False
        # Who sent each command ExaBGP has not acknowledged yet: True = the relay.
        self.origins: collections.deque[bool] = collections.deque()
        self.to_agent = bytearray()
        self.to_exa = bytearray()
        self._from_agent = bytearray()
        self._from_exa = bytearray()

    def _agent_line(self, line: bytes) -> None:
        if line.strip() == BEAT:
            self.last_beat = time.monotonic()
            self.fired = False
            return
        self.origins.append(False)
        self.to_exa += line + b"\n"

    def _exabgp_line(self, line: bytes) -> None:
        if line.strip() in ACKS and self.origins and self.origins.popleft():
            return  # the ack of our own withdraw-all
        self.to_agent += line + b"\n"

    def _fire(self, silent_s: float) -> None:
        self.fired = True
        self.origins.append(True)
        # Queued behind any older command from the agent, so it wins over them.
        self.to_exa += WITHDRAW_ALL + b"\n"
        # When (CLOCK_MONOTONIC is one clock for every process of the host): the agent
        # reports it, so the dead-man's own share of a withdraw can be measured.
        self.to_agent += FIRED + f" {silent_s * 1000:.0f} {time.monotonic():.6f}\n".encode()

    @staticmethod
    def _lines(buffer: bytearray, data: bytes) -> list[bytes]:
        buffer += data
        *lines, rest = bytes(buffer).split(b"\n")
        buffer[:] = rest
        return lines

    def run(self) -> None:
        sock_fd = self.sock.fileno()
        self.sock.setblocking(False)
        os.set_blocking(self.to_exabgp, False)
        while True:
            timeout = None
            if self.deadman_s > 0 and not self.fired:
                timeout = max(0.0, self.last_beat + self.deadman_s - time.monotonic())
            pending = ((sock_fd, self.to_agent), (self.to_exabgp, self.to_exa))
            writers = [fd for fd, buffer in pending if buffer]
            readable, writable, _ = select.select([sock_fd, self.from_exabgp], writers, [], timeout)
            if sock_fd in readable:
                data = self.sock.recv(65536)
                if not data:
                    return
                for line in self._lines(self._from_agent, data):
                    self._agent_line(line)
            if self.from_exabgp in readable:
                data = os.read(self.from_exabgp, 65536)
                if not data:
                    return
                for line in self._lines(self._from_exa, data):
                    self._exabgp_line(line)
            silent_s = time.monotonic() - self.last_beat
            if self.deadman_s > 0 and not self.fired and silent_s >= self.deadman_s:
                self._fire(silent_s)
            if sock_fd in writable or self.to_agent:
                self._try_flush(sock_fd, self.to_agent)
            if self.to_exabgp in writable or self.to_exa:
                self._try_flush(self.to_exabgp, self.to_exa)

    def _try_flush(self, fd: int, buffer: bytearray) -> None:
        if not buffer:
            return
        with contextlib.suppress(BlockingIOError):
            del buffer[: os.write(fd, buffer)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="api_relay")
    parser.add_argument("socket_path")
    parser.add_argument("--deadman-ms", type=int, default=0, help="0: no liveness beats needed")
    args = parser.parse_args(argv)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(args.socket_path)
    except OSError as exc:
        sys.stderr.write(f"api_relay: cannot connect to {args.socket_path}: {exc}\n")
        os._exit(1)
    with contextlib.suppress(OSError):
        Relay(sock, sys.stdin.fileno(), sys.stdout.fileno(), args.deadman_ms / 1000).run()
    # Whichever side ends first ends the relay (and, through api.terminate, ExaBGP).
    os._exit(0)


if __name__ == "__main__":
    main()
