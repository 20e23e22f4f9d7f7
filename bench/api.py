"""`make bench-api`: GSLB API numbers on this machine; a table, and bench-results/api.json.

1. write -> watching node sees it (p50/p99), SQLite and etcd: an operator write through the
   API, a node long-polling its desired view through the API; measured from just before the
   write request to the moment the node's long-poll answers with the new revision.
2. N simulated nodes heartbeating every second against one API (SQLite, then etcd): p50/p99
   latency, errors, the CPU of the API process (and of the etcd members), after a 2 s
   warm-up. Bounded duration. One keep-alive connection per simulated node; the load
   generator runs in this process on the same 2 cores, so it competes with the API.
3. etcd leader killed (kill -9) during a stream of writes: the longest gap between two
   acknowledged writes, and acknowledged writes missing afterwards (target 0).
4. watch wake-up with one member frozen: the member carrying the API's etcd watch is
   SIGSTOPped, a write goes through a second API instance that only knows the other two
   members, and the time from that write to the first API's /v1/watch (parked before the
   freeze) answering with it is measured (p50/max over n rounds; the API's watch must notice
   the silent member and move: about one watch_probe_s plus one request timeout).

5. simulation: 10,000 nodes across three API instances on one (fresh) etcd cluster, each
   node heartbeating once per --sim-period (1/s for all of them is more than two shared
   cores serve; the offered rate is in the result) with a TTL of 5 periods (the default
   5 s TTL at 1/s), measured after two periods of warm-up (the whole fleet's first contacts
   fall in the first): p50/p99, errors, each instance's CPU, the CPU per heartbeat of the
   APIs and of etcd, and what etcd applies per second (transactions, puts, raft proposals,
   from a member's /metrics). Bounded in count and time.

The reference, in the same run: rows 2 (etcd) and 5 again with the etcd write rule off
(`store.heartbeat_writes: every`, each heartbeat written; api/heartbeat_writes.py), in
`heartbeats_every_write` and `simulation_10000_every_write`.

The load generator runs on uvloop, like the API. The API runs as its own process
(`python -m api`), etcd as a real 3-member cluster, all on
loopback, everything stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import uvloop
import yaml

from api import gc_pacing
from contract.client import ApiClient, ApiError
from contract.schemas import (
    NODE_CONTRACT_VERSION,
    DesiredSpec,
    Heartbeat,
    NodeSpec,
    NodeState,
    ServiceSpec,
    SiteSpec,
)
from tests.support.etcd_cluster import LocalEtcdCluster, free_port

TOKEN = "bench-operator-token"
#: Heartbeats of the first seconds (every node's first contact is an event) are not counted
#: (at least one heartbeat period).
WARMUP_S = 2.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ApiProcess:
    def __init__(self, workdir: Path, store: dict[str, Any], **settings: Any) -> None:
        self.port = free_port()
        self.config = workdir / f"gslb-{self.port}.yaml"
        data = {
            "port": self.port,
            "store": store,
            "tokens": [{"name": "bench", "role": "operator", "token": TOKEN}],
            **settings,
        }
        self.config.write_text(yaml.safe_dump(data))
        self.log = workdir / f"api-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "api", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=0.5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"API did not start: {self.log.read_text()[-500:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


async def seed(url: str, nodes: int) -> int:
    spec = DesiredSpec(
        sites={"a": SiteSpec(), "b": SiteSpec()},
        nodes={f"n{i}": NodeSpec(site="ab"[i % 2]) for i in range(nodes)},
    )
    async with ApiClient([url], TOKEN) as client:
        current = await client.state()
        return (await client.apply_state(spec, revision=current.revision)).revision


async def write_to_watch(url: str, writes: int) -> dict[str, Any]:
    revision = await seed(url, 2)
    latencies: list[float] = []
    async with ApiClient([url], TOKEN) as operator, ApiClient([url], TOKEN) as node:
        view = await node.node_desired("n0")
        for i in range(writes):
            watcher = asyncio.create_task(
                node.node_desired(
                    "n0", after_revision=view.revision, fingerprint=view.fingerprint, timeout_s=10
                )
            )
            await asyncio.sleep(0.02)  # let the long-poll reach the server and park
            started = time.perf_counter()
            state = await operator.put_node(
                "n0", NodeSpec(site="a", weight=1 + i % 2), revision=revision
            )
            view = await watcher
            latencies.append(time.perf_counter() - started)
            assert view.revision == state.revision, (view.revision, state.revision)
            revision = state.revision
    return {
        "writes": writes,
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
    }


class RawConnection:
    """A minimal keep-alive HTTP/1.1 client, one per simulated node, like a real fleet.

    httpx's shared pool spends more CPU per request than the API does; with a thousand
    simulated nodes on the same two cores the load generator, not the API, was measured.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def request(self, path: str, body: bytes, token: str) -> bytes:
        """The bytes of a POST (a node sends the same request every second: built once)."""
        return (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    async def post(self, path: str, body: bytes, token: str) -> int:
        return await self.send(self.request(path, body, token))

    async def send(self, request: bytes) -> int:
        if self.reader is not None and self.reader.at_eof():
            self.close()  # the server closed it while idle: a new one, as httpx's pool does
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        try:
            self.writer.write(request)
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await self.reader.readexactly(length)
            return status
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self.close()
            raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def heartbeats(
    urls: Sequence[str],
    api_pids: Sequence[int],
    nodes: int,
    duration_s: float,
    etcd_pids: Sequence[int] = (),
    period_s: float = 1.0,
    warmup_s: float | None = None,
) -> dict[str, Any]:
    """`nodes` simulated nodes, each heartbeating once per `period_s`, node i against
    `urls[i % len(urls)]` (one keep-alive connection each). CPU is measured from the end of
    the warm-up to the last answer; `api_cpu_pct` is the sum over the API processes."""
    await seed(urls[0], nodes)
    latencies: list[float] = []
    by_second: dict[int, list[float]] = {}  # second of the measurement -> its latencies
    errors = 0
    failures: dict[str, int] = {}  # status or exception -> count
    body = Heartbeat(state=NodeState.HEALTHY, connections=10).model_dump_json().encode()
    addresses = [url.removeprefix("http://").split(":") for url in urls]
    connections = [
        RawConnection(host, int(port))
        for host, port in (addresses[i % len(addresses)] for i in range(nodes))
    ]
    requests = [
        connections[i].request(
            f"/v1/nodes/n{i}/heartbeat?contract={NODE_CONTRACT_VERSION}", body, TOKEN
        )
        for i in range(nodes)
    ]
    start = time.monotonic() + 1.0
    measured_from = start + (warmup_s if warmup_s is not None else max(WARMUP_S, period_s))
    end = measured_from + duration_s

    async def node_loop(i: int) -> None:
        nonlocal errors
        # Spread the nodes over the period, as real fleets are.
        tick = start + period_s * (i / nodes)
        while tick < end:
            await asyncio.sleep(max(0.0, tick - time.monotonic()))
            sent = time.perf_counter()
            try:
                status = await asyncio.wait_for(connections[i].send(requests[i]), 5)
                if status != 200:
                    errors += 1
                    failures[str(status)] = failures.get(str(status), 0) + 1
            except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError) as exc:
                errors += 1
                failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
                connections[i].close()
            if tick >= measured_from:
                latencies.append(time.perf_counter() - sent)
                by_second.setdefault(int(tick - measured_from), []).append(latencies[-1])
            tick += period_s

    # The load generator's own collector pauses would count as API latency: paced like the
    # API's (api/gc_pacing.py).
    pacer = asyncio.create_task(gc_pacing.pace())
    # The nodes start at `start`, spread over a period, and warm up until `measured_from`.
    # (Before, the loops were created only at `measured_from`: every node's warm-up
    # heartbeats, first contacts included, then went out at once, and the first measured
    # seconds queued behind that burst of 2,000.)
    loops = [asyncio.create_task(node_loop(i)) for i in range(nodes)]
    await asyncio.sleep(max(0.0, measured_from - time.monotonic()))
    api_before = [cpu_seconds(pid) for pid in api_pids]
    etcd_before = sum(cpu_seconds(p) for p in etcd_pids)
    loadgen_before = cpu_seconds(os.getpid())
    started_at = time.monotonic()
    try:
        await asyncio.gather(*loops)
    finally:
        pacer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pacer
        for connection in connections:
            connection.close()
    # When the box cannot keep up, the last heartbeats go out late: rates use the real time.
    elapsed = time.monotonic() - started_at
    api_cpu = [cpu_seconds(pid) - before for pid, before in zip(api_pids, api_before, strict=True)]
    etcd_cpu = sum(cpu_seconds(p) for p in etcd_pids) - etcd_before
    loadgen_cpu = cpu_seconds(os.getpid()) - loadgen_before
    return {
        "nodes": nodes,
        "duration_s": duration_s,
        "elapsed_s": elapsed,
        "heartbeats": len(latencies),
        "rate_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        # where the tail is: each second's p99, by when the heartbeats were due
        "p99_ms_by_second": [
            round(1000 * percentile(by_second[s], 0.99), 1) for s in sorted(by_second)
        ],
        "errors": errors,
        "errors_by_cause": failures,
        "api_cpu_pct": 100 * sum(api_cpu) / elapsed,
        "etcd_cpu_pct": 100 * etcd_cpu / elapsed,
        "api_cpu_ms_per_heartbeat": 1000 * sum(api_cpu) / max(1, len(latencies)),
        "etcd_cpu_ms_per_heartbeat": 1000 * etcd_cpu / max(1, len(latencies)),
        "api_cpu_pct_per_instance": [100 * c / elapsed for c in api_cpu],
        # this process: the load generator, on the same cores as the API and etcd
        "loadgen_cpu_pct": 100 * loadgen_cpu / elapsed,
    }


def etcd_counters(client_url: str) -> dict[str, float]:
    """What one member has applied so far (every member applies every committed entry)."""
    wanted = {
        "etcd_server_proposals_committed_total": "proposals",
        "etcd_mvcc_txn_total": "txns",
        "etcd_mvcc_put_total": "puts",
        "etcd_mvcc_range_total": "ranges",
    }
    counters = dict.fromkeys(wanted.values(), 0.0)
    for line in httpx.get(client_url + "/metrics", timeout=5).text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            counters[wanted[name]] = float(value)
    return counters


def simulation(
    workdir: Path,
    cluster: LocalEtcdCluster,
    nodes: int,
    instances: int,
    period_s: float,
    duration_s: float,
    heartbeat_writes: str = "changes",
    prefix: str = "/anycast-edge/",
) -> dict[str, Any]:
    """`nodes` nodes across `instances` API processes on one etcd cluster (each instance
    lists the members starting at a different one). Each node heartbeats once per
    `period_s`: 10,000 nodes at 1/s is more than two shared cores serve, so the offered
    rate is `nodes / period_s`, and the costs per heartbeat say what 1/s would take."""
    urls = cluster.client_urls
    settings = {
        "max_body_bytes": 4 << 20,
        # TTL = 5 periods, as the default 5 s TTL at 1 heartbeat/s: the write rule then
        # skips what it skips at 1/s (it refreshes a record TTL/3 after its last write).
        "heartbeat_ttl_s": max(5.0, 5 * period_s),
    }
    apis = [
        ApiProcess(
            workdir,
            # Each snapshot reads every node's record: megabytes at this size.
            {
                "kind": "etcd",
                "endpoints": urls[i:] + urls[:i],
                "request_timeout_s": 2.0,
                "heartbeat_writes": heartbeat_writes,
                "prefix": prefix,
            },
            **settings,
        )
        for i in range(instances)
    ]
    try:
        for api in apis:
            api.start()
        pids = [api.process.pid for api in apis if api.process]
        before = etcd_counters(urls[0])
        load = os.getloadavg()[0]
        started = time.monotonic()
        result = asyncio.run(
            heartbeats(
                [api.url for api in apis],
                pids,
                nodes,
                duration_s,
                [m.process.pid for m in cluster.members if m.process],
                period_s=period_s,
                # Two periods: every node's first contact (a write with an event each, the
                # whole fleet joining within one period) is over before the measurement;
                # with one period, the measured seconds queued behind the join.
                warmup_s=2 * period_s,
            )
        )
        elapsed = time.monotonic() - started
        after = etcd_counters(urls[0])
    finally:
        for api in apis:
            api.stop()
    return {
        "nodes": nodes,
        "api_instances": instances,
        "heartbeat_writes": heartbeat_writes,
        "load_average": load,
        "period_s": period_s,
        "warmup_s": 2 * period_s,
        "offered_per_s": nodes / period_s,
        "rate_per_s": result["rate_per_s"],
        "heartbeats": result["heartbeats"],
        "p50_ms": result["p50_ms"],
        "p99_ms": result["p99_ms"],
        "errors": result["errors"],
        "errors_by_cause": result["errors_by_cause"],
        # per instance: each API process's share of one core
        "api_cpu_pct": result["api_cpu_pct_per_instance"],
        # the three members together
        "etcd_cpu_pct": result["etcd_cpu_pct"],
        "api_cpu_ms_per_heartbeat": result["api_cpu_ms_per_heartbeat"],
        "etcd_cpu_ms_per_heartbeat": result["etcd_cpu_ms_per_heartbeat"],
        "p99_ms_by_second": result["p99_ms_by_second"],
        # what etcd sees per second (the whole run, seeding and warm-up included)
        "etcd_per_s": {k: (after[k] - before[k]) / elapsed for k in after},
    }


async def watch_frozen_member(
    workdir: Path, cluster: LocalEtcdCluster, watched: ApiProcess, rounds: int
) -> dict[str, Any]:
    """Round r freezes member r % 3: the watched API lists the members in order, so its
    watch starts on member 0 and each failover moves it (and its other requests) to the
    next one."""
    revision = await seed(watched.url, 2)
    urls = cluster.client_urls
    wakeups: list[float] = []
    rounds_seen: list[dict[str, Any]] = []
    async with ApiClient([watched.url], TOKEN) as client:
        for r in range(rounds):
            carrier = r % len(urls)
            others = [u for i, u in enumerate(urls) if i != carrier]
            writer = ApiProcess(workdir, {"kind": "etcd", "endpoints": others})
            writer.start()
            process = cluster.members[carrier].process
            assert process is not None
            # Freezing the leader adds an election to the wake-up (the write waits for it).
            was_leader = cluster.leader_index() == carrier
            try:
                waiter = asyncio.create_task(client.watch_state(revision, timeout_s=30))
                await asyncio.sleep(0.3)  # parked: from now on only a notification wakes it
                process.send_signal(signal.SIGSTOP)
                async with ApiClient([writer.url], TOKEN) as via_writer:
                    started = time.perf_counter()
                    state = await via_writer.put_site(f"w{r}", SiteSpec(), revision=revision)
                seen = await waiter
                wakeups.append(time.perf_counter() - started)
                rounds_seen.append(
                    {"member": carrier, "leader": was_leader, "ms": round(1000 * wakeups[-1], 1)}
                )
                assert seen.revision >= state.revision, (seen.revision, state.revision)
                revision = state.revision
            finally:
                process.send_signal(signal.SIGCONT)
                writer.stop()
                cluster.wait_healthy()
    return {
        "p50_ms": 1000 * percentile(wakeups, 0.5),
        "max_ms": 1000 * max(wakeups),
        "n": len(wakeups),
        "rounds": rounds_seen,
    }


async def leader_kill(url: str, cluster: LocalEtcdCluster, duration_s: float) -> dict[str, Any]:
    revision = await seed(url, 2)
    acknowledged: list[str] = []
    ack_times: list[float] = []
    failed = 0
    killed_at = None
    async with ApiClient([url], TOKEN, timeout_s=3) as client:
        start = time.monotonic()
        i = 0
        while time.monotonic() - start < duration_s:
            if killed_at is None and time.monotonic() - start > duration_s / 3:
                leader = cluster.leader_index()
                assert leader is not None
                cluster.kill(leader)
                killed_at = time.monotonic()
            name = f"s{i}"
            i += 1
            try:
                state = await client.put_service(
                    name, ServiceSpec(prefix=f"198.51.100.{i % 250}/32"), revision=revision
                )
            except ApiError:
                failed += 1
                try:
                    revision = (await client.state()).revision
                except ApiError:
                    await asyncio.sleep(0.05)
                continue
            revision = state.revision
            acknowledged.append(name)
            ack_times.append(time.monotonic())
        final = await client.state()
    gaps = [b - a for a, b in itertools.pairwise(ack_times)]
    lost = [name for name in acknowledged if name not in final.services]
    return {
        "writes_acknowledged": len(acknowledged),
        "writes_failed": failed,
        "longest_gap_s": max(gaps) if gaps else float("nan"),
        "acknowledged_lost": len(lost),
    }


def table(results: dict[str, Any]) -> str:
    rows = [("measurement", "result", "target")]
    for store, r in results["write_to_watch"].items():
        rows.append(
            (
                f"write -> node sees it ({store}, {r['writes']} writes)",
                f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms",
                "<= 50 ms",
            )
        )
    for r in results["heartbeats"] + results.get("heartbeats_every_write", []):
        writes = " every write" if r.get("heartbeat_writes") == "every" else ""
        rows.append(
            (
                f"{r['nodes']} nodes x 1 heartbeat/s, {r['duration_s']:.0f} s"
                f" ({r['store']}{writes}) [took {r['elapsed_s']:.1f} s,"
                f" load {r['load_average']:.1f}]",
                f"{r['rate_per_s']:.0f}/s p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms, "
                f"{r['errors']} errors, API CPU {r['api_cpu_pct']:.0f}%"
                + (f", etcd CPU {r['etcd_cpu_pct']:.0f}%" if r["store"] == "etcd" else ""),
                "p99 <= 50 ms, 0 errors",
            )
        )
    for key in ("simulation_10000", "simulation_10000_every_write"):
        sim = results.get(key)
        if not sim:
            continue
        per_s = sim["etcd_per_s"]
        writes = ", every write" if sim.get("heartbeat_writes") == "every" else ""
        rows.append(
            (
                f"simulation: {sim['nodes']} nodes / {sim['api_instances']} APIs, one heartbeat"
                f" per {sim['period_s']:g} s each ({sim['offered_per_s']:.0f}/s offered{writes},"
                f" load {sim['load_average']:.1f})",
                f"{sim['rate_per_s']:.0f}/s p50 {sim['p50_ms']:.1f} ms p99 {sim['p99_ms']:.1f} ms,"
                f" {sim['errors']} errors; API CPU "
                + "/".join(f"{c:.0f}" for c in sim["api_cpu_pct"])
                + f"% (per instance), {sim['api_cpu_ms_per_heartbeat']:.2f} ms/heartbeat;"
                f" etcd CPU {sim['etcd_cpu_pct']:.0f}% (3 members),"
                f" {sim['etcd_cpu_ms_per_heartbeat']:.2f} ms/heartbeat; etcd sees"
                f" {per_s['txns']:.0f} txn/s, {per_s['puts']:.0f} put/s,"
                f" {per_s['proposals']:.0f} proposals/s",
                "0 errors; costs per heartbeat",
            )
        )
    f = results.get("watch_frozen_member")
    if f:
        rows.append(
            (
                f"watch wake-up, watch's etcd member frozen (n={f['n']})",
                f"p50 {f['p50_ms']:.0f} ms, max {f['max_ms']:.0f} ms",
                "well under the long-poll deadline",
            )
        )
    k = results.get("leader_kill")
    if k:
        rows.append(
            (
                "etcd leader kill -9 during writes",
                f"longest write gap {k['longest_gap_s']:.2f} s, {k['writes_acknowledged']} acked,"
                f" {k['writes_failed']} failed, {k['acknowledged_lost']} acked lost",
                "<= 2 s, 0 lost",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def sqlite_part(
    workdir: Path, args: argparse.Namespace, results: dict[str, Any], apis: list[ApiProcess]
) -> None:
    sqlite_api = ApiProcess(
        workdir, {"kind": "sqlite", "path": str(workdir / "gslb.db")}, max_body_bytes=4 << 20
    )
    apis.append(sqlite_api)
    sqlite_api.start()
    print("write -> watch (sqlite)...", file=sys.stderr)
    results["write_to_watch"]["sqlite"] = asyncio.run(write_to_watch(sqlite_api.url, args.writes))
    for nodes in args.nodes:
        print(f"heartbeats: {nodes} nodes for {args.duration} s...", file=sys.stderr)
        assert sqlite_api.process is not None
        load = os.getloadavg()[0]
        result = asyncio.run(
            heartbeats([sqlite_api.url], [sqlite_api.process.pid], nodes, args.duration)
        )
        results["heartbeats"].append({"store": "sqlite", "load_average": load, **result})
    sqlite_api.stop()


def etcd_part(
    workdir: Path,
    cluster: LocalEtcdCluster,
    args: argparse.Namespace,
    parts: set[str],
    results: dict[str, Any],
    apis: list[ApiProcess],
) -> None:
    etcd_pids = [m.process.pid for m in cluster.members if m.process]
    etcd_apis: dict[str, ApiProcess] = {}
    for writes in ("changes", "every"):
        store = {
            "kind": "etcd",
            "endpoints": cluster.client_urls,
            "request_timeout_s": 0.3,
            "prefix": "/anycast-edge/" if writes == "changes" else "/every-write/",
            "heartbeat_writes": writes,
        }
        etcd_apis[writes] = api = ApiProcess(workdir, store, max_body_bytes=4 << 20)
        apis.append(api)
        api.start()
    etcd_api = etcd_apis["changes"]
    if "etcd" in parts:
        print("write -> watch (etcd)...", file=sys.stderr)
        results["write_to_watch"]["etcd"] = asyncio.run(write_to_watch(etcd_api.url, args.writes))
        for nodes in args.etcd_nodes:
            # The write rule on (the default), then off (each heartbeat written): the
            # reference, on the same cluster, under its own prefix.
            for writes, key in (("changes", "heartbeats"), ("every", "heartbeats_every_write")):
                api = etcd_apis[writes]
                print(
                    f"heartbeats (etcd, {writes}): {nodes} nodes for {args.duration} s...",
                    file=sys.stderr,
                )
                assert api.process is not None
                load = os.getloadavg()[0]
                result = asyncio.run(
                    heartbeats([api.url], [api.process.pid], nodes, args.duration, etcd_pids)
                )
                results[key].append(
                    {"store": "etcd", "heartbeat_writes": writes, "load_average": load, **result}
                )
    etcd_apis["every"].stop()
    if "frozen" in parts:
        print("watch with a frozen member...", file=sys.stderr)
        results["watch_frozen_member"] = asyncio.run(
            watch_frozen_member(workdir, cluster, etcd_api, args.frozen_rounds)
        )
    if "kill" in parts:
        print("etcd leader kill...", file=sys.stderr)
        results["leader_kill"] = asyncio.run(leader_kill(etcd_api.url, cluster, args.kill_duration))
    etcd_api.stop()


def main() -> int:
    uvloop.install()  # the load generator's own CPU per request, halved
    # One socket per simulated node: make room for a thousand of them.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--writes", type=int, default=100)
    parser.add_argument("--nodes", type=int, nargs="*", default=[250, 1000])
    parser.add_argument("--etcd-nodes", type=int, nargs="*", default=[250, 1000])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--kill-duration", type=float, default=9.0)
    parser.add_argument("--frozen-rounds", type=int, default=6)
    parser.add_argument("--sim-nodes", type=int, default=10_000)
    parser.add_argument("--sim-instances", type=int, default=3)
    parser.add_argument(
        "--sim-period", type=float, default=10.0, help="seconds between a node's heartbeats"
    )
    parser.add_argument("--sim-duration", type=float, default=20.0)
    parser.add_argument(
        "--only",
        nargs="*",
        choices=["sqlite", "etcd", "frozen", "kill", "simulation"],
        help="run only these parts (default: all)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results/api.json"))
    args = parser.parse_args()
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count()},
        "write_to_watch": {},
        "heartbeats": [],
        "heartbeats_every_write": [],
    }
    parts = set(args.only or ["sqlite", "etcd", "frozen", "kill", "simulation"])
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        workdir = Path(tmp)
        cluster = LocalEtcdCluster(workdir / "etcd")
        apis: list[ApiProcess] = []
        try:
            if "sqlite" in parts:
                sqlite_part(workdir, args, results, apis)
            if parts & {"etcd", "frozen", "kill"}:
                cluster.start()
                etcd_part(workdir, cluster, args, parts, results, apis)
                cluster.stop()
            if "simulation" in parts:
                for writes, key in (
                    ("changes", "simulation_10000"),
                    ("every", "simulation_10000_every_write"),
                ):
                    # A cluster of its own each: ten thousand nodes' records would weigh on
                    # the rows above, and on each other.
                    cluster.stop()
                    cluster = LocalEtcdCluster(workdir / f"etcd-simulation-{writes}")
                    cluster.start()
                    print(
                        f"simulation ({writes}): {args.sim_nodes} nodes, {args.sim_instances}"
                        f" APIs, one per {args.sim_period} s, {args.sim_duration} s...",
                        file=sys.stderr,
                    )
                    results[key] = simulation(
                        workdir,
                        cluster,
                        args.sim_nodes,
                        args.sim_instances,
                        args.sim_period,
                        args.sim_duration,
                        writes,
                        prefix=f"/simulation-{writes}/",
                    )
        finally:
            for api in apis:
                api.stop()
            cluster.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\n(written to {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
