"""The docker-compose lab: `python -m deploy.lab up|down|status|chaos ...` (`make lab`,
`edgectl lab ...`).

    up      makes the machine lab-ready (scripts/lab-docker.sh), builds the images, starts
            the lab, seeds the GSLB (two sites, four nodes), waits until every edge is
            announced and alive, then prints the fleet and a short burst of client traffic
    down    removes everything the lab made: containers, networks, volumes, host rules
            (`--stop-engine` also stops a dockerd that the lab itself started)
    status  containers, routers' BGP sessions and FIB next-hops, the GSLB's view
    chaos   kill NODE | freeze NODE | cut-link NODE | fail-service SERVICE | partition-api-etcd |
            kill-etcd-leader | heal (heal undoes every one of them)
            (NODE: any edge, edge-c1/edge-c2 of the active-passive site-c included)

Traffic only ever goes between the lab's own containers (and from this host to the
lab's API and etcd addresses on the lab's bridges); every wait and load is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from contract.client import ApiClient, ApiError
from contract.schemas import DesiredSpec, DrainKind, NodeSpec, SiteSpec, WeightsUpdate
from edgectl import contexts

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROJECT = "anycast-lab"
LABEL = "anycast-edge-lab.role"
VIP = "198.51.100.10"
OPERATOR_TOKEN = "lab-operator-token"
ENGINE_STATE = Path("/run/anycast-edge-lab")
# The edges' services (deploy/lab/edge-*.yaml `services:`): name -> its VIPs, IPv4 and IPv6,
# each announced as a host route (/32, /128) while the service is healthy.
SERVICES = {
    "web": ("198.51.100.10", "2001:db8:100::10"),
    "app": ("198.51.100.20", "2001:db8:100::20"),
}
VIP6 = SERVICES["web"][1]
# A backend container fails SERVICE's health checks while this file exists (entrypoint.sh).
BACKEND_FAIL_FILE = "/run/lab/fail-{service}"

SITES = {"site-a": ("edge-a1", "edge-a2"), "site-b": ("edge-b1", "edge-b2")}
NODES = [node for nodes in SITES.values() for node in nodes]
NODE_SITE = {node: site for site, nodes in SITES.items() for node in nodes}
EDGE_ADDRESS = {
    "edge-a1": "198.18.10.11",
    "edge-a2": "198.18.10.12",
    "edge-b1": "198.18.20.11",
    "edge-b2": "198.18.20.12",
}
SITE_ROUTER = {"site-a": "router-a", "site-b": "router-b"}
# Each network's IPv6 /64 is 2001:db8:18:N:: for 198.18.N.0/24, with the same host part.
EDGE_ADDRESS6 = {
    "edge-a1": "2001:db8:18:10::11",
    "edge-a2": "2001:db8:18:10::12",
    "edge-b1": "2001:db8:18:20::11",
    "edge-b2": "2001:db8:18:20::12",
}
# The core's next-hop toward each site router.
SITE_NEXT_HOP = {"site-a": "198.18.1.2", "site-b": "198.18.2.2"}
SITE_NEXT_HOP6 = {"site-a": "2001:db8:18:1::2", "site-b": "2001:db8:18:2::2"}
CLIENT_ADDRESS6 = "2001:db8:18::10"
API_URLS = {"api-a": "http://198.18.10.30:8080", "api-b": "http://198.18.20.30:8080"}
ETCD = {"etcd1": "198.18.100.11", "etcd2": "198.18.100.12", "etcd3": "198.18.100.13"}
ROUTERS = ("core", "router-a", "router-b")
# The lab's Prometheus (deploy/prometheus/), on the mgmt bridge: the host reaches it.
PROMETHEUS_URL = "http://198.18.100.50:9090"
# What it scrapes: every edge's metrics listener and both APIs (the prometheus.yml jobs).
SCRAPE_JOBS = {"anycast-edge": len(NODES), "gslb-api": len(API_URLS), "prometheus": 1}
# One service per image: building these builds every image of the lab.
IMAGE_SERVICES = ("etcd1", "client", "core", "backend-a1", "api-a", "edge-a1", "prometheus")
# Site c: one L2 segment, an active-passive pair (deploy/lab/edge-c*.yaml `vip_group:`) in
# front of its backends, no BGP to its edges and no anycast: router-c announces the segment
# to the core and reaches the group's VIP by ARP. Its nodes are in the GSLB (capacity 0:
# they take no anycast share) and are not in NODES, which are the anycast edges.
AP_SITE = "site-c"
AP_GROUP = "site-c"
AP_NODES = ("edge-c1", "edge-c2")
AP_ADDRESS = {"edge-c1": "198.18.40.11", "edge-c2": "198.18.40.12"}
AP_VIP = "198.18.40.100"
AP_SEGMENT = "198.18.40.0/24"
AP_ROUTER = "router-c"
AP_CORE_NEXT_HOP = "198.18.3.2"
ALL_NODES = [*NODES, *AP_NODES]
# Bridged frames between lab containers whose source is a lab address: Docker's isolation
# rules for internal networks would drop every packet whose source or destination is
# outside the bridge's subnet, i.e. all routed traffic between the lab's routers.
BRIDGE_RULES = (
    ["-s", "198.18.0.0/15", "-m", "physdev", "--physdev-is-bridged", "-j", "ACCEPT"],
    ["-s", "198.51.100.0/24", "-m", "physdev", "--physdev-is-bridged", "-j", "ACCEPT"],
)
# The same for IPv6, where Docker keeps such a chain (its ip6tables mode); 20.10 by default
# makes no IPv6 rules at all and bridged IPv6 frames pass as they are.
BRIDGE_RULES6 = (["-s", "2001:db8::/32", "-m", "physdev", "--physdev-is-bridged", "-j", "ACCEPT"],)


class LabError(Exception):
    """Something the lab could not do, said in one line."""


def say(message: str) -> None:
    print(f"lab: {message}", flush=True)


def run(
    *cmd: str, timeout: float = 60.0, check: bool = True, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(cmd),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        input=input_text,
    )
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise LabError(f"{' '.join(cmd[:4])}...: {detail[-1] if detail else result.returncode}")
    return result


def container(service: str) -> str:
    return f"lab-{service}"


def dexec(service: str, *cmd: str, timeout: float = 30.0, check: bool = True) -> str:
    return run("docker", "exec", container(service), *cmd, timeout=timeout, check=check).stdout


def compose_command() -> list[str]:
    base = ["docker-compose"] if shutil.which("docker-compose") else ["docker", "compose"]
    return [*base, "-p", PROJECT, "-f", str(COMPOSE_FILE)]


PROGRESS_EVERY_S = 10.0


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2
) -> None:
    """Poll until `predicate()` holds; bounded. LabError naming what we waited for. A wait
    longer than PROGRESS_EVERY_S says what it is still waiting for, with the seconds so far."""
    started = time.monotonic()
    deadline = started + timeout
    next_note = started + PROGRESS_EVERY_S
    while True:
        with contextlib.suppress(LabError, subprocess.TimeoutExpired, httpx.HTTPError, ApiError):
            if predicate():
                return
        now = time.monotonic()
        if now > deadline:
            raise LabError(f"gave up after {timeout:.0f} s waiting for {what}")
        if now >= next_note:
            say(f"still waiting for {what} ({now - started:.0f} s)")
            next_note = now + PROGRESS_EVERY_S
        time.sleep(interval)


def wait_until_none(
    problem: Callable[[], str | None], timeout: float, what: str, interval: float = 0.2
) -> None:
    """Poll until `problem()` finds nothing wrong (None); bounded. `problem()` says what is
    not there yet, and the LabError on giving up (and each progress note) quotes its last
    answer: the wait names what it was missing, not only what it waited for."""
    started = time.monotonic()
    deadline = started + timeout
    next_note = started + PROGRESS_EVERY_S
    last = "not asked yet"
    while True:
        try:
            found = problem()
        except (LabError, subprocess.TimeoutExpired, httpx.HTTPError, ApiError) as error:
            found = f"{type(error).__name__}: {error}"
        if found is None:
            return
        last = found
        now = time.monotonic()
        if now > deadline:
            raise LabError(f"gave up after {timeout:.0f} s waiting for {what}: {last}")
        if now >= next_note:
            say(f"still waiting for {what} ({now - started:.0f} s): {last}")
            next_note = now + PROGRESS_EVERY_S
        time.sleep(interval)


# -- engine and images ------------------------------------------------------------------


def engine_running() -> bool:
    return (
        shutil.which("docker") is not None
        and run("docker", "info", timeout=20, check=False).returncode == 0
    )


def ensure_engine() -> bool:
    """Make the machine lab-ready; True when this call started dockerd."""
    started_before = engine_running()
    process = subprocess.run(["bash", str(ROOT / "scripts" / "lab-docker.sh")], check=False)
    if process.returncode != 0:
        raise LabError("scripts/lab-docker.sh failed (see above)")
    return not started_before


def stop_engine_if_ours() -> None:
    """Stop the dockerd that scripts/lab-docker.sh started (never one we did not start)."""
    owner = ENGINE_STATE / "dockerd.owner"
    pid_file = ENGINE_STATE / "dockerd.pid"
    if not owner.exists() or not pid_file.exists():
        return
    with contextlib.suppress(ValueError, ProcessLookupError, FileNotFoundError):
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.2)
        say("stopped dockerd (the lab had started it)")
    owner.unlink(missing_ok=True)


def build_images() -> None:
    say("building images (deploy/docker/Dockerfile; cached layers are reused)")
    process = subprocess.Popen(
        [*compose_command(), "build", *IMAGE_SERVICES],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    assert process.stdout is not None
    tail: list[str] = []
    for raw in process.stdout:
        line = raw.rstrip()
        tail = [*tail[-30:], line]
        if line.startswith(("Building ", "Step ", "Successfully tagged")):
            print(f"  {line[:110]}", flush=True)
    if process.wait() != 0:
        print("\n".join(tail), file=sys.stderr)
        raise LabError("image build failed")


def allow_bridged_traffic() -> None:
    allow_bridged_traffic6()
    if not shutil.which("iptables"):
        return
    if run("iptables", "-S", "DOCKER-USER", check=False).returncode != 0:
        return  # no Docker firewall chain: nothing drops bridged traffic
    for rule in BRIDGE_RULES:
        if run("iptables", "-C", "DOCKER-USER", *rule, check=False).returncode != 0:
            run("iptables", "-I", "DOCKER-USER", *rule)


def allow_bridged_traffic6() -> None:
    if not shutil.which("ip6tables"):
        return
    if run("ip6tables", "-S", "DOCKER-USER", check=False).returncode != 0:
        return
    for rule in BRIDGE_RULES6:
        if run("ip6tables", "-C", "DOCKER-USER", *rule, check=False).returncode != 0:
            run("ip6tables", "-I", "DOCKER-USER", *rule)


def remove_bridged_rules6() -> None:
    if not shutil.which("ip6tables"):
        return
    for rule in BRIDGE_RULES6:
        while run("ip6tables", "-C", "DOCKER-USER", *rule, check=False).returncode == 0:
            run("ip6tables", "-D", "DOCKER-USER", *rule, check=False)


def remove_bridged_rules() -> None:
    remove_bridged_rules6()
    if not shutil.which("iptables"):
        return
    for rule in BRIDGE_RULES:
        while run("iptables", "-C", "DOCKER-USER", *rule, check=False).returncode == 0:
            run("iptables", "-D", "DOCKER-USER", *rule, check=False)


# -- the GSLB ----------------------------------------------------------------------------


def api_call(make: Callable[[ApiClient], Any], endpoints: Sequence[str] | None = None) -> Any:
    """Run `await make(client)` against the lab's APIs (any that answers)."""

    async def go() -> Any:
        urls = list(endpoints or API_URLS.values())
        async with ApiClient(urls, OPERATOR_TOKEN, timeout_s=3) as client:
            return await make(client)

    return asyncio.run(go())


def seed() -> int:
    """Two sites and four nodes at equal weights, unless the GSLB already has them."""

    async def go(client: ApiClient) -> int:
        state = await client.state()
        if set(state.nodes) == {*NODES, *AP_NODES}:
            return state.revision
        spec = DesiredSpec(
            sites={site: SiteSpec() for site in SITES} | {AP_SITE: SiteSpec()},
            nodes={node: NodeSpec(site=NODE_SITE[node]) for node in NODES}
            | {node: NodeSpec(site=AP_SITE, capacity_mbps=0) for node in AP_NODES},
        )
        return (await client.apply_state(spec, revision=state.revision)).revision

    revision: int = api_call(go)
    return revision


def set_site_weights(weights: dict[str, int]) -> int:
    async def go(client: ApiClient) -> int:
        state = await client.state()
        update = WeightsUpdate(sites=weights)
        return (await client.set_weights(update, revision=state.revision)).revision

    revision: int = api_call(go)
    return revision


def drain(kind: DrainKind, name: str, reason: str = "lab") -> int:
    async def go(client: ApiClient) -> int:
        state = await client.state()
        return (await client.drain(kind, name, reason, revision=state.revision)).revision

    revision: int = api_call(go)
    return revision


def undrain_all() -> None:
    async def go(client: ApiClient) -> None:
        for item in await client.drains():
            state = await client.state()
            await client.undrain(item.kind, item.name, revision=state.revision)

    api_call(go)


def gslb_view() -> dict[str, Any]:
    """Effective weights, liveness and state per node, drains (from any API that answers)."""

    async def go(client: ApiClient) -> dict[str, Any]:
        weights = await client.effective_weights()
        observed = await client.observed()
        drains = await client.drains()
        return {
            "revision": weights.revision,
            "sites": weights.sites,
            "nodes": {
                o.node: {
                    "liveness": str(o.liveness),
                    "state": str(o.heartbeat.state) if o.heartbeat else "",
                    "applied_revision": o.heartbeat.applied_revision if o.heartbeat else None,
                    "effective_weight": weights.nodes.get(o.node, 0.0),
                }
                for o in observed
            },
            "drains": [f"{d.kind}:{d.name}" for d in drains],
            "groups": vip_groups(observed),
        }

    view: dict[str, Any] = api_call(go)
    return view


def vip_groups(observed: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Active-passive groups as their alive nodes report them: vip, active nodes, members."""
    groups: dict[str, dict[str, Any]] = {}
    for o in observed:
        report = o.heartbeat.vip_group if o.heartbeat else None
        if report is None or str(o.liveness) != "alive":
            continue
        group = groups.setdefault(report.group, {"vip": report.vip, "active": [], "members": {}})
        group["members"][o.node] = {
            "role": str(report.role),
            "term": report.term,
            "fencing_token": report.fencing_token,
            "last_transition": report.last_transition,
        }
        if str(report.role) == "active":
            group["active"] = sorted([*group["active"], o.node])
    return groups


# -- routers -----------------------------------------------------------------------------


def fib_nexthops(router: str, prefix: str = VIP) -> dict[str, int]:
    """Kernel next-hops of a VIP (IPv4 or IPv6) in a router container: gateway -> weight."""
    family, length = ("-6", 128) if ":" in prefix else ("-4", 32)
    out = dexec(
        router, "ip", family, "-j", "-d", "route", "show", "exact", f"{prefix}/{length}",
        check=False,
    )  # fmt: skip
    hops: dict[str, int] = {}
    for route in json.loads(out or "[]"):
        if "gateway" in route:
            hops[route["gateway"]] = 1
        for hop in route.get("nexthops", []):
            hops[hop["gateway"]] = int(hop.get("weight", 1))
    return hops


def service_routes(router: str) -> dict[str, dict[str, int]]:
    """Every lab VIP (both services, both families) -> its next-hops in a router's FIB."""
    return {vip: fib_nexthops(router, vip) for vips in SERVICES.values() for vip in vips}


def bgp_sessions(router: str) -> dict[str, str]:
    data = json.loads(dexec(router, "vtysh", "-c", "show bgp neighbors json", check=False) or "{}")
    return {peer: info.get("bgpState", "") for peer, info in data.items()}


def bfd_peers(router: str) -> dict[str, str]:
    data = json.loads(dexec(router, "vtysh", "-c", "show bfd peers json", check=False) or "[]")
    return {p.get("peer", ""): p.get("status", "") for p in data}


def forwarded_packets(router: str) -> int:
    """Packets the router's kernel forwarded so far (Ip: ForwDatagrams)."""
    lines = dexec(router, "cat", "/proc/net/snmp").splitlines()
    ip = [line.split() for line in lines if line.startswith("Ip:")]
    return int(ip[1][ip[0].index("ForwDatagrams")])


def forwarded_packets6(router: str) -> int:
    """IPv6 packets the router's kernel forwarded so far (Ip6OutForwDatagrams)."""
    for line in dexec(router, "cat", "/proc/net/snmp6").splitlines():
        name, _, value = line.partition(" ")
        if name == "Ip6OutForwDatagrams":
            return int(value.strip())
    raise LabError(f"{router}: no Ip6OutForwDatagrams in /proc/net/snmp6")


def site_shares_at_core() -> dict[str, float]:
    hops = fib_nexthops("core")
    total = sum(hops.values())
    return {
        site: (hops.get(hop, 0) / total if total else 0.0) for site, hop in SITE_NEXT_HOP.items()
    }


# -- containers --------------------------------------------------------------------------


def containers() -> dict[str, str]:
    """Lab container name -> state (running, paused, exited...)."""
    out = run(
        "docker", "ps", "-a", "--filter", f"label={LABEL}",
        "--format", "{{.Names}} {{.State}}", check=False,
    ).stdout  # fmt: skip
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def lab_networks() -> list[str]:
    out = run(
        "docker", "network", "ls", "--filter", f"label=com.docker.compose.project={PROJECT}",
        "--format", "{{.Name}}", check=False,
    ).stdout  # fmt: skip
    return out.split()


# -- traffic -----------------------------------------------------------------------------


def burst(count: int = 200, timeout: float = 60.0, host: str = VIP) -> dict[str, Any]:
    """`count` new connections from the client to a VIP (`host`, IPv4 or IPv6; web's IPv4
    one by default) port 80, one after the other: a summary."""
    out = dexec(
        "client", "python", "-m", "deploy.lab_client", "burst",
        "--count", str(count), "--timeout", str(timeout), "--host", host, timeout=timeout + 30,
    )  # fmt: skip
    summary: dict[str, Any] = json.loads(out)
    return summary


def _records(process: subprocess.Popen[str], duration: float, what: str) -> list[dict[str, Any]]:
    """The JSON records a load in the client container printed, once it ended."""
    out, err = process.communicate(timeout=duration + 60)
    if process.returncode != 0:
        raise LabError(f"{what} failed: {err.strip()[-200:]}")
    records: list[dict[str, Any]] = json.loads(out)
    return records


class Load:
    """A steady client load running in the client container (bounded); `result()` returns
    one record per request: start, end, ok, node, site, error."""

    def __init__(
        self, duration: float, workers: int = 4, pause: float = 0.01, host: str = VIP
    ) -> None:
        self.duration = duration
        self.process = subprocess.Popen(
            [
                "docker", "exec", container("client"), "python", "-m", "deploy.lab_client",
                "run", "--duration", str(duration), "--workers", str(workers),
                "--pause", str(pause), "--host", host,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip

    def result(self) -> list[dict[str, Any]]:
        return _records(self.process, self.duration, "client load")


@contextlib.contextmanager
def load(duration: float, workers: int = 4, pause: float = 0.01, host: str = VIP) -> Iterator[Load]:
    running = Load(duration, workers, pause, host)
    try:
        yield running
    finally:
        if running.process.poll() is None and running.process.returncode is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                running.process.wait(timeout=duration + 60)


# -- chaos -------------------------------------------------------------------------------


def _interface_for(service: str, prefix: str) -> str:
    """The container's interface holding an address that starts with `prefix`."""
    for entry in json.loads(dexec(service, "ip", "-j", "-4", "addr", "show")):
        for info in entry.get("addr_info", []):
            if str(info.get("local", "")).startswith(prefix):
                return str(entry["ifname"])
    raise LabError(f"{service} has no interface in {prefix}*")


def blackhole(service: str, prefix: str) -> str:
    """Drop everything a container sends on one interface, without carrier loss (this kernel
    has no netem: a zero-length pfifo does it)."""
    dev = _interface_for(service, prefix)
    dexec(service, "tc", "qdisc", "replace", "dev", dev, "root", "pfifo", "limit", "0")
    return dev


def chaos_kill(node: str) -> None:
    run("docker", "kill", container(node))


def chaos_freeze(node: str) -> None:
    run("docker", "pause", container(node))


def chaos_cut_link(node: str) -> None:
    blackhole(node, {**EDGE_ADDRESS, **AP_ADDRESS}[node].rsplit(".", 1)[0] + ".")


def chaos_partition_api_etcd() -> None:
    for api in API_URLS:
        blackhole(api, "198.18.100.")


def etcd_leader() -> str:
    """The etcd member (etcd1..3) that is leader now, asked over the v3 JSON gateway."""
    ids: dict[int, str] = {}
    leader = 0
    for name, address in ETCD.items():
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            data = httpx.post(
                f"http://{address}:2379/v3/maintenance/status", json={}, timeout=2
            ).json()
            ids[int(data["header"]["member_id"])] = name
            leader = int(data["leader"])
    if leader not in ids:
        raise LabError("no etcd member names a leader")
    return ids[leader]


def chaos_kill_etcd_leader() -> str:
    leader = etcd_leader()
    run("docker", "kill", container(leader))
    return leader


def backends() -> list[str]:
    """The lab's backend containers (lab-backend-*), running or not."""
    out = run(
        "docker", "ps", "-a", "--filter", f"label={LABEL}=backend", "--format", "{{.Names}}",
        check=False,
    ).stdout  # fmt: skip
    return sorted(out.split())


def chaos_fail_service(service: str) -> list[str]:
    """Fail one service's health checks on every backend container (its process answers
    /health with 503 while the fail file exists): every edge withdraws that service's
    prefixes, both families; the other service is untouched. `chaos heal` undoes it."""
    if service not in SERVICES:
        raise LabError(f"service: expected one of {', '.join(SERVICES)} (got {service!r})")
    done = []
    for name in backends():
        run("docker", "exec", name, "touch", BACKEND_FAIL_FILE.format(service=service))
        done.append(name)
    return done


def chaos_heal() -> list[str]:
    """Undo every chaos action: unpause, start what was killed, remove blackholes, make
    failed services' backends healthy again."""
    done: list[str] = []
    for name, state in containers().items():
        if state == "paused":
            run("docker", "unpause", name)
            done.append(f"unpaused {name}")
    for name, state in containers().items():
        if state in ("exited", "dead", "created"):
            run("docker", "start", name)
            done.append(f"started {name}")
    for service in [*NODES, *AP_NODES, *API_URLS]:
        if containers().get(container(service)) != "running":
            continue
        for entry in json.loads(dexec(service, "ip", "-j", "link", "show", check=False) or "[]"):
            dev = str(entry.get("ifname", ""))
            if dev == "lo" or entry.get("qdisc") != "pfifo":
                continue
            dexec(service, "tc", "qdisc", "del", "dev", dev, "root", check=False)
            done.append(f"{service}: {dev} reconnected")
    for name in backends():
        if containers().get(name) != "running":
            continue
        fail_files = [BACKEND_FAIL_FILE.format(service=service) for service in SERVICES]
        listed = run("docker", "exec", name, "ls", *fail_files, check=False).stdout.split()
        if listed:
            run("docker", "exec", name, "rm", "-f", *listed, check=False)
            done.append(f"{name}: {', '.join(Path(f).name for f in listed)} removed")
    return done


# -- readiness and status ----------------------------------------------------------------


def announced_everywhere() -> bool:
    """Every edge's route in its site router's FIB, and both sites in the core's: for
    web's IPv4 VIP, then for every VIP of both services (`services_announced_everywhere`)."""
    for site, router in SITE_ROUTER.items():
        hops = fib_nexthops(router)
        if any(EDGE_ADDRESS[node] not in hops for node in SITES[site]):
            return False
    if set(fib_nexthops("core")) != set(SITE_NEXT_HOP.values()):
        return False
    return services_announced_everywhere()


def services_announced_everywhere() -> bool:
    """Both services' VIPs, IPv4 and IPv6: every edge's route in its site router's FIB (over
    the edge's IPv4 or IPv6 address), and both sites in the core's."""
    for vips in SERVICES.values():
        for vip in vips:
            edges, sites = (EDGE_ADDRESS6, SITE_NEXT_HOP6) if ":" in vip else (
                EDGE_ADDRESS, SITE_NEXT_HOP)  # fmt: skip
            for site, router in SITE_ROUTER.items():
                hops = fib_nexthops(router, vip)
                if any(edges[node] not in hops for node in SITES[site]):
                    return False
            if set(fib_nexthops("core", vip)) != set(sites.values()):
                return False
    return True


def bfd_up_everywhere() -> bool:
    """Every edge's BFD session up at its site router (fast failover armed)."""
    for site, router in SITE_ROUTER.items():
        peers = bfd_peers(router)
        if any(peers.get(EDGE_ADDRESS[node]) != "up" for node in SITES[site]):
            return False
        if any(peers.get(EDGE_ADDRESS6[node]) != "up" for node in SITES[site]):
            return False
    return True


def fleet_ready() -> bool:
    view = gslb_view()
    nodes = view["nodes"]
    alive = all(nodes.get(n, {}).get("liveness") == "alive" for n in NODES)
    return alive and announced_everywhere() and bfd_up_everywhere() and ap_problem(view) is None


# -- site c: the active-passive pair ------------------------------------------------------


def vip_holders() -> list[str]:
    """The site-c nodes whose kernel holds the group's VIP now (a stopped container holds
    nothing; a paused one is asked through its namespace by `docker exec`, which fails:
    LabError)."""
    held = []
    for node in AP_NODES:
        if containers().get(container(node)) not in ("running", "paused"):
            continue
        if dexec(node, "ip", "-o", "-4", "addr", "show", "to", AP_VIP).strip():
            held.append(node)
    return held


def segment_mac(service: str) -> str:
    """The MAC of a container's interface on the site-c segment."""
    dev = _interface_for(service, AP_SEGMENT.rsplit(".", 1)[0] + ".")
    return str(json.loads(dexec(service, "ip", "-j", "link", "show", "dev", dev))[0]["address"])


def router_neighbour(address: str = AP_VIP) -> dict[str, Any]:
    """router-c's neighbour entry for an address on the segment: lladdr and state ({} when
    it has none)."""
    out = dexec(AP_ROUTER, "ip", "-j", "-4", "neigh", "show", "to", address, check=False)
    entries = json.loads(out or "[]")
    return dict(entries[0]) if entries else {}


def ap_problem(view: dict[str, Any] | None = None) -> str | None:
    """What is not right yet at site c, or None: the core routes the segment to router-c,
    both nodes are alive in the GSLB, exactly one holds the VIP in its kernel and the group
    reports that one as its only active node."""
    routes = json.loads(dexec("core", "ip", "-j", "route", "show", "exact", AP_SEGMENT) or "[]")
    if not any(r.get("gateway") == AP_CORE_NEXT_HOP for r in routes):
        return f"the core has no route to {AP_SEGMENT} via {AP_CORE_NEXT_HOP}: {routes}"
    view = view or gslb_view()
    dead = [n for n in AP_NODES if view["nodes"].get(n, {}).get("liveness") != "alive"]
    if dead:
        return f"not alive in the GSLB: {', '.join(dead)}"
    holders = vip_holders()
    if len(holders) != 1:
        return f"{len(holders)} nodes hold {AP_VIP}: {holders}"
    active = view.get("groups", {}).get(AP_GROUP, {}).get("active", [])
    if active != holders:
        return f"the GSLB shows {active} active, {holders} holds the VIP"
    return None


AP_CLIENT = """
import json, sys, time
from deploy.lab_client import request
host, duration, per_request, pause, limit = sys.argv[1:6]
end = time.monotonic() + min(float(duration), 120.0)
records = []
while time.monotonic() < end and len(records) < min(int(limit), 20000):
    records.append(request(host, 80, float(per_request)))
    time.sleep(float(pause))
json.dump(records, sys.stdout)
"""


class ApLoad:
    """Requests from the client to site c's VIP (through the core and router-c), one
    after the other on new connections, for `duration` s at most and `limit` requests at
    most; `result()` returns one record per request (start, end, ok, node, error)."""

    def __init__(
        self, duration: float, per_request: float = 0.5, pause: float = 0.02, limit: int = 5000
    ) -> None:
        self.duration = duration
        self.process = subprocess.Popen(
            [
                "docker", "exec", container("client"), "python", "-c", AP_CLIENT,
                AP_VIP, str(duration), str(per_request), str(pause), str(limit),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip

    def result(self) -> list[dict[str, Any]]:
        return _records(self.process, self.duration, f"client load to {AP_VIP}")


def ap_burst(count: int = 20) -> dict[str, Any]:
    """`count` requests from the client to site c's VIP, one after the other: a summary."""
    records = ApLoad(duration=60, per_request=2.0, pause=0.0, limit=count).result()
    ok = [r for r in records if r["ok"]]
    return {
        "total": len(records),
        "failed": len(records) - len(ok),
        "by_node": dict(collections.Counter(r["node"] for r in ok)),
        "by_backend": dict(collections.Counter(r["backend"] for r in ok)),
    }


def ap_status() -> dict[str, Any]:
    """Site c: router-c's BGP, the core's route to the segment, who holds the VIP, and
    router-c's neighbour entry for it (with each node's MAC on the segment)."""
    states = containers()
    if states.get(container(AP_ROUTER)) != "running":
        return {"state": states.get(container(AP_ROUTER), "absent")}
    info: dict[str, Any] = {"bgp": bgp_sessions(AP_ROUTER), "neighbour": router_neighbour()}
    # A paused node cannot be asked (`docker exec` refuses): say so instead of guessing.
    info["paused"] = [n for n in AP_NODES if states.get(container(n)) == "paused"]
    info["holders"] = [] if info["paused"] else vip_holders()
    info["macs"] = {
        node: segment_mac(node) for node in AP_NODES if states.get(container(node)) == "running"
    }
    return info


def wait_ready(timeout: float = 180.0) -> None:
    started = time.monotonic()
    wait_for(lambda: set(bgp_sessions("core").values()) == {"Established"}, timeout,
             "the core's BGP sessions")  # fmt: skip
    say(f"core router: BGP up with both site routers ({time.monotonic() - started:.1f} s)")
    wait_for(lambda: api_call(lambda c: c.state()) is not None, timeout, "a GSLB API answering")
    revision = seed()
    say(f"GSLB API answering; sites and nodes seeded (revision {revision})")
    wait_until_none(ap_problem, timeout, "site-c's pair: one VIP owner, alive in the GSLB")
    wait_for(fleet_ready, timeout, "every edge alive in the GSLB, announced, BFD up")
    say(f"all four edges alive, announced, BFD up ({time.monotonic() - started:.1f} s)")
    say(f"site-c: {', '.join(vip_holders())} holds {AP_VIP}, the GSLB shows it active")


def prometheus_targets() -> list[dict[str, Any]]:
    """The lab Prometheus's active scrape targets (job, instance, health, last error)."""
    answer = httpx.get(f"{PROMETHEUS_URL}/api/v1/targets", params={"state": "active"}, timeout=3)
    answer.raise_for_status()
    return [
        {
            "job": t["labels"]["job"],
            "instance": t["labels"]["instance"],
            "health": t["health"],
            "error": t["lastError"],
        }
        for t in answer.json()["data"]["activeTargets"]
    ]


def prometheus_scrapes_everything() -> bool:
    """Every target of every job (SCRAPE_JOBS) was scraped and answered."""
    try:
        targets = prometheus_targets()
    except httpx.HTTPError:
        return False
    jobs = {job: [t for t in targets if t["job"] == job] for job in SCRAPE_JOBS}
    counted = all(len(jobs[job]) == count for job, count in SCRAPE_JOBS.items())
    return counted and all(t["health"] == "up" for t in targets)


def wait_prometheus(timeout: float = 60.0) -> None:
    """Until Prometheus scrapes every target (bounded). The lab serves without it: a target
    still down after the wait is a warning naming it and its scrape error, not a failure."""
    try:
        wait_for(prometheus_scrapes_everything, timeout, "Prometheus scraping every edge and API")
        say(f"Prometheus scrapes every edge and API: {PROMETHEUS_URL}/targets")
    except LabError:
        try:
            down = [t for t in prometheus_targets() if t["health"] != "up"]
        except httpx.HTTPError as exc:
            say(f"warning: Prometheus at {PROMETHEUS_URL} does not answer: {exc}")
            return
        for target in down:
            say(f"warning: Prometheus cannot scrape {target['job']} {target['instance']}: "
                f"{target['error'] or target['health']}")  # fmt: skip


def status() -> dict[str, Any]:
    result: dict[str, Any] = {"containers": containers()}
    if not result["containers"]:
        return result
    routers: dict[str, Any] = {}
    for router in ROUTERS:
        if result["containers"].get(container(router)) != "running":
            routers[router] = {"state": result["containers"].get(container(router), "absent")}
            continue
        routers[router] = {
            "fib": fib_nexthops(router),
            "bgp": bgp_sessions(router),
            "bfd": bfd_peers(router),
            "services": service_routes(router),
        }
    result["routers"] = routers
    try:
        result["site_c"] = ap_status()
    except LabError as exc:
        result["site_c"] = {"error": str(exc)}
    try:
        result["gslb"] = gslb_view()
    except (ApiError, httpx.HTTPError) as exc:
        result["gslb"] = {"error": str(exc)}
    return result


def print_status(data: dict[str, Any]) -> None:
    if not data["containers"]:
        print("the lab is not running")
        return
    states = data["containers"]
    odd = {name: state for name, state in states.items() if state != "running"}
    print(f"containers: {len(states)} ({len(states) - len(odd)} running)", end="")
    print("".join(f", {name} {state}" for name, state in sorted(odd.items())))
    for router, info in data.get("routers", {}).items():
        if "fib" not in info:
            print(f"{router:9} {info.get('state')}")
            continue
        fib = ", ".join(f"{hop} w{weight}" for hop, weight in sorted(info["fib"].items()))
        sessions = ", ".join(f"{peer} {state}" for peer, state in sorted(info["bgp"].items()))
        bfd = ", ".join(f"{peer} {state}" for peer, state in sorted(info["bfd"].items()))
        print(f"{router:9} VIP via [{fib or 'no route'}]")
        for vip, hops in info.get("services", {}).items():
            if vip == VIP:
                continue
            via = ", ".join(f"{hop} w{weight}" for hop, weight in sorted(hops.items()))
            print(f"{'':9} {vip} via [{via or 'no route'}]")
        print(f"{'':9} BGP: {sessions}")
        if bfd:
            print(f"{'':9} BFD: {bfd}")
    print_ap(data.get("site_c", {}))
    gslb = data.get("gslb", {})
    if "error" in gslb:
        print(f"GSLB: {gslb['error']}")
        return
    if gslb:
        sites = ", ".join(f"{site} {share:.0f}" for site, share in sorted(gslb["sites"].items()))
        drains = ", ".join(gslb["drains"]) or "none"
        print(f"GSLB revision {gslb['revision']}: site shares {sites}; drains: {drains}")
        print(f"  {'node':9} {'liveness':8} {'state':9} {'weight':>7} applied")
        for node, info in sorted(gslb["nodes"].items()):
            print(
                f"  {node:9} {info['liveness']:8} {info['state']:9} "
                f"{info['effective_weight']:7.1f} {info['applied_revision']}"
            )
        print_groups(gslb.get("groups", {}))


def print_ap(info: dict[str, Any]) -> None:
    if not info:
        return
    if "bgp" not in info:
        print(f"{AP_ROUTER:9} {info.get('state') or info.get('error')}")
        return
    sessions = ", ".join(f"{peer} {state}" for peer, state in sorted(info["bgp"].items()))
    macs = info["macs"]
    neighbour = info["neighbour"]
    owner = [n for n, mac in macs.items() if mac == neighbour.get("lladdr")]
    print(f"{AP_ROUTER:9} BGP: {sessions}")
    held = ", ".join(info["holders"]) or "nobody"
    if info.get("paused"):
        held = f"? ({', '.join(info['paused'])} paused: its kernel cannot be asked)"
    print(
        f"{'':9} {AP_VIP} held by [{held}]; neighbour "
        f"{neighbour.get('lladdr', 'none')} ({', '.join(owner) or 'no node'}) "
        f"{'/'.join(neighbour.get('state', []))}"
    )


def print_groups(groups: dict[str, Any]) -> None:
    for name, group in sorted(groups.items()):
        members = ", ".join(
            f"{node} {m['role']} (term {m['term']}, token {m['fencing_token']})"
            for node, m in sorted(group["members"].items())
        )
        print(f"  group {name} {group['vip']}: active {group['active'] or 'none'}; {members}")


def print_burst(summary: dict[str, Any]) -> None:
    print(f"client -> {VIP}:80, {summary['total']} new connections, {summary['failed']} failed")
    for site, count in sorted(summary["by_site"].items()):
        nodes = ", ".join(
            f"{node} {n}"
            for node, n in sorted(summary["by_node"].items())
            if NODE_SITE.get(node) == site
        )
        print(f"  {site}: {count} ({nodes})")


# -- commands ----------------------------------------------------------------------------


def up(build: bool = True, burst_count: int = 200) -> None:
    started = time.monotonic()
    ensure_engine()
    allow_bridged_traffic()
    if build:
        build_images()
    say("starting the lab (docker-compose up)")
    run(*compose_command(), "up", "-d", "--no-build", timeout=300)
    wait_ready()
    say(f"lab up in {time.monotonic() - started:.1f} s")
    wait_prometheus()
    print_status(status())
    print_burst(burst(burst_count))
    ap = ap_burst()
    print(f"client -> {AP_VIP}:80 (site-c), {ap['total']} new connections, {ap['failed']} failed: "
          f"{ap['by_node']}")  # fmt: skip
    path = write_context()
    say(f"edgectl context 'lab' is current ({path}); try:")
    first = next(iter(API_URLS.values()))
    for line in (
        "edgectl status",
        "edgectl drain edge-a1 --reason 'trying the lab' --wait",
        f"the status page: {first}/ui (sign in with the token in {path})",
        f"Prometheus (targets, alerts): {PROMETHEUS_URL}/alerts",
        "python -m deploy.lab chaos freeze edge-c1   (site-c's standby takes the VIP)",
    ):
        print(f"    {line}")


def write_context(path: Path | None = None) -> Path:
    """An edgectl context for the lab's APIs (both sites, for failover), made current."""
    context = contexts.Context(api=list(API_URLS.values()), token=OPERATOR_TOKEN)
    return contexts.put("lab", context, make_current=True, path=path)


def down(stop_engine: bool = False) -> None:
    if engine_running():
        say("removing the lab's containers, networks and volumes")
        compose_down = [*compose_command(), "down", "-v", "--remove-orphans", "-t", "2"]
        run(*compose_down, timeout=180, check=False)
        leftovers = list(containers())
        if leftovers:
            run("docker", "rm", "-f", "-v", *leftovers, timeout=120, check=False)
        for network in lab_networks():
            run("docker", "network", "rm", network, check=False)
        remove_bridged_rules()
    if stop_engine:
        stop_engine_if_ours()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.lab", description="the lab")
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="build and start the lab, wait, show status and traffic")
    p_up.add_argument("--no-build", action="store_true", help="use the images as they are")
    p_down = sub.add_parser("down", help="remove everything the lab made")
    p_down.add_argument("--stop-engine", action="store_true", help="stop a dockerd the lab started")
    p_status = sub.add_parser("status", help="containers, routers, GSLB")
    p_status.add_argument("--json", action="store_true")
    p_chaos = sub.add_parser("chaos", help="break something (bounded); `heal` undoes it all")
    p_chaos.add_argument(
        "action",
        choices=[
            "kill", "freeze", "cut-link", "partition-api-etcd", "kill-etcd-leader",
            "fail-service", "heal",
        ],
    )  # fmt: skip
    # A node (kill, freeze, cut-link) or a service (fail-service).
    p_chaos.add_argument("node", nargs="?", choices=[*ALL_NODES, *SERVICES], metavar="NODE|SERVICE")
    p_traffic = sub.add_parser("traffic", help="a burst of new client connections")
    p_traffic.add_argument("--count", type=int, default=200)
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            up(build=not args.no_build)
        elif args.command == "down":
            down(stop_engine=args.stop_engine)
        elif args.command == "status":
            data = status() if engine_running() else {"containers": {}}
            if args.json:
                print(json.dumps(data, indent=2, default=str))
            else:
                print_status(data)
        elif args.command == "traffic":
            print_burst(burst(args.count))
        else:
            return chaos(args.action, args.node)
    except LabError as exc:
        print(f"lab: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def chaos(action: str, node: str | None) -> int:
    if action in ("kill", "freeze", "cut-link") and node is None:
        print(f"lab: chaos {action} needs a node: {', '.join(ALL_NODES)}", file=sys.stderr)
        return 2
    if action in ("kill", "freeze", "cut-link") and node in SERVICES:
        print(f"lab: chaos {action} needs a node, not a service: {node}", file=sys.stderr)
        return 2
    if action == "fail-service" and node not in SERVICES:
        print(f"lab: chaos {action} needs a service: {', '.join(SERVICES)}", file=sys.stderr)
        return 2
    if action == "kill" and node:
        chaos_kill(node)
        say(f"killed {node} (heal: `chaos heal`)")
    elif action == "freeze" and node:
        chaos_freeze(node)
        say(f"froze {node}: paused, no TCP close, no BFD answer (heal: `chaos heal`)")
    elif action == "cut-link" and node:
        chaos_cut_link(node)
        say(f"cut {node}'s link: everything it sends is dropped (heal: `chaos heal`)")
    elif action == "partition-api-etcd":
        chaos_partition_api_etcd()
        say("partitioned both APIs from etcd (heal: `chaos heal`)")
    elif action == "fail-service" and node:
        failed = chaos_fail_service(node)
        say(f"failed service {node}'s health on {len(failed)} backends (heal: `chaos heal`)")
    elif action == "kill-etcd-leader":
        say(f"killed the etcd leader {chaos_kill_etcd_leader()} (heal: `chaos heal`)")
    else:
        for line in chaos_heal() or ["nothing to heal"]:
            say(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
