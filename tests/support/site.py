"""A site for integration tests: two real backends behind one real agent."""

from __future__ import annotations

from pathlib import Path

from tests.support.procs import AgentProcess, BackendProcess, free_port, node_config


class Site:
    """Two real backends behind one real agent with an L7 and an L4 listener."""

    def __init__(self, tmp: Path, **extra: object) -> None:
        self.tmp = tmp
        self.fail_files = {n: tmp / f"{n}.fail" for n in ("b1", "b2")}
        self.backends = {
            n: BackendProcess(n, free_port(), self.fail_files[n]) for n in ("b1", "b2")
        }
        self.http_port, self.tcp_port = free_port(), free_port()
        config = node_config(
            [
                {"name": "web", "kind": "http", "address": "127.0.0.1", "port": self.http_port},
                {"name": "tcp", "kind": "tcp", "address": "127.0.0.1", "port": self.tcp_port},
            ],
            [{"name": n, "address": "127.0.0.1", "port": b.port} for n, b in self.backends.items()],
        )
        config.update(extra)
        self.agent = AgentProcess(tmp, config)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> Site:
        for b in self.backends.values():
            b.start()
        self.agent.start()
        return self

    def close(self) -> None:
        self.agent.stop()
        for b in self.backends.values():
            b.kill()
