"""A reload (SIGHUP) that starts and removes services, on loopback with the real agent and
real backends (no BGP: the netns test with FRR is tests/integration/test_service_reload_netns.py).

- A service whose listener cannot be bound refuses the whole reload, with one line naming
  the listener; the running services and config stay.
- A service added starts (listener bound, checks run) and serves once healthy.
- A service removed drains: its open request completes (answered with `Connection:
  close`), then it is gone from /status and /metrics; a keep-alive connection to the other
  service, open across both reloads, keeps being served on the same socket.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.procs import AgentProcess, BackendProcess, free_port, node_config, wait_for


def _service(name: str, port: int, backend_port: int) -> dict[str, Any]:
    return {
        "name": name,
        "listeners": [{"name": f"{name}-l", "kind": "http", "address": "127.0.0.1", "port": port}],
        "backends": [{"name": f"{name}-b", "address": "127.0.0.1", "port": backend_port}],
    }


def _get(sock: socket.socket, path: str) -> bytes:
    """One keep-alive request on `sock`, its whole answer (the backend sends Content-Length)."""
    sock.sendall(b"GET %b HTTP/1.1\r\nHost: t\r\n\r\n" % path.encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


@pytest.fixture
def backends() -> Iterator[dict[str, BackendProcess]]:
    started = {name: BackendProcess(name, free_port()).start() for name in ("a", "b")}
    try:
        yield started
    finally:
        for backend in started.values():
            backend.kill()


def _events(agent: AgentProcess, service: str) -> list[str]:
    return [e["cause"] for e in agent.status()["events"] if e.get("service") == service]


def test_a_reload_starts_refuses_and_removes_services(
    tmp_path: Path, backends: dict[str, BackendProcess]
) -> None:
    port_a, port_b = free_port(), free_port()
    a = _service("a", port_a, backends["a"].port)
    b = _service("b", port_b, backends["b"].port)
    config = node_config([], [], services=[a], drain={"deadline": 30, "accept_grace": 0.5})
    agent = AgentProcess(tmp_path, config)
    try:
        agent.start()
        assert httpx.get(f"http://127.0.0.1:{port_a}/").text.strip() == "a"

        # b's port is taken: the reload is refused as a whole, a serves on.
        taken = socket.socket()
        taken.bind(("127.0.0.1", port_b))
        taken.listen()
        with taken:
            agent.write_config({**config, "services": [a, b]})
            agent.signal(signal.SIGHUP)
            status = wait_for(
                lambda: (s := agent.status())["reload"].get("refused") and s,
                what="the reload refused",
            )
        assert status["reload"]["refused"] == (
            f"listeners.b-l: cannot listen on 127.0.0.1:{port_b}: Address already in use"
        )
        assert list(status["services"]) == ["a"]
        assert any(e["cause"].startswith("rejected: listeners.b-l") for e in status["events"])
        assert httpx.get(f"http://127.0.0.1:{port_a}/").text.strip() == "a"

        # Now it can: b starts and serves once healthy; a's connections are untouched.
        with socket.create_connection(("127.0.0.1", port_a)) as keep_a:
            assert _get(keep_a, "/").endswith(b"a\n")
            agent.signal(signal.SIGHUP)
            wait_for(
                lambda: agent.status()["services"].get("b", {}).get("state") == "healthy",
                what="b started and healthy",
            )
            assert _get(keep_a, "/").endswith(b"a\n")  # same socket, across the reload
        assert httpx.get(f"http://127.0.0.1:{port_b}/").text.strip() == "b"
        assert [s["action"] for s in agent.status()["reload"]["steps"]] == ["keep", "start"]

        # a is removed while a slow request to it is open, and a keep-alive one to b is too.
        with (
            socket.create_connection(("127.0.0.1", port_b)) as keep_b,
            socket.create_connection(("127.0.0.1", port_a)) as slow,
        ):
            assert _get(keep_b, "/").endswith(b"b\n")
            slow.settimeout(30)
            slow.sendall(b"GET /slow/4000 HTTP/1.1\r\nHost: t\r\n\r\n")
            wait_for(
                lambda: agent.status()["services"]["a"]["listeners"][0]["connections"] == 1,
                what="the slow request open on a",
            )
            agent.write_config({**config, "services": [b]})
            agent.signal(signal.SIGHUP)
            wait_for(
                lambda: not agent.status()["services"]["a"]["listeners"][0]["serving"],
                what="a stopped accepting",
            )
            answer = slow.recv(65536)
            while b"\r\n\r\n" not in answer and (chunk := slow.recv(65536)):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), answer
            assert b"connection: close" in answer.lower()
            wait_for(lambda: "a" not in agent.status()["services"], what="a gone")
            assert _get(keep_b, "/").endswith(b"b\n")  # same socket, across the removal
        status = agent.status()
        assert list(status["services"]) == ["b"]
        assert _events(agent, "a")[-3:] == [
            "removed by a reload: draining",
            "removed by a reload: stopped accepting",
            "removed by a reload: gone, 0 connections closed at the deadline",
        ]
        metrics = httpx.get(agent.admin + "/metrics").text
        assert 'service="b"' in metrics and 'service="a"' not in metrics
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port_a}/")
    finally:
        agent.stop()
