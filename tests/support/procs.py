"""Real processes for integration tests: backends that can die, and the agent itself."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def run(*cmd: str, check: bool = True, timeout: float = 10.0) -> str:
    """Run a command to completion (bounded); its stdout. Raises with stderr when it fails."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def wait_for(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll until `predicate` returns something truthy and return it; bounded, never a timing
    assertion. A predicate that raises counts as not yet (a server still starting); the
    TimeoutError names what was awaited and the last value or error seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
            if last:
                return last
        except Exception as exc:
            last = exc
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"gave up after {timeout:.0f} s waiting for {what or predicate} (last: {last!r})"
            )
        time.sleep(interval)


class BackendProcess:
    def __init__(self, name: str, port: int, fail_file: Path | None = None) -> None:
        self.name, self.port, self.fail_file = name, port, fail_file
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> BackendProcess:
        cmd = [
            sys.executable,
            "-m",
            "deploy.backend.named_backend",
            "--port",
            str(self.port),
            "--name",
            self.name,
        ]
        if self.fail_file is not None:
            cmd += ["--fail-file", str(self.fail_file)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith(b"ready"), line
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class AgentProcess:
    """`anycast-edge run --config node.yaml`, as an operator runs it."""

    def __init__(self, tmp: Path, config: dict[str, Any]) -> None:
        self.tmp = tmp
        self.config = config
        self.config_path = tmp / "node.yaml"
        self.admin = f"http://127.0.0.1:{config['admin']['port']}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = tmp / "agent.log"
        #: Set before start() to add to the agent's environment.
        self.env: dict[str, str] = {}

    def write_config(self, config: dict[str, Any] | None = None) -> None:
        if config is not None:
            self.config = config
        self.config_path.write_text(yaml.safe_dump(self.config))

    def start(self, wait_state: str | None = "healthy", args: tuple[str, ...] = ()) -> AgentProcess:
        """`args`: more `anycast-edge run` options (e.g. `--log-format json`)."""
        self.write_config()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(BIN / "anycast-edge"), "run", "--config", str(self.config_path), *args],
            stdout=log,
            stderr=log,
            cwd=self.tmp,
            env={**os.environ, **self.env},
        )
        wait_for(lambda: self.status(), timeout=15)
        if wait_state:
            self.wait_state(wait_state)
        return self

    def status(self) -> dict[str, Any]:
        return dict(httpx.get(self.admin + "/status", timeout=2).json())

    def wait_state(self, state: str, timeout: float = 15) -> dict[str, Any]:
        return dict(wait_for(lambda: (s := self.status())["state"] == state and s, timeout=timeout))

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def node_config(
    listeners: list[dict[str, Any]], backends: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "node": {"name": "edge-t1", "site": "site-t"},
        "listeners": listeners,
        "backends": backends,
        "health": {
            "active": {
                "kind": "http",
                "path": "/health",
                "interval": 0.2,
                "timeout": 0.2,
                "rise": 2,
                "fall": 2,
            }
        },
        "admin": {"port": free_port()},
    }
    config.update(extra)
    return config


def env_pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
