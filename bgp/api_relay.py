"""The process ExaBGP runs as its API helper: relays ExaBGP's stdin/stdout to the agent's
unix socket. No files are polled: ExaBGP writes JSON to our stdin and reads commands from
our stdout; the agent owns the other end of the socket.

Either side closing ends the relay. ExaBGP runs with `exabgp.api.terminate=true`, so a
relay that ends (the agent died or closed the socket) takes ExaBGP down with it, its TCP
sessions close, and the routers drop the routes: a dead-man switch that needs no timer.

Standard library only, and no import of the `bgp` package, so it starts fast.
"""

from __future__ import annotations

import os
import socket
import sys
import threading


def _pump(read_fd: int, write: socket.socket | int) -> None:
    try:
        while True:
            data = os.read(read_fd, 65536)
            if not data:
                break
            if isinstance(write, socket.socket):
                write.sendall(data)
            else:
                view = memoryview(data)
                while view:
                    view = view[os.write(write, view) :]
    except OSError:
        pass
    # Whichever direction ends first ends the relay.
    os._exit(0)


def main() -> None:
    if len(sys.argv) != 2:
        sys.stderr.write("usage: api_relay UNIX_SOCKET_PATH\n")
        os._exit(2)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(sys.argv[1])
    except OSError as exc:
        sys.stderr.write(f"api_relay: cannot connect to {sys.argv[1]}: {exc}\n")
        os._exit(1)
    threading.Thread(target=_pump, args=(sys.stdin.fileno(), sock), daemon=True).start()
    _pump(sock.fileno(), sys.stdout.fileno())


if __name__ == "__main__":
    main()
