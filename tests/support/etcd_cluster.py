"""A real etcd cluster (Debian's etcd-server) on loopback ports, in a directory of its own.

Used by the integration tests (a session fixture) and by `make bench-api`. Members get
PR_SET_PDEATHSIG so they die with the process that started them even if it is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


@dataclass
class LocalEtcdCluster:
    workdir: Path
    size: int = 3
    binary: str = "etcd"
    members: list[Member] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.members:
            self.members = [
                Member(f"m{i}", client_port=free_port(), peer_port=free_port())
                for i in range(self.size)
            ]

    @property
    def client_urls(self) -> list[str]:
        return [m.client_url for m in self.members]

    def _initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def start_member(self, index: int, state: str = "new") -> None:
        member = self.members[index]
        data_dir = self.workdir / member.name
        data_dir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / f"{member.name}.log").open("ab")
        member.process = subprocess.Popen(
            [
                self.binary,
                "--name",
                member.name,
                "--data-dir",
                str(data_dir),
                "--listen-peer-urls",
                member.peer_url,
                "--initial-advertise-peer-urls",
                member.peer_url,
                "--listen-client-urls",
                member.client_url,
                "--advertise-client-urls",
                member.client_url,
                "--initial-cluster",
                self._initial_cluster(),
                "--initial-cluster-state",
                state,
                "--initial-cluster-token",
                f"anycast-edge-{os.getpid()}",
                "--log-level",
                "warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - only calls prctl
        )
        log.close()

    def start(self, timeout_s: float = 30.0) -> None:
        if shutil.which(self.binary) is None:
            raise RuntimeError(f"{self.binary} not found: install Debian's etcd-server")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for index in range(len(self.members)):
            self.start_member(index)
        self.wait_healthy(timeout_s)

    def status(self, index: int) -> dict[str, str] | None:
        """The member's /v3/maintenance/status reply (member_id under header), or None."""
        request = urllib.request.Request(
            self.members[index].client_url + "/v3/maintenance/status", data=b"{}", method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=0.5) as response:
                reply = json.loads(response.read())
        except (OSError, ValueError):
            return None
        return {
            "member_id": str(reply.get("header", {}).get("member_id", "")),
            "leader": str(reply.get("leader", "")),
        }

    def leader_index(self) -> int | None:
        for index, member in enumerate(self.members):
            if member.process is None or member.process.poll() is not None:
                continue
            status = self.status(index)
            if status and status["leader"] and status["leader"] == status["member_id"]:
                return index
        return None

    def wait_healthy(self, timeout_s: float = 30.0) -> int:
        """Wait until every running member agrees on a leader; return its index."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            running = [
                i for i, m in enumerate(self.members) if m.process and m.process.poll() is None
            ]
            statuses = [self.status(i) for i in running]
            leaders = {s["leader"] for s in statuses if s and s["leader"] not in ("", "0")}
            if statuses and all(statuses) and len(leaders) == 1:
                leader = self.leader_index()
                if leader is not None:
                    return leader
            time.sleep(0.1)
        logs = "; ".join(
            (self.workdir / f"{m.name}.log").read_text(errors="replace")[-300:]
            for m in self.members
            if (self.workdir / f"{m.name}.log").exists()
        )
        raise RuntimeError(f"etcd cluster not healthy after {timeout_s} s: {logs}")

    def kill(self, index: int) -> None:
        """kill -9 one member."""
        process = self.members[index].process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)

    def restart(self, index: int) -> None:
        self.kill(index)
        self.start_member(index, state="existing")

    def stop(self) -> None:
        for member in self.members:
            process = member.process
            if process is None or process.poll() is not None:
                continue
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=5)
