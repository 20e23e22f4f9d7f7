"""Backends for the adversarial and fault tests, on loopback, each in its own thread.

`RecordingBackend` reads HTTP/1.1 with h11 (a strict parser independent of the
proxy's llhttp) and records every request it received, and answers:
- `/health`: 200 (not recorded: the agent's active checks);
- `/raw/<name>`: the scripted bytes `responses[name]`, then closes;
- `/close`: closes without answering; `/rst`: resets without answering;
  `/rst-mid`: half a response, then a reset;
- `/big/<n>`: n bytes;
- anything else: 200 with the target as the body.
A request h11 refuses is recorded as `("PROTOCOL-ERROR", ...)`.

`TcpScriptBackend` (for L4) reads one command line and acts it out; see `_l4_script`.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass

import h11


@dataclass
class Received:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name.lower()]


def reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Server:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._accept_loop, daemon=True)
        self.connections = 0

    def start(self) -> None:
        self._accept.start()

    def stop(self) -> None:
        self._stop.set()
        self._accept.join(5)
        self.sock.close()
        for thread in self._threads:
            thread.join(5)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            thread = threading.Thread(target=self._guarded, args=(conn,), daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            thread.start()

    def _guarded(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            self.serve(conn)
        except (OSError, h11.ProtocolError):
            pass  # e.g. a CONNECT HAProxy passed on: h11 will not answer it
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError


class RecordingBackend(_Server):
    def __init__(self, responses: dict[str, bytes] | None = None) -> None:
        super().__init__()
        self.responses = responses or {}
        self.received: list[Received] = []
        self.lock = threading.Lock()

    def requests(self) -> list[Received]:
        with self.lock:
            return list(self.received)

    def clear(self) -> None:
        with self.lock:
            self.received.clear()

    def serve(self, conn: socket.socket) -> None:
        h = h11.Connection(h11.SERVER)
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as error:
                with self.lock:
                    self.received.append(Received("PROTOCOL-ERROR", str(error), [], b""))
                return
            if event is h11.NEED_DATA:
                data = conn.recv(65536)
                h.receive_data(data)
                if not data:
                    return
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                if event is h11.PAUSED and h.our_state is h11.DONE:
                    h.start_next_cycle()
                    continue
                return
            if not isinstance(event, h11.Request):
                continue
            body = b""
            while True:
                part = h.next_event()
                if part is h11.NEED_DATA:
                    data = conn.recv(65536)
                    if not data:
                        return
                    h.receive_data(data)
                    continue
                if isinstance(part, h11.Data):
                    body += part.data
                    continue
                break
            target = event.target.decode("latin-1")
            if target != "/health":
                with self.lock:
                    self.received.append(
                        Received(
                            event.method.decode(),
                            target,
                            [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers],
                            body,
                        )
                    )
            if not self._answer(conn, h, target):
                return
            if h.our_state is h11.MUST_CLOSE or h.their_state is h11.MUST_CLOSE:
                return
            h.start_next_cycle()

    def _answer(self, conn: socket.socket, h: h11.Connection, target: str) -> bool:
        if target == "/close":
            return False
        if target == "/rst":
            reset(conn)
            return False
        if target == "/rst-mid":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
            time.sleep(0.05)
            reset(conn)
            return False
        if target.startswith("/raw/"):
            # Scripted bytes, outside h11: this connection carries nothing more.
            conn.sendall(self.responses[target[5:]])
            return False
        if target.startswith("/big/"):
            size = int(target[5:])
            body = b"x" * size
        else:
            body = target.encode()
        headers = [("Content-Length", str(len(body)))]
        conn.sendall(h.send(h11.Response(status_code=200, headers=headers)) or b"")
        conn.sendall(h.send(h11.Data(data=body)) or b"")
        conn.sendall(h.send(h11.EndOfMessage()) or b"")
        return True


class TcpScriptBackend(_Server):
    """L4: the first line the client sends names what this connection does."""

    def __init__(self) -> None:
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        line = b""
        while not line.endswith(b"\n"):
            data = conn.recv(1)
            if not data:
                return
            line += data
        _l4_script(conn, line.strip().decode())


def _read_to_eof(conn: socket.socket) -> bytes:
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


def _l4_script(conn: socket.socket, command: str) -> None:
    if command == "echo":  # echo until the client's FIN, then answer and FIN
        got = _read_to_eof(conn)
        conn.sendall(b"got " + got)
        conn.shutdown(socket.SHUT_WR)
    elif command == "fin-first":  # FIN first, then keep reading the client
        conn.sendall(b"hello")
        conn.shutdown(socket.SHUT_WR)
        got = _read_to_eof(conn)
        del got
    elif command == "rst":  # some data, then a reset
        conn.sendall(b"x")
        time.sleep(0.05)
        reset(conn)
    elif command == "rst-after-client-fin":
        _read_to_eof(conn)
        reset(conn)
    elif command == "close":  # full close at once
        conn.close()
    elif command == "hold":  # keep the connection until the client goes
        _read_to_eof(conn)
