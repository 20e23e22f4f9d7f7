"""`make bench-proxy`: the agent's proxy against HAProxy, measured in one run.

wrk drives the same nginx backends (one worker each) directly, through HAProxy
(nbthread 1, tcp and http mode) and through the agent (L4 and L7). The proxy
under test is pinned to core 1; wrk and nginx share core 0. On two cores the
client side saturates first, so the fair figure is the proxy's CPU time per
request (utime+stime from /proc over the requests done), compared with
HAProxy's in the same mode. Also measured: requests failed while one of the
two backends is killed under load, and the agent's resident memory. IPv6 rows: HAProxy
http and the agent's L7 with client, proxy and backends on ::1 (ratio to HAProxy on IPv6).
Traffic stays on 127.0.0.1 and ::1; every run is bounded in time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from rich.console import Console
from rich.table import Table

CLK_TCK = os.sysconf("SC_CLK_TCK")
DURATION = int(os.environ.get("BENCH_DURATION", "5"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "50"))
PROXY_CORE = "1" if (os.cpu_count() or 1) > 1 else "0"
LOAD_CORE = "0"
ROOT = Path(__file__).resolve().parents[1]


V4, V6 = "127.0.0.1", "::1"


def free_port() -> int:
    """A port free on both loopbacks (nginx listens on both)."""
    while True:
        with socket.socket() as s, socket.socket(socket.AF_INET6) as s6:
            s.bind((V4, 0))
            port = int(s.getsockname()[1])
            with contextlib.suppress(OSError):
                s6.bind((V6, port))
                return port


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def wait_port(port: int, timeout: float = 10, host: str = V4) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {hostport(host, port)}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class WrkResult:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    non_2xx: int


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk_command(port: int, duration: int, path: str = "/", host: str = V4) -> list[str]:
    url = f"http://{hostport(host, port)}{path}"
    return ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{duration}s",
            "--latency", "--timeout", "5s", url]  # fmt: skip


def run_wrk(port: int, duration: int, path: str = "/", host: str = V4) -> WrkResult:
    command = wrk_command(port, duration, path, host)
    out = subprocess.run(command, capture_output=True, text=True, timeout=duration + 30, check=True)
    return parse_wrk(out.stdout)


def parse_wrk(out: str) -> WrkResult:
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = 0
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors = sum(int(x) for x in m.groups())
    non_2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    return WrkResult(requests, rps, p50, p99, errors, non_2xx)


class Lab:
    """The processes of one benchmark run, all stopped at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, cmd: list[str], core: str, **kwargs: object) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"{Path(cmd[0]).name}-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(["taskset", "-c", core, *cmd], stdout=log, stderr=log, **kwargs)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc  # type: ignore[no-any-return]

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)

    def nginx(self, name: str) -> tuple[int, subprocess.Popen[bytes]]:
        port = free_port()
        conf = self.tmp / f"nginx-{name}.conf"
        conf.write_text(f"""
worker_processes 1;
daemon off;
master_process off;
pid {self.tmp}/nginx-{name}.pid;
error_log {self.tmp}/nginx-{name}.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  server {{
    listen 127.0.0.1:{port} reuseport;
    listen [::1]:{port} reuseport;
    location / {{ return 200 "hello from {name}\\n"; }}
  }}
}}
""")
        proc = self.spawn(
            ["nginx", "-c", str(conf), "-e", str(self.tmp / f"nginx-{name}.err")], LOAD_CORE
        )
        wait_port(port)
        wait_port(port, host=V6)
        return port, proc

    def haproxy(
        self, mode: str, backends: list[int], host: str = V4
    ) -> tuple[int, subprocess.Popen[bytes]]:
        """HAProxy on `host`, to backends on `host` (IPv4 or IPv6 end to end)."""
        port = free_port()
        servers = "\n".join(
            f"  server b{i} {hostport(host, p)} check inter 1s fall 2 rise 2"
            for i, p in enumerate(backends)
        )
        conf = self.tmp / f"haproxy-{mode}-{port}.cfg"
        conf.write_text(f"""
global
  nbthread 1
  maxconn 8000
defaults
  mode {mode}
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  retries 1
  option redispatch
frontend fe
  bind {hostport(host, port)}
  default_backend be
backend be
  balance roundrobin
{servers}
""")
        proc = self.spawn(["haproxy", "-db", "-f", str(conf)], PROXY_CORE)
        wait_port(port, host=host)
        return port, proc

    def agent(
        self, backends: list[int], host: str = V4, **extra: Any
    ) -> tuple[int, int, str, subprocess.Popen[bytes]]:
        """The agent listening on `host`, to backends on `host`; `extra`: more node.yaml
        sections (e.g. timeouts)."""
        l7, l4, admin = free_port(), free_port(), free_port()
        config: dict[str, Any] = {
            "node": {"name": "bench", "site": "local"},
            "listeners": [
                {"name": "web", "kind": "http", "address": host, "port": l7},
                {"name": "tcp", "kind": "tcp", "address": host, "port": l4},
            ],
            "backends": [
                {"name": f"b{i}", "address": host, "port": p} for i, p in enumerate(backends)
            ],
            "health": {"active": {"kind": "tcp", "interval": 1.0, "timeout": 0.5}},
            "admin": {"port": admin},
            "log_level": "warning",
            **extra,
        }
        path = self.tmp / f"node-{l7}.yaml"
        path.write_text(yaml.safe_dump(config))
        binary = Path(sys.executable).parent / "anycast-edge"
        proc = self.spawn([str(binary), "run", "--config", str(path)], PROXY_CORE)
        url = f"http://127.0.0.1:{admin}/status"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1).json()["state"] == "healthy":
                    break
            time.sleep(0.1)
        else:
            raise TimeoutError("agent did not become healthy")
        return l7, l4, url, proc


@dataclass
class Row:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float | None
    ratio_to_haproxy: float | None = None
    errors: int = 0


def measure(name: str, port: int, pid: int | None, host: str = V4) -> Row:
    run_wrk(port, 1, host=host)  # warm up: connections, pools, caches
    before = cpu_seconds(pid) if pid else 0.0
    result = run_wrk(port, DURATION, host=host)
    cpu = (cpu_seconds(pid) - before) if pid else None
    per_request = cpu / result.requests * 1e6 if cpu is not None and result.requests else None
    return Row(
        name,
        result.rps,
        result.p50_ms,
        result.p99_ms,
        per_request,
        None,
        result.errors + result.non_2xx,
    )


def failover(lab: Lab, port: int, victim: subprocess.Popen[bytes]) -> WrkResult:
    """Kill one of two backends 2 s into a 6 s run; count failed requests."""
    proc = subprocess.Popen(wrk_command(port, 6), stdout=subprocess.PIPE, text=True)
    time.sleep(2)
    victim.kill()
    victim.wait()
    out, _ = proc.communicate(timeout=40)
    return parse_wrk(out)


def main() -> None:
    for tool in ("wrk", "nginx", "haproxy", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"bench-proxy: {tool} is missing (make deps installs it)")
    console = Console()
    tmp = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    lab = Lab(tmp)
    rows: list[Row] = []
    extra: dict[str, object] = {}
    try:
        p1, _ = lab.nginx("b0")
        p2, _ = lab.nginx("b1")
        rows.append(measure("direct (nginx)", p1, None))
        for mode in ("tcp", "http"):
            port, proc = lab.haproxy(mode, [p1, p2])
            rows.append(measure(f"HAProxy {mode}", port, proc.pid))
            lab.stop(proc)
        l7, l4, _, agent = lab.agent([p1, p2])
        rows.append(measure("agent L4", l4, agent.pid))
        rows.append(measure("agent L7", l7, agent.pid))
        extra["agent_rss_mb"] = round(rss_mb(agent.pid), 1)
        lab.stop(agent)
        # IPv6 end to end (client, proxy and backends on ::1), the same method.
        port, proc = lab.haproxy("http", [p1, p2], host=V6)
        rows.append(measure("HAProxy http IPv6", port, proc.pid, host=V6))
        lab.stop(proc)
        l7, _, _, agent = lab.agent([p1, p2], host=V6)
        rows.append(measure("agent L7 IPv6", l7, agent.pid, host=V6))
        lab.stop(agent)
        ref = {r.name: r.cpu_us_per_request for r in rows}
        for row, base in (
            ("agent L4", "HAProxy tcp"),
            ("agent L7", "HAProxy http"),
            ("agent L7 IPv6", "HAProxy http IPv6"),
        ):
            r = next(x for x in rows if x.name == row)
            if r.cpu_us_per_request and ref[base]:
                r.ratio_to_haproxy = r.cpu_us_per_request / ref[base]  # type: ignore[operator]

        # Failover: a fresh pair of backends for each proxy, one killed under load.
        results: dict[str, dict[str, int]] = {}
        for label in ("HAProxy http", "agent L7"):
            q1, n1 = lab.nginx(f"f{label[0]}1")
            q2, _ = lab.nginx(f"f{label[0]}2")
            if label.startswith("HAProxy"):
                port, proc = lab.haproxy("http", [q1, q2])
            else:
                port, _, _, proc = lab.agent([q1, q2])
            outcome = failover(lab, port, n1)
            results[label] = {
                "requests": outcome.requests,
                "failed": outcome.errors + outcome.non_2xx,
            }
            lab.stop(proc)
        extra["backend_killed_under_load"] = results
    finally:
        lab.close()
        shutil.rmtree(tmp, ignore_errors=True)

    table = Table(
        title=f"bench-proxy: wrk -t1 -c{CONNECTIONS} -d{DURATION}s, proxy on core {PROXY_CORE}"
    )
    for column in ("path", "req/s", "p50 ms", "p99 ms", "proxy CPU µs/req", "ratio to HAProxy"):
        table.add_column(column, justify="right" if column != "path" else "left")
    for r in rows:
        table.add_row(
            r.name,
            f"{r.rps:,.0f}",
            f"{r.p50_ms:.2f}",
            f"{r.p99_ms:.2f}",
            f"{r.cpu_us_per_request:.1f}" if r.cpu_us_per_request else "-",
            f"{r.ratio_to_haproxy:.2f}" if r.ratio_to_haproxy else "-",
        )
    console.print(table)
    failover_table = Table(title="one of two backends killed 2 s into a 6 s run")
    for column in ("proxy", "requests", "failed"):
        failover_table.add_column(column)
    for label, counts in results.items():
        failover_table.add_row(label, f"{counts['requests']:,}", str(counts["failed"]))
    console.print(failover_table)
    console.print(f"agent RSS after load: {extra['agent_rss_mb']} MB")
    out_dir = ROOT / "bench-results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "proxy.json").write_text(
        json.dumps(
            {
                "duration_s": DURATION,
                "connections": CONNECTIONS,
                "rows": [asdict(r) for r in rows],
                **extra,
            },
            indent=2,
        )
    )
    console.print(f"written to {out_dir / 'proxy.json'}")


if __name__ == "__main__":
    main()
