"""`make lab` until the docker-compose lab lands: one agent on loopback, two backends.

Shows traffic flowing and who served it, the node's status, a backend killed
under traffic (no request fails, the node turns degraded), and a drain. Every
process it starts is stopped at the end; traffic goes only to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
console = Console()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(predicate: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if result := predicate():
                return result
        time.sleep(0.1)
    raise TimeoutError("the demo did not reach the expected state")


def backend(name: str, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.backend.named_backend", "--port", str(port), "--name", name],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    return proc


def status_table(status: dict[str, Any]) -> Table:
    table = Table(title=f"node {status['node']} (site {status['site']}): {status['state']}")
    for column in ("backend", "address", "health", "requests", "connections", "last check"):
        table.add_column(column)
    for b in status["backends"]:
        table.add_row(
            b["name"],
            b["address"],
            b["health"],
            str(b["requests_total"]),
            str(b["connections_total"]),
            b["last_check"],
        )
    return table


def traffic(url: str, count: int) -> tuple[Counter[str], int]:
    served: Counter[str] = Counter()
    failed = 0
    with httpx.Client(timeout=5) as client:
        for _ in range(count):
            try:
                r = client.get(url)
                served[f"{r.text.strip()} via {r.headers.get('via', '?')}"] += r.status_code == 200
                failed += r.status_code != 200
            except httpx.HTTPError:
                failed += 1
    return served, failed


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="anycast-edge-demo-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ports = {"b1": free_port(), "b2": free_port()}
        console.rule("anycast-edge local demo")
        for name, port in ports.items():
            procs.append(backend(name, port))
            console.print(f"backend {name} on 127.0.0.1:{port}")
        http_port, admin_port = free_port(), free_port()
        config = {
            "node": {"name": "edge-demo", "site": "local"},
            "listeners": [
                {"name": "web", "kind": "http", "address": "127.0.0.1", "port": http_port}
            ],
            "backends": [{"name": n, "address": "127.0.0.1", "port": p} for n, p in ports.items()],
            "health": {
                "active": {"kind": "http", "path": "/health", "interval": 0.5, "timeout": 0.3}
            },
            "drain": {"accept_grace": 1.0, "deadline": 5},
            "admin": {"port": admin_port},
            "log_level": "warning",
        }
        path = tmp / "node.yaml"
        path.write_text(yaml.safe_dump(config))
        log = (tmp / "agent.log").open("wb")
        agent = subprocess.Popen(
            [str(BIN / "anycast-edge"), "run", "--config", str(path)], stdout=log, stderr=log
        )
        procs.append(agent)
        admin = f"http://127.0.0.1:{admin_port}"
        url = f"http://127.0.0.1:{http_port}/"
        console.print(f"agent: http on 127.0.0.1:{http_port}, admin on {admin}")
        wait(lambda: httpx.get(admin + "/status").json()["state"] == "healthy")

        console.rule("40 requests through the agent")
        served, failed = traffic(url, 40)
        for who, n in sorted(served.items()):
            console.print(f"  {n:3d} served by {who}")
        console.print(f"  failed: {failed}")
        console.print(status_table(httpx.get(admin + "/status").json()))

        console.rule("backend b1 killed while traffic flows")
        procs[0].kill()
        served, failed = traffic(url, 40)
        for who, n in sorted(served.items()):
            console.print(f"  {n:3d} served by {who}")
        console.print(f"  failed: {failed} (idempotent requests are retried on b2)")
        status = wait(
            lambda: (s := httpx.get(admin + "/status").json())["state"] == "degraded" and s
        )
        console.print(status_table(status))
        for event in status["events"][-3:]:
            console.print(f"  event: {event['cause']}")

        console.rule("planned drain")
        httpx.post(admin + "/drain", params={"reason": "demo maintenance"})
        console.print(f"  state: {httpx.get(admin + '/status').json()['state']}")
        status = wait(lambda: (s := httpx.get(admin + "/status").json())["state"] == "down" and s)
        console.print(f"  state: {status['state']} ({status['events'][-1]['cause']})")
        console.rule("done: everything the demo started is stopped")
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    main()
