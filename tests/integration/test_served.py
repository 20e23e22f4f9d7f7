"""`python -m api` as the lead's `anycast-edge api` will run it: TLS when a certificate is
configured, tokens from the environment, and no secret in its output."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from contract.client import ApiClient, Forbidden, Unauthorized
from contract.schemas import Heartbeat, NodeSpec, NodeState, SiteSpec
from tests.support.etcd_cluster import free_port
from tests.support.requires import require

pytestmark = pytest.mark.timeout(90)

OPERATOR_SECRET = "op-secret-from-env-8c1f"
NODE_SECRET = "node-secret-in-file-5d2e"


def make_certificate(directory: Path) -> tuple[Path, Path]:
    require("openssl")
    cert, key = directory / "api.crt", directory / "api.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@dataclass
class Served:
    url: str
    cert: Path
    output: Path
    port: int


@pytest.fixture
def served_api(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Served]:
    log_format = getattr(request, "param", "text")
    cert, key = make_certificate(tmp_path)
    port = free_port()
    config = tmp_path / "gslb.yaml"
    config.write_text(
        f"port: {port}\nlog_format: {log_format}\n"
        f"tls: {{cert: {cert}, key: {key}}}\n"
        f"store: {{kind: sqlite, path: {tmp_path / 'gslb.db'}}}\n"
        "tokens:\n"
        "  - {name: ops, role: operator, token_env: TEST_GSLB_OPS}\n"
        f"  - {{name: edge-a1, role: node, node: a1, token: {NODE_SECRET}}}\n"
    )
    output = tmp_path / "api.log"
    env = {**os.environ, "TEST_GSLB_OPS": OPERATOR_SECRET}
    with output.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "api", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"https://127.0.0.1:{port}"
    trust = ssl.create_default_context(cafile=str(cert))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/healthz", verify=trust, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, output.read_text()
            assert time.monotonic() < deadline, "API did not start"
            time.sleep(0.1)
        yield Served(url, cert, output, port)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


async def test_python_m_api_serves_tls_and_never_prints_secrets(served_api: Served) -> None:
    url, cert = served_api.url, str(served_api.cert)
    async with httpx.AsyncClient(timeout=2) as plain:
        with pytest.raises(httpx.HTTPError):
            (await plain.get(f"http://127.0.0.1:{served_api.port}/healthz")).raise_for_status()

    async with ApiClient([url], OPERATOR_SECRET, verify=cert) as operator:
        state = await operator.put_site("a", SiteSpec(), revision=0)
        await operator.put_node("a1", NodeSpec(site="a"), revision=state.revision)
    async with ApiClient([url], NODE_SECRET, verify=cert) as node:
        await node.heartbeat("a1", Heartbeat(state=NodeState.HEALTHY))
        with pytest.raises(Forbidden):
            await node.heartbeat("b1", Heartbeat(state=NodeState.HEALTHY))
    async with ApiClient([url], NODE_SECRET + "x", verify=cert) as wrong:
        with pytest.raises(Unauthorized):
            await wrong.state()

    text = served_api.output.read_text()
    assert "Uvicorn running on https://" in text
    assert OPERATOR_SECRET not in text
    assert NODE_SECRET not in text


@pytest.mark.parametrize("served_api", ["json"], indirect=True)
async def test_json_logs_are_one_object_per_line(served_api: Served) -> None:
    async with ApiClient([served_api.url], OPERATOR_SECRET, verify=str(served_api.cert)) as c:
        await c.state()
    lines = served_api.output.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line parses
    assert len(records) >= 3
    # The agent's format (contract.logs), the process named.
    assert all(set(r) >= {"ts", "level", "logger", "msg"} for r in records)
    assert all(r["component"] == "api" and "color_message" not in r for r in records)
    assert any("Uvicorn running on https://" in r["msg"] for r in records)


def test_an_idle_keep_alive_connection_outlives_uvicorns_default(
    served_api: Served,
) -> None:
    """`keep_alive_s` (75 s by default) reaches uvicorn: a node's connection idle longer
    than uvicorn's own 5 s default (a node heartbeating every 6 s) is still open and
    answers its next request. With the 5 s default the server closed it, and a node
    reconnected at every heartbeat (or, with a naive client, failed it)."""
    context = ssl.create_default_context(cafile=str(served_api.cert))
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

    def answer(tls: ssl.SSLSocket) -> bytes:
        data = b""
        while not data.endswith(b"}"):  # head and body come as two TLS records
            chunk = tls.recv(4096)
            assert chunk, f"closed after {data!r}"
            data += chunk
        return data

    with (
        socket.create_connection(("127.0.0.1", served_api.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        for _ in range(2):
            tls.sendall(request)
            assert answer(tls).startswith(b"HTTP/1.1 200")
        time.sleep(6.0)
        tls.settimeout(0.3)
        with pytest.raises(TimeoutError):
            closed = tls.recv(1)  # b"" here: the server closed it
            pytest.fail(f"the connection was closed while idle: {closed!r}")
        tls.settimeout(5)
        tls.sendall(request)
        assert answer(tls).startswith(b"HTTP/1.1 200")
