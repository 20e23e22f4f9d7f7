"""Faults on both sides of the real agent: every FIN/RST order on an L4 flow ends with
both sockets closed (fds and flow table back to their baseline); backends that close,
reset or stall, slow uploads and slow readers fail at most their own request: the
node stays healthy and no healthy backend is ejected."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.raw_backends import RecordingBackend, TcpScriptBackend, reset
from tests.support.procs import AgentProcess, free_port, node_config, wait_for

TCP_CHECK = {"active": {"kind": "tcp", "interval": 0.2, "timeout": 0.2, "rise": 2, "fall": 2}}


@dataclass
class L4Rig:
    agent: AgentProcess
    port: int
    backends: list[TcpScriptBackend]

    def fds(self) -> int:
        assert self.agent.proc is not None
        return len(os.listdir(f"/proc/{self.agent.proc.pid}/fd"))


@contextlib.contextmanager
def l4_rig(tmp: Path, l4_idle: float) -> Iterator[L4Rig]:
    backends = [TcpScriptBackend(), TcpScriptBackend()]
    for b in backends:
        b.start()
    port = free_port()
    config = node_config(
        [{"name": "tcp", "kind": "tcp", "address": "127.0.0.1", "port": port, "backlog": 777}],
        [{"name": f"b{i}", "address": "127.0.0.1", "port": b.port} for i, b in enumerate(backends)],
        health=TCP_CHECK,
        timeouts={"l4_idle": l4_idle},
    )
    agent = AgentProcess(tmp, config)
    try:
        agent.start()
        yield L4Rig(agent, port, backends)
    finally:
        agent.stop()
        for b in backends:
            b.stop()


@pytest.fixture(scope="module")
def l4(tmp_path_factory: pytest.TempPathFactory) -> Iterator[L4Rig]:
    # The idle timeout far above the polls below: a leaked flow is not hidden by it.
    with l4_rig(tmp_path_factory.mktemp("l4"), l4_idle=600) as rig:
        yield rig


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def read_all(s: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            data += chunk
    return data


def client_fin_then_backend_answers_and_closes(port: int) -> None:
    with connect(port) as s:
        s.sendall(b"echo\nabc")
        s.shutdown(socket.SHUT_WR)
        assert read_all(s) == b"got abc"


def backend_fin_first_then_client_sends_and_fins(port: int) -> None:
    with connect(port) as s:
        s.sendall(b"fin-first\n")
        assert read_all(s) == b"hello"
        s.sendall(b"data after the backend's FIN")
        s.shutdown(socket.SHUT_WR)
        time.sleep(0.01)


def client_reset(port: int) -> None:
    s = connect(port)
    s.sendall(b"hold\nsome")
    time.sleep(0.01)
    reset(s)


def backend_reset(port: int) -> None:
    with connect(port) as s:
        s.sendall(b"rst\n")
        read_all(s)


def client_fin_then_backend_reset(port: int) -> None:
    with connect(port) as s:
        s.sendall(b"rst-after-client-fin\n")
        s.shutdown(socket.SHUT_WR)
        read_all(s)


def backend_closes_at_once(port: int) -> None:
    with connect(port) as s:
        s.sendall(b"close\n")
        assert read_all(s) == b""


def backend_fin_then_client_reset(port: int) -> None:
    s = connect(port)
    s.sendall(b"fin-first\n")
    assert read_all(s) == b"hello"
    reset(s)


def client_fin_and_gone_before_the_answer(port: int) -> None:
    s = connect(port)
    s.sendall(b"echo\nx")
    s.shutdown(socket.SHUT_WR)
    s.close()


def client_closes_at_once(port: int) -> None:
    connect(port).close()


ORDERS: list[Callable[[int], None]] = [
    client_fin_then_backend_answers_and_closes,
    backend_fin_first_then_client_sends_and_fins,
    client_reset,
    backend_reset,
    client_fin_then_backend_reset,
    backend_closes_at_once,
    backend_fin_then_client_reset,
    client_fin_and_gone_before_the_answer,
    client_closes_at_once,
]


@pytest.mark.parametrize("order", ORDERS, ids=[o.__name__ for o in ORDERS])
def test_every_fin_rst_order_ends_with_both_sockets_closed(
    l4: L4Rig, order: Callable[[int], None]
) -> None:
    baseline = min(l4.fds() for _ in range(10))
    for _ in range(20):
        order(l4.port)
    # Both sides' sockets closed and the flows gone (health-check sockets come and go:
    # the fd count is polled down to the baseline, nothing is timed).
    wait_for(lambda: l4.agent.status()["flows"]["open"] == 0)
    wait_for(lambda: l4.fds() <= baseline)
    status = l4.agent.status()
    assert status["state"] == "healthy", status["events"][-5:]
    assert not any("ejected" in e["cause"] for e in status["events"])


def test_an_idle_l4_flow_is_closed(tmp_path: Path) -> None:
    with l4_rig(tmp_path, l4_idle=1.0) as rig, connect(rig.port) as s:
        s.sendall(b"hold\n")
        assert read_all(s) == b""  # l4_idle (1 s) closed it; the socket timeout bounds this
        wait_for(lambda: rig.agent.status()["flows"]["open"] == 0)


def test_the_configured_listen_backlog_is_applied(l4: L4Rig) -> None:
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{l4.port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[2] == "777", out  # Send-Q of a listening socket is its backlog


# -- L7 faults ----------------------------------------------------------------------------


@dataclass
class L7Rig:
    agent: AgentProcess
    port: int
    backends: list[RecordingBackend]


@pytest.fixture(scope="module")
def l7(tmp_path_factory: pytest.TempPathFactory) -> Iterator[L7Rig]:
    tmp: Path = tmp_path_factory.mktemp("l7faults")
    backends = [RecordingBackend(), RecordingBackend()]
    for b in backends:
        b.start()
    port = free_port()
    config = node_config(
        [{"name": "web", "kind": "http", "address": "127.0.0.1", "port": port}],
        [{"name": f"b{i}", "address": "127.0.0.1", "port": b.port} for i, b in enumerate(backends)],
        timeouts={"upstream_first_byte": 1.0, "upstream_read_idle": 1.0, "client_body_idle": 2.0},
        limits={"buffer_high_water": 65536},
    )
    agent = AgentProcess(tmp, config)
    try:
        agent.start()
        yield L7Rig(agent, port, backends)
    finally:
        agent.stop()
        for b in backends:
            b.stop()


def assert_untouched(rig: L7Rig) -> None:
    status = rig.agent.status()
    assert status["state"] == "healthy", status["events"][-5:]
    assert {b["health"] for b in status["backends"]} == {"up"}
    assert not any("ejected" in e["cause"] for e in status["events"])


def request(port: int, payload: bytes) -> bytes:
    with connect(port) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return read_all(s)


def test_backends_that_close_or_reset_fail_only_that_request(l7: L7Rig) -> None:
    for _ in range(10):  # more than consecutive_failures (5) on each backend
        got = request(l7.port, b"POST /close HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
        assert got.startswith(b"HTTP/1.1 502")
        got = request(l7.port, b"GET /rst HTTP/1.1\r\nHost: x\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 502")  # retried on the other: reset there too
        got = request(l7.port, b"GET /rst-mid HTTP/1.1\r\nHost: x\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 200") and len(got.split(b"\r\n\r\n", 1)[1]) < 100
    assert_untouched(l7)
    assert request(l7.port, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n").endswith(b"/ok")
    # Our own 502 honours the client's Connection: close (no half-close from us here).
    with connect(l7.port) as s:
        s.sendall(b"GET /close HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        got = read_all(s)  # ends because the proxy closes; the socket timeout bounds it
    assert got.startswith(b"HTTP/1.1 502") and b"\r\nConnection: close\r\n" in got


def test_a_slow_upload_is_not_held_against_the_backend(l7: L7Rig) -> None:
    """1 byte every 0.2 s for 2 s: longer than upstream_first_byte (1 s), which only
    starts once the body is all sent; shorter gaps than client_body_idle."""
    with connect(l7.port) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        for byte in b"0123456789":
            time.sleep(0.2)
            s.sendall(bytes([byte]))
        s.shutdown(socket.SHUT_WR)
        got = read_all(s)
    assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"/upload")
    assert any(r.body == b"0123456789" for b in l7.backends for r in b.requests())
    assert_untouched(l7)


def test_a_stalled_upload_gets_408_and_no_backend_is_blamed(l7: L7Rig) -> None:
    with connect(l7.port) as s:
        s.sendall(b"POST /stall HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        got = read_all(s)  # client_body_idle (2 s); the socket timeout bounds the wait
    assert got.startswith(b"HTTP/1.1 408") and b"Connection: close" in got
    assert_untouched(l7)


def test_a_slow_reader_gets_everything_and_no_backend_is_blamed(l7: L7Rig) -> None:
    size = 8_000_000
    with connect(l7.port) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(b"GET /big/%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % size)
        time.sleep(2.5)  # longer than upstream_read_idle (1 s): the client is the slow one
        got = read_all(s)
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and len(body) == size
    assert_untouched(l7)
