"""A throwaway network of namespaces with a real FRR or BIRD 2 router, for tests and
benchmarks.

    client ── router (zebra, bgpd, bfdd   ─┬─ edge 1 (anycast /32 on lo)
                      or bird)
                                          ├─ edge 2
                                          └─ edge 3

Names start with `ae-` plus a random suffix so concurrent runs never collide; links are
/30s in 198.18.0.0/15; the anycast range is 198.51.100.0/24. With `ipv6=True` every link
also gets a /64 in 2001:db8:ff00::/40 and each edge an IPv6 VIP (VIP6, a /128 in
2001:db8:100::/48) on lo; the router then peers over IPv6 too, or (`ipv6_over_ipv4`)
takes IPv6 NLRI over the IPv4 session. `NetLab.close()` kills every
process it started and deletes every namespace, whatever state the lab is in. Only
traffic inside these namespaces; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import yaml

from bgp.config import BgpConfig
from tests.support.procs import run, wait_for

FRR_DIR = Path("/usr/lib/frr")
BIRD = "/usr/sbin/bird"
ROUTER_ASN = 65000
EDGE_ASN_BASE = 65100
ANYCAST_RANGE = "198.51.100.0/24"
VIP = "198.51.100.10"
ANYCAST_RANGE6 = "2001:db8:100::/48"
VIP6 = "2001:db8:100::10"
# The client's IPv6 side (with ipv6=True).
CLIENT_ADDRESS6 = IPv6Address("2001:db8:ff00:ffff::2")
# On the router's lo, in every lab: the far end of multihop sessions.
ROUTER_LOOPBACK = IPv4Address("198.18.255.1")
MULTIHOP_TTL = 4
# BIRD's loopback sessions connect to the edge on this port (BIRD allows one session per
# neighbor address and port): the edge's neighbor for them is passive on it.
LOOPBACK_SESSION_PORT = 1179


_NAME_SERVER = """
import socket
s = socket.socket(socket.AF_INET6 if ":" in "{vip}" else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{vip}", {port}))
s.listen(512)
while True:
    c, _ = s.accept()
    c.sendall(b"{name}")
    c.close()
"""

_NAME_CLIENT = """
import collections, json, socket
counts = collections.Counter()
for _ in range({count}):
    try:
        c = socket.create_connection(("{vip}", {port}), timeout=2)
        counts[c.recv(16).decode() or "?"] += 1
        c.close()
    except OSError:
        counts["failed"] += 1
print(json.dumps(counts))
"""


def netns_command(netns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", netns, *cmd]


def admin_status(netns: str, port: int = 9901) -> dict[str, Any]:
    """An agent's /status, read from inside its namespace (admin is on its loopback)."""
    url = f"http://127.0.0.1:{port}/status"
    code = f"import urllib.request; print(urllib.request.urlopen({url!r}).read().decode())"
    return dict(json.loads(run(*netns_command(netns, sys.executable, "-c", code))))


@dataclass
class Edge:
    index: int
    netns: str
    address: IPv4Address  # the edge's side of its link to the router
    router_address: IPv4Address
    veth: str  # the edge's interface (blackhole it to freeze the edge)
    asn: int
    md5_password: str
    # With ipv6=True: the edge's and the router's IPv6 sides of the link.
    address6: IPv6Address | None = None
    router_address6: IPv6Address | None = None


def edge_bgp_config(
    edge: Edge, neighbor_overrides: dict[str, Any] | None = None, **overrides: Any
) -> BgpConfig:
    """The `bgp:` section for one lab edge, talking to the lab's router;
    `neighbor_overrides` go into that one neighbor (e.g. `hold_time_s`)."""
    data: dict[str, Any] = {
        "local_asn": edge.asn,
        "router_id": str(edge.address),
        "local_address": str(edge.address),
        "prefixes": [f"{VIP}/32"],
        "neighbors": [
            {
                "peer_address": str(edge.router_address),
                "peer_asn": ROUTER_ASN,
                "md5_password": edge.md5_password,
            }
            | (neighbor_overrides or {})
        ],
        "drain_prepends": 2,
    }
    if edge.address6 is not None:
        data["local_address_v6"] = str(edge.address6)
    data.update(overrides)
    return BgpConfig.model_validate(data)


def write_speaker_config(
    workdir: Path, edge: Edge, name: str = "", **overrides: Any
) -> tuple[Path, BgpConfig]:
    """A node.yaml with the edge's `bgp:` section (password included) for a process."""
    config = edge_bgp_config(edge, **overrides)
    data = json.loads(config.model_dump_json())
    for neighbor, given in zip(data["neighbors"], config.neighbors, strict=True):
        if given.md5_password is not None:
            neighbor["md5_password"] = given.md5_password.get_secret_value()
    path = workdir / f"node{edge.index}{name}.yaml"
    path.write_text(yaml.safe_dump({"bgp": data}))
    return path, config


class SpeakerProcess:
    """`python -m bgp.speaker` for one edge, as its own process (its own process group):
    the thing to SIGSTOP, SIGKILL or feed commands on stdin. `command()` returns the
    status line it prints after each command."""

    def __init__(
        self, lab: NetLab, edge: Edge, *args: str, name: str = "", **overrides: Any
    ) -> None:
        self.edge = edge
        self.config_path, self.config = write_speaker_config(lab.workdir, edge, name, **overrides)
        self.workdir = lab.workdir / f"speaker{edge.index}{name}"
        self.process = lab.spawn(
            [
                sys.executable, "-m", "bgp.speaker",
                "--config", str(self.config_path),
                "--workdir", str(self.workdir),
                "--netns", edge.netns,
                *args,
            ],
            stdout=subprocess.PIPE,
            stdin_pipe=True,
        )  # fmt: skip
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.decode(errors="replace"))

    def command(self, line: str, timeout: float = 15.0) -> dict[str, Any]:
        assert self.process.stdin is not None
        with contextlib.suppress(queue.Empty):  # forget older status lines
            while True:
                self._lines.get_nowait()
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no status line after {line!r}")
            with contextlib.suppress(queue.Empty):
                text = self._lines.get(timeout=remaining)
                if text.startswith("{"):
                    status: dict[str, Any] = json.loads(text)
                    return status

    def status(self) -> dict[str, Any]:
        return self.command("status")


class RouteMonitor:
    """`ip monitor route` in a namespace, each line stamped with time.monotonic() when read:
    a change seen the moment the kernel reports it, without polling."""

    def __init__(self, netns: str) -> None:
        self._process = subprocess.Popen(
            ["ip", "-o", "-n", netns, "monitor", "route"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._lines: queue.Queue[tuple[float, str]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self._lines.put((time.monotonic(), line))

    def drain_pending(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self._lines.get_nowait()

    def wait_line(self, predicate: Callable[[str], bool], timeout: float) -> float:
        """The monotonic time of the first line (from now on) that satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no matching route change")
            with contextlib.suppress(queue.Empty):
                stamp, line = self._lines.get(timeout=remaining)
                if predicate(line):
                    return stamp

    def seen(self) -> list[str]:
        """Every line read so far and not yet taken (taking them)."""
        lines = []
        with contextlib.suppress(queue.Empty):
            while True:
                lines.append(self._lines.get_nowait()[1])
        return lines

    def close(self) -> None:
        self._process.kill()
        self._process.wait(timeout=5)


def pids_running(netns: str, needle: bytes) -> list[int]:
    """Processes in a namespace whose command line contains `needle`."""
    pids = []
    for pid in run("ip", "netns", "pids", netns, check=False).split():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            pids.append(int(pid))
    return pids


def passive_opens(netns: str) -> int:
    """TCP connections accepted in a namespace so far (its own kernel counter)."""
    lines = run("ip", "netns", "exec", netns, "cat", "/proc/net/snmp").splitlines()
    tcp = [line.split() for line in lines if line.startswith("Tcp:")]
    return int(tcp[1][tcp[0].index("PassiveOpens")])


def host_prefix(address: str) -> str:
    """`address` as a host route: /32 (IPv4) or /128 (IPv6)."""
    return f"{address}/128" if ":" in address else f"{address}/32"


def kernel_nexthops(netns: str, prefix: str = VIP) -> dict[str, int]:
    """Kernel FIB next-hops of `prefix` (a host address, IPv4 or IPv6) in a namespace:
    gateway -> weight."""
    family = "-6" if ":" in prefix else "-4"
    data = json.loads(
        run("ip", family, "-n", netns, "-j", "-d", "route", "show", "exact", host_prefix(prefix))
        or "[]"
    )
    hops: dict[str, int] = {}
    for route in data:
        if "gateway" in route:
            hops[route["gateway"]] = 1
        for hop in route.get("nexthops", []):
            hops[hop["gateway"]] = int(hop.get("weight", 1))
    return hops


@dataclass
class FrrRouter:
    netns: str
    workdir: Path
    router_id: IPv4Address
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def vtysh(self, *commands: str, timeout: float = 10.0) -> str:
        args = ["vtysh", "--vty_socket", str(self.workdir)]
        for command in commands:
            args += ["-c", command]
        return run(*netns_command(self.netns, *args), timeout=timeout)

    def bgp_routes(self, afi: str = "ipv4") -> dict[str, Any]:
        """`show bgp ipv4|ipv6 unicast json`: prefix -> list of paths."""
        data = json.loads(self.vtysh(f"show bgp {afi} unicast json") or "{}")
        routes: dict[str, Any] = data.get("routes", {})
        return routes

    def bgp_route_detail(self, prefix: str) -> dict[str, Any]:
        afi = "ipv6" if ":" in prefix else "ipv4"
        detail: dict[str, Any] = json.loads(self.vtysh(f"show bgp {afi} unicast {prefix} json"))
        return detail

    def link_bandwidth_mbps(self, nexthop: str, prefix: str = VIP) -> float | None:
        """The link-bandwidth (Mbit/s) on the path via `nexthop`, as FRR decoded it, or None."""
        for path in self.bgp_route_detail(host_prefix(prefix)).get("paths", []):
            if path.get("nexthops", [{}])[0].get("ip") != nexthop:
                continue
            text = path.get("extendedCommunity", {}).get("string", "")
            # "LB:<AS>:<bytes/s> (<rounded human unit>)": the bytes/s are exact.
            if match := re.search(r"LB:\d+:(\d+)", text):
                return int(match[1]) * 8 / 1e6
        return None

    def neighbor_states(self) -> dict[str, str]:
        data = json.loads(self.vtysh("show bgp neighbors json") or "{}")
        return {peer: info.get("bgpState", "") for peer, info in data.items()}

    def bfd_peers(self) -> list[dict[str, Any]]:
        peers: list[dict[str, Any]] = json.loads(self.vtysh("show bfd peers json") or "[]")
        return peers

    def fib_nexthops(self, prefix: str = VIP) -> dict[str, int]:
        """Kernel FIB next-hops of `prefix` in the router: gateway -> weight."""
        return kernel_nexthops(self.netns, prefix)


def bird_protocol_name(edge: Edge) -> str:
    return f"edge{edge.index}"


def bird_config(
    router_id: IPv4Address,
    edges: Sequence[Edge],
    *,
    gshut_local_pref: int = 0,
    extra_import: str = "",
    loopback_sessions: bool = False,
) -> str:
    """BIRD 2 as the edges' router: a kernel protocol (so the FIB shows what BIRD chose,
    ECMP merged), an import filter that takes only the anycast range and honours
    GRACEFUL_SHUTDOWN with `gshut_local_pref`; `extra_import` is more filter code (a
    router config change, for route-refresh tests). iBGP edges (ASN = ours) are
    `direct` (BIRD takes iBGP as multihop otherwise). `loopback_sessions`: a second, multihop session per edge from the
    router's loopback to the edge's LOOPBACK_SESSION_PORT (one edge, two peers, for
    per-neighbor attributes; the edge is passive on that port)."""
    lines = [
        # Events (session changes, NOTIFICATIONs with their messages) go to bird.out.
        "log stderr { info, remote, warning, error, auth, fatal, bug };",
        f"router id {router_id};",
        "protocol device { scan time 10; }",
        # Connected subnets, to resolve the next hops of multihop sessions' routes.
        "protocol direct { ipv4; }",
        "protocol kernel {",
        "  ipv4 { import none; export where source = RTS_BGP; };",
        "  merge paths on;",
        "}",
        "filter from_edge {",
        f"  if net !~ [ {ANYCAST_RANGE}{{32,32}} ] then reject;",
        f"  if (65535, 0) ~ bgp_community then bgp_local_pref = {gshut_local_pref};",
        f"  {extra_import}",
        "  accept;",
        "}",
    ]
    for edge in edges:
        sessions = [(bird_protocol_name(edge), edge.router_address, "", "")]
        if loopback_sessions:
            multihop = f"  multihop {MULTIHOP_TTL};"
            port = f" port {LOOPBACK_SESSION_PORT}"
            sessions.append((f"{bird_protocol_name(edge)}lo", ROUTER_LOOPBACK, multihop, port))
        for name, local, extra, port in sessions:
            lines += [
                f"protocol bgp {name} {{",
                f"  local {local} as {ROUTER_ASN};",
                f"  neighbor {edge.address}{port} as {edge.asn};",
                f'  password "{edge.md5_password}";',
                "  connect retry time 1;",
                "  error wait time 1, 5;",
                *([extra] if extra else []),
                *(["  direct;"] if edge.asn == ROUTER_ASN else []),
                "  ipv4 { import filter from_edge; export none; };",
                "}",
            ]
    return "\n".join(lines) + "\n"


@dataclass
class BirdRouter:
    """BIRD 2 in the router namespace, with its own control socket."""

    netns: str
    workdir: Path
    router_id: IPv4Address
    edges: list[Edge]

    @property
    def control_socket(self) -> Path:
        return self.workdir / "bird.ctl"

    @property
    def config_path(self) -> Path:
        return self.workdir / "bird.conf"

    def birdc(self, *command: str, timeout: float = 10.0, check: bool = True) -> str:
        """birdc exits 1 on an empty answer ("Network not found"): `check=False` then."""
        socket = str(self.control_socket)
        return run("birdc", "-s", socket, *command, timeout=timeout, check=check)

    def reconfigure(self, config: str) -> str:
        """Write a new config and `birdc configure` it (what an operator does)."""
        self.config_path.write_text(config)
        return self.birdc("configure")

    def protocols(self) -> dict[str, dict[str, str]]:
        """`show protocols`: name -> {"state", "since", "info"}."""
        result: dict[str, dict[str, str]] = {}
        for line in self.birdc("show protocols").splitlines():
            fields = line.split(None, 5)
            if len(fields) >= 5 and fields[1] == "BGP":
                name, _, _table, state, since = fields[:5]
                info = fields[5] if len(fields) > 5 else ""
                result[name] = {"state": state, "since": since, "info": info.strip()}
        return result

    def established(self, edge: Edge) -> bool:
        return "Established" in self.protocols().get(bird_protocol_name(edge), {}).get("info", "")

    def log(self) -> str:
        """What BIRD logged so far (session events, NOTIFICATIONs and their messages)."""
        return (self.workdir / "bird.out").read_text(errors="replace")

    def protocol_detail(self, edge: Edge) -> str:
        return self.birdc("show protocols all", bird_protocol_name(edge))

    def routes(self, prefix: str = f"{VIP}/32") -> list[dict[str, str]]:
        """`show route PREFIX all`: one dict per route: `protocol`, `best` ("*" or ""),
        and every attribute line as given (`BGP.med`, `BGP.community`, ...)."""
        found: list[dict[str, str]] = []
        for line in self.birdc("show route", prefix, "all", check=False).splitlines():
            stripped = line.strip()
            if "[" in line and ("unicast" in line or line.startswith(prefix)):
                head = line[line.index("[") + 1 :]
                found.append({"protocol": head.split()[0], "best": "*" if "] *" in line else ""})
            elif found and ":" in stripped and not stripped.startswith("via"):
                key, _, value = stripped.partition(":")
                found[-1][key.strip()] = value.strip()
        return found

    def route_from(self, edge: Edge, prefix: str = f"{VIP}/32") -> dict[str, str] | None:
        for route in self.routes(prefix):
            if route["protocol"] == bird_protocol_name(edge):
                return route
        return None

    def fib_nexthops(self, prefix: str = VIP) -> dict[str, int]:
        return kernel_nexthops(self.netns, prefix)


def _router_configs(
    router_id: IPv4Address,
    edges: Sequence[Edge],
    bfd: bool,
    timers: tuple[int, int, int],
    multihop: bool = False,
    ipv6: str = "",
) -> tuple[str, str, str]:
    """`ipv6`: "" (IPv4 only), "sessions" (an IPv6 session per edge) or "over-ipv4" (IPv6
    NLRI on the IPv4 sessions)."""
    tx, rx, mult = timers
    # work-queue 0: zebra hands routes to the kernel at once (its default batches ~10 ms).
    zebra = "hostname router\nlog stdout warnings\nzebra work-queue 0\n!\n"
    # Global commands stay outside `router bgp` (inside it, the rest of the block is lost).
    lines = [
        "hostname router",
        "log stdout warnings",
        "bgp route-map delay-timer 0",
        f"ip prefix-list ANYCAST seq 5 permit {ANYCAST_RANGE} ge 32",
        "bgp community-list standard GSHUT permit graceful-shutdown",
        # FRR 8.4 honours GSHUT by itself; said explicitly for routers that do not.
        "route-map FROM-EDGE permit 5",
        " match ip address prefix-list ANYCAST",
        " match community GSHUT",
        " set local-preference 0",
        "exit",
        "route-map FROM-EDGE permit 10",
        " match ip address prefix-list ANYCAST",
        "exit",
    ]
    if ipv6:
        lines += [
            f"ipv6 prefix-list ANYCAST6 seq 5 permit {ANYCAST_RANGE6} ge 128",
            "route-map FROM-EDGE6 permit 5",
            " match ipv6 address prefix-list ANYCAST6",
            " match community GSHUT",
            " set local-preference 0",
            "exit",
            "route-map FROM-EDGE6 permit 10",
            " match ipv6 address prefix-list ANYCAST6",
            "exit",
        ]
    lines += [
        f"router bgp {ROUTER_ASN}",
        f" bgp router-id {router_id}",
        " no bgp ebgp-requires-policy",
        " bgp bestpath as-path multipath-relax",
    ]
    for edge in edges:
        lines += [
            f" neighbor {edge.address} remote-as {edge.asn}",
            f" neighbor {edge.address} timers connect 1",
            f" neighbor {edge.address} password {edge.md5_password}",
        ]
        if multihop:
            lines += [
                f" neighbor {edge.address} update-source {ROUTER_LOOPBACK}",
                f" neighbor {edge.address} ebgp-multihop {MULTIHOP_TTL}",
            ]
        if bfd:
            lines.append(f" neighbor {edge.address} bfd profile fast")
        if ipv6 == "sessions" and edge.address6 is not None:
            lines += [
                f" neighbor {edge.address6} remote-as {edge.asn}",
                f" neighbor {edge.address6} timers connect 1",
                f" neighbor {edge.address6} password {edge.md5_password}",
            ]
            if bfd:
                lines.append(f" neighbor {edge.address6} bfd profile fast")
    lines += [" address-family ipv4 unicast", "  maximum-paths 8"]
    lines += [f"  neighbor {edge.address} route-map FROM-EDGE in" for edge in edges]
    if ipv6 == "sessions":
        # IPv4 sessions carry IPv4 only; each edge's IPv6 session carries IPv6.
        lines += [f"  no neighbor {edge.address6} activate" for edge in edges]
    lines += [" exit-address-family"]
    if ipv6:
        lines += [" address-family ipv6 unicast", "  maximum-paths 8"]
        for edge in edges:
            peer = edge.address6 if ipv6 == "sessions" else edge.address
            lines += [f"  neighbor {peer} activate", f"  neighbor {peer} route-map FROM-EDGE6 in"]
        lines += [" exit-address-family"]
    lines += ["exit", ""]
    bfdd = "\n".join(
        [
            "hostname router",
            "log stdout warnings",
            "bfd",
            " profile fast",
            f"  detect-multiplier {mult}",
            f"  receive-interval {rx}",
            f"  transmit-interval {tx}",
            " exit",
            "exit",
            "",
        ]
    )
    return zebra, "\n".join(lines), bfdd


class NetLab:
    """Build with `NetLab.create(...)`; always `close()` (or use it as a context manager)."""

    def __init__(self) -> None:
        self.suffix = secrets.token_hex(3)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"ae-{self.suffix}-"))
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self.edges: list[Edge] = []
        self.router: FrrRouter | None = None
        self.bird: BirdRouter | None = None
        self.client_netns = ""
        self.ibgp = False
        self.multihop = False
        self.loopback_sessions = False
        self.client_address = IPv4Address("198.19.0.2")
        self.ipv6 = ""

    # -- construction -------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        edge_count: int = 2,
        *,
        bfd: bool = False,
        bfd_timers: tuple[int, int, int] = (100, 100, 3),
        client: bool = False,
        router_passwords: Sequence[str] | None = None,
        router: str = "frr",
        ibgp: bool = False,
        multihop: bool = False,
        loopback_sessions: bool = False,
        ipv6: bool = False,
        ipv6_over_ipv4: bool = False,
    ) -> NetLab:
        """`router` is "frr" (zebra + bgpd [+ bfdd]; `lab.router`) or "bird" (BIRD 2;
        `lab.bird`, no BFD). `ibgp`: the edges use the router's ASN. `multihop` (FRR):
        the router peers from its loopback, eBGP multihop. `loopback_sessions` (BIRD):
        a second, multihop session per edge from the router's loopback. `ipv6` (FRR): IPv6
        on every link, VIP6 on each edge, an IPv6 session per edge; with `ipv6_over_ipv4`
        the IPv6 routes come over the IPv4 sessions instead."""
        lab = cls()
        if ipv6:
            lab.ipv6 = "over-ipv4" if ipv6_over_ipv4 else "sessions"
        lab.ibgp, lab.multihop, lab.loopback_sessions = ibgp, multihop, loopback_sessions
        try:
            lab._build(edge_count, bfd, bfd_timers, client, router_passwords, router)
        except BaseException:
            lab.close()
            raise
        return lab

    def _add_netns(self, role: str) -> str:
        name = f"ae-{self.suffix}-{role}"
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def _addr6(self, netns: str, dev: str, address: IPv6Address, length: int) -> None:
        # nodad: usable at once (duplicate address detection would hold it ~1-2 s).
        run("ip", "-6", "-n", netns, "addr", "add", f"{address}/{length}", "dev", dev, "nodad")

    def _veth(self, left_ns: str, left: str, right_ns: str, right: str) -> None:
        run(
            "ip",
            "link",
            "add",
            left,
            "netns",
            left_ns,
            "type",
            "veth",
            "peer",
            right,
            "netns",
            right_ns,
        )

    def _build(
        self,
        edge_count: int,
        bfd: bool,
        bfd_timers: tuple[int, int, int],
        client: bool,
        router_passwords: Sequence[str] | None,
        router: str = "frr",
    ) -> None:
        router_ns = self._add_netns("r")
        for key, value in (
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.fib_multipath_hash_policy", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv6.fib_multipath_hash_policy", "1"),
        ):
            run(*netns_command(router_ns, "sysctl", "-qw", f"{key}={value}"))
        for index in range(1, edge_count + 1):
            edge_ns = self._add_netns(f"e{index}")
            base = 4 * index
            router_if, edge_if = f"ae{self.suffix}r{index}", f"ae{self.suffix}e{index}"
            self._veth(router_ns, router_if, edge_ns, edge_if)
            router_addr = IPv4Address(f"198.18.0.{base + 1}")
            edge_addr = IPv4Address(f"198.18.0.{base + 2}")
            run("ip", "-n", router_ns, "addr", "add", f"{router_addr}/30", "dev", router_if)
            run("ip", "-n", router_ns, "link", "set", router_if, "up")
            run("ip", "-n", edge_ns, "addr", "add", f"{edge_addr}/30", "dev", edge_if)
            run("ip", "-n", edge_ns, "link", "set", edge_if, "up")
            run("ip", "-n", edge_ns, "addr", "add", f"{VIP}/32", "dev", "lo")
            run("ip", "-n", edge_ns, "route", "add", "default", "via", str(router_addr))
            edge_addr6 = router_addr6 = None
            if self.ipv6:
                router_addr6 = IPv6Address(f"2001:db8:ff00:{index:x}::1")
                edge_addr6 = IPv6Address(f"2001:db8:ff00:{index:x}::2")
                self._addr6(router_ns, router_if, router_addr6, 64)
                self._addr6(edge_ns, edge_if, edge_addr6, 64)
                self._addr6(edge_ns, "lo", IPv6Address(VIP6), 128)
                run("ip", "-6", "-n", edge_ns, "route", "add", "default", "via", str(router_addr6))
            password = (
                router_passwords[index - 1] if router_passwords else f"pw-{self.suffix}-{index}"
            )
            self.edges.append(
                Edge(
                    index=index,
                    netns=edge_ns,
                    address=edge_addr,
                    router_address=router_addr,
                    veth=edge_if,
                    asn=ROUTER_ASN if self.ibgp else EDGE_ASN_BASE + index,
                    md5_password=password,
                    address6=edge_addr6,
                    router_address6=router_addr6,
                )
            )
        if client:
            self.client_netns = self._add_netns("c")
            router_if, client_if = f"ae{self.suffix}rc", f"ae{self.suffix}c"
            self._veth(router_ns, router_if, self.client_netns, client_if)
            run("ip", "-n", router_ns, "addr", "add", "198.19.0.1/30", "dev", router_if)
            run("ip", "-n", router_ns, "link", "set", router_if, "up")
            run(
                "ip",
                "-n",
                self.client_netns,
                "addr",
                "add",
                f"{self.client_address}/30",
                "dev",
                client_if,
            )
            run("ip", "-n", self.client_netns, "link", "set", client_if, "up")
            run("ip", "-n", self.client_netns, "route", "add", "default", "via", "198.19.0.1")
            if self.ipv6:
                gateway6 = IPv6Address("2001:db8:ff00:ffff::1")
                self._addr6(router_ns, router_if, gateway6, 64)
                self._addr6(self.client_netns, client_if, CLIENT_ADDRESS6, 64)
                run(
                    *("ip", "-6", "-n", self.client_netns, "route", "add", "default"),
                    *("via", str(gateway6)),
                )
        run("ip", "-n", router_ns, "addr", "add", f"{ROUTER_LOOPBACK}/32", "dev", "lo")
        if router == "bird":
            self._start_bird(router_ns)
        else:
            self._start_router(router_ns, bfd, bfd_timers)

    def _start_bird(self, netns: str) -> None:
        workdir = self.workdir / "bird"
        workdir.mkdir()
        bird = BirdRouter(netns, workdir, IPv4Address("198.18.0.1"), list(self.edges))
        config = bird_config(bird.router_id, self.edges, loopback_sessions=self.loopback_sessions)
        bird.config_path.write_text(config)
        log = (workdir / "bird.out").open("wb")
        args = [BIRD, "-f", "-c", str(bird.config_path), "-s", str(bird.control_socket)]
        self.spawn(netns_command(netns, *args), stdout=log)
        wait_for(bird.control_socket.exists, 10, what="BIRD's control socket")
        self.bird = bird

    def fib_nexthops(self, prefix: str = VIP) -> dict[str, int]:
        """Kernel FIB next-hops of `prefix` in the router namespace, whichever router."""
        return kernel_nexthops(self.namespaces[0], prefix)

    @property
    def router_netns(self) -> str:
        return self.namespaces[0]

    def _start_router(self, netns: str, bfd: bool, bfd_timers: tuple[int, int, int]) -> None:
        workdir = self.workdir / "router"
        workdir.mkdir()
        # FRR drops privileges to its own user: that user must own the sockets' directory.
        self.workdir.chmod(0o755)
        shutil.chown(workdir, "frr", "frr")
        router_id = IPv4Address("198.18.0.1")
        zebra_conf, bgpd_conf, bfdd_conf = _router_configs(
            router_id, self.edges, bfd, bfd_timers, self.multihop, self.ipv6
        )
        zserv = workdir / "zserv.api"
        router = FrrRouter(netns=netns, workdir=workdir, router_id=router_id)
        daemons: list[tuple[str, str, list[str]]] = [
            ("zebra", zebra_conf, []),
            ("bfdd", bfdd_conf, []),
            ("bgpd", bgpd_conf, []),
        ]
        for daemon, conf, extra in daemons:
            if daemon == "bfdd" and not bfd:
                continue
            conf_path = workdir / f"{daemon}.conf"
            conf_path.write_text(conf)
            args = [
                str(FRR_DIR / daemon),
                "-f", str(conf_path),
                "-i", str(workdir / f"{daemon}.pid"),
                "-z", str(zserv),
                "--vty_socket", str(workdir),
                *extra,
            ]  # fmt: skip
            if daemon == "zebra":
                args += ["--log", f"file:{workdir / 'zebra.log'}"]
            if daemon == "bfdd":
                args += ["--bfdctl", str(workdir / "bfdd.sock")]
            log = (workdir / f"{daemon}.out").open("wb")
            process = self.spawn(netns_command(netns, *args), stdout=log)
            router.processes.append(process)
            if daemon == "zebra":
                wait_for(zserv.exists, 10, what="zebra's socket")
        self.router = router
        wait_for((workdir / "bgpd.vty").exists, 10, what="bgpd's vty socket")

    # -- processes ----------------------------------------------------------------------

    def spawn(
        self,
        args: Sequence[str],
        stdout: Any = subprocess.DEVNULL,
        stdin_pipe: bool = False,
        **kwargs: Any,
    ) -> subprocess.Popen[bytes]:
        """Start a process that `close()` will kill (its whole process group)."""
        process = subprocess.Popen(
            list(args),
            stdout=stdout,
            stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            start_new_session=True,
            **kwargs,
        )
        self.processes.append(process)
        return process

    def edge_command(self, edge: Edge, *cmd: str) -> list[str]:
        return netns_command(edge.netns, *cmd)

    def blackhole(self, edge: Edge) -> None:
        """Drop everything the edge sends, without taking the carrier down (no TCP close)."""
        run("ip", "-n", edge.netns, "link", "set", edge.veth, "up")
        run("tc", "-n", edge.netns, "qdisc", "add", "dev", edge.veth, "root", "pfifo", "limit", "0")

    def unblackhole(self, edge: Edge) -> None:
        run("tc", "-n", edge.netns, "qdisc", "del", "dev", edge.veth, "root", check=False)

    # -- traffic (only inside the lab's namespaces, bounded) ------------------------------

    def start_name_servers(self, port: int = 8080, vip: str = VIP) -> None:
        """On each edge, a TCP server on the VIP that answers its edge index and closes."""
        for edge in self.edges:
            code = _NAME_SERVER.format(vip=vip, port=port, name=edge.index)
            self.spawn(netns_command(edge.netns, sys.executable, "-c", code))
        for edge in self.edges:

            def listening(netns: str = edge.netns) -> bool:
                return f":{port}" in run("ip", "netns", "exec", netns, "ss", "-ltn")

            wait_for(listening, 10, what=f"name server on edge {edge.index}")

    def count_connections(
        self, count: int, port: int = 8080, timeout: float = 60, vip: str = VIP
    ) -> dict[str, int]:
        """`count` new connections from the client to the VIP: edge index (or "failed")
        -> connections."""
        code = _NAME_CLIENT.format(vip=vip, port=port, count=count)
        out = run(*netns_command(self.client_netns, sys.executable, "-c", code), timeout=timeout)
        counts: dict[str, int] = json.loads(out)
        return counts

    # -- teardown -----------------------------------------------------------------------

    def close(self) -> None:
        for process in reversed(self.processes):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
        self.processes.clear()
        # Anything else still inside our namespaces (children that left our groups).
        for netns in self.namespaces:
            pids = run("ip", "netns", "pids", netns, check=False).split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for netns in self.namespaces:
            run("ip", "netns", "delete", netns, check=False)
        self.namespaces.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def netlab(edge_count: int = 2, **kwargs: Any) -> Iterator[NetLab]:
    lab = NetLab.create(edge_count, **kwargs)
    try:
        yield lab
    finally:
        lab.close()


# -- flow sharing: a segment among the edges, echo backends, long-lived clients ---------

PEER_LAN = "198.18.1"  # the edges' own segment: 198.18.1.<edge index>/24


def peer_lan_interface(lab: NetLab, edge: Edge) -> str:
    return f"ae{lab.suffix}l{edge.index}"


def peer_lan_address(edge: Edge) -> IPv4Address:
    return IPv4Address(f"{PEER_LAN}.{edge.index}")


def add_peer_lan(lab: NetLab) -> None:
    """A switch (a bridge in a namespace of its own) joining every edge on 198.18.1.0/24:
    the edges' flow streams and the packets they hand each other use it."""
    switch = lab._add_netns("s")
    run("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
    run("ip", "-n", switch, "link", "set", "br0", "up")
    for edge in lab.edges:
        port, ifname = f"ae{lab.suffix}s{edge.index}", peer_lan_interface(lab, edge)
        lab._veth(switch, port, edge.netns, ifname)
        run("ip", "-n", switch, "link", "set", port, "master", "br0", "up")
        run("ip", "-n", edge.netns, "addr", "add", f"{peer_lan_address(edge)}/24", "dev", ifname)
        run("ip", "-n", edge.netns, "link", "set", ifname, "up")


_ECHO_SERVER = """
import asyncio
async def echo(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    writer.close()
async def main():
    server = await asyncio.start_server(echo, "127.0.0.1", {port}, backlog=1024)
    print("ready", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""

_LONG_CLIENT = """
import asyncio, collections, json, re, sys
VIP, PORT, PERIOD, PATIENCE, HTTP = "{vip}", {port}, {period}, {patience}, {http}
REQUEST = b"GET /health HTTP/1.1\\r\\nHost: lab\\r\\n\\r\\n"
state = {{"open": 0, "broken": collections.Counter(), "opened": collections.Counter(),
         "failed_connects": collections.Counter(), "closed": collections.Counter(),
         "echoes": 0}}

class Closed(Exception):
    pass

async def exchange(reader, writer, n):
    if not HTTP:
        message = b"%08d\\n" % n
        writer.write(message)
        echo = await asyncio.wait_for(reader.readexactly(len(message)), PATIENCE)
        if echo != message:
            raise ValueError("wrong echo")
        return
    writer.write(REQUEST)
    head = await asyncio.wait_for(reader.readuntil(b"\\r\\n\\r\\n"), PATIENCE)
    if not head.startswith(b"HTTP/1.1 200"):
        raise ValueError("not a 200")
    length = re.search(rb"(?i)\\r\\ncontent-length: *(\\d+)", head)
    if length is None:
        raise ValueError("no content-length")
    await asyncio.wait_for(reader.readexactly(int(length.group(1))), PATIENCE)
    if re.search(rb"(?i)\\r\\nconnection: *close", head):
        raise Closed()  # a graceful end after a whole response (a drain): not a reset

async def one(tag, ready):
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(VIP, PORT), PATIENCE)
    except (OSError, asyncio.TimeoutError):
        state["failed_connects"][tag] += 1
        ready.release()
        return
    state["open"] += 1
    state["opened"][tag] += 1
    ready.release()
    n = 0
    try:
        while True:
            n += 1
            await exchange(reader, writer, n)
            state["echoes"] += 1
            await asyncio.sleep(PERIOD)
    except Closed:
        state["closed"][tag] += 1
    except (OSError, EOFError, ValueError, asyncio.IncompleteReadError, asyncio.TimeoutError,
            asyncio.LimitOverrunError):
        state["broken"][tag] += 1
    finally:
        state["open"] -= 1
        writer.close()

async def main():
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    tasks = set()
    while line := (await reader.readline()).decode().split():
        if line[0] == "open":
            count, tag = int(line[1]), line[2]
            ready = asyncio.Semaphore(0)
            for _ in range(count):
                task = loop.create_task(one(tag, ready))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(0.002)
            for _ in range(count):
                await ready.acquire()
        out = {{k: (dict(v) if isinstance(v, collections.Counter) else v) for k, v in state.items()}}
        print(json.dumps(out), flush=True)
    for task in tasks:
        task.cancel()

asyncio.run(main())
"""


def start_echo_backend(lab: NetLab, edge: Edge, port: int) -> None:
    """An echo server on the edge's loopback (the agent's backend)."""
    code = _ECHO_SERVER.format(port=port)
    proc = lab.spawn(netns_command(edge.netns, sys.executable, "-c", code), stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(b"ready"):
        raise RuntimeError(f"echo backend on edge {edge.index} did not start: {line!r}")


class LongLivedClient:
    """Connections from the lab's client to the VIP that each send a line and expect its
    echo every `period` s; one that fails (reset, EOF, no echo within `patience` s) is
    broken and counted under the tag it was opened with. Bounded by the lab's life."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self._proc = process

    @staticmethod
    def code(
        port: int = 8080, period: float = 0.1, patience: float = 2.0, http: bool = False
    ) -> str:
        """The client's program (`python -c`): commands on stdin, a JSON report per line.
        `http`: each exchange is a keep-alive GET /health instead of an echoed line; a
        response with `Connection: close` (a draining node's) ends it as closed, not broken."""
        return _LONG_CLIENT.format(vip=VIP, port=port, period=period, patience=patience, http=http)

    @classmethod
    def in_netlab(cls, lab: NetLab, port: int = 8080) -> LongLivedClient:
        """In the lab's client namespace (the lab ends it)."""
        command = netns_command(lab.client_netns, sys.executable, "-c", cls.code(port))
        return cls(lab.spawn(command, stdout=subprocess.PIPE, stdin_pipe=True))

    def _ask(self, line: str, timeout: float = 60.0) -> dict[str, Any]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(line.encode() + b"\n")
        self._proc.stdin.flush()
        answer: queue.Queue[bytes] = queue.Queue()
        stdout = self._proc.stdout
        threading.Thread(target=lambda: answer.put(stdout.readline()), daemon=True).start()
        try:
            raw = answer.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"the long-lived client did not answer {line!r}") from None
        report: dict[str, Any] = json.loads(raw)
        return report

    def open(self, count: int, tag: str) -> dict[str, Any]:
        """Opens `count` connections tagged `tag`; returns once each connected or failed."""
        return self._ask(f"open {count} {tag}")

    def report(self) -> dict[str, Any]:
        """{open, echoes, opened: {tag: n}, broken: {tag: n}, failed_connects: {tag: n},
        closed: {tag: n}}"""
        return self._ask("report")


def in_netns(netns: str, make: Callable[[], Any]) -> Any:
    """Runs a coroutine (from `make()`) whose sockets are made inside `netns` (this thread)."""
    import asyncio

    from pyroute2.netns import popns, pushns

    pushns(netns)
    try:
        return asyncio.run(make())
    finally:
        popns()


FLOW_KEY = "the-lab-flow-sharing-key-0123456789"
FLOW_OPERATOR = "operator-token-for-the-flow-lab"
FLOW_API_PORT = 8089
FLOW_PORT = 8080  # the L4 listener on the VIP
OVERLAY_VNI = 4242


class FlowFleet:
    """Edges running the real agent with an L4 listener on the VIP in front of an echo
    backend, BGP to the lab's router, the GSLB API (SQLite) in the router's namespace;
    with `forwarding`, each agent runs the flowshare extension over the peers' segment.
    Build the lab with a client; `add_peer_lan` is done here.

    With `across_sites`, edges 1 and 2 are site "a" and edge 3 site "b" at the GSLB, they
    share no segment, and the agents build a VXLAN overlay among themselves over their
    routed addresses (the links to the router) instead."""

    def __init__(self, lab: NetLab, forwarding: bool, across_sites: bool = False) -> None:
        assert lab.router is not None and lab.client_netns
        self.lab, self.forwarding, self.across_sites = lab, forwarding, across_sites
        self.router = lab.router
        self.agents: dict[int, subprocess.Popen[bytes]] = {}
        if not across_sites:
            add_peer_lan(lab)
        self.api_url = f"http://{lab.edges[0].router_address}:{FLOW_API_PORT}"

    def start_api(self) -> None:
        import yaml

        settings = {
            "host": str(self.lab.edges[0].router_address),
            "port": FLOW_API_PORT,
            "store": {"kind": "sqlite", "path": str(self.lab.workdir / "gslb.db")},
            "heartbeat_ttl_s": 3,
            "tokens": [{"name": "ops", "role": "operator", "token": FLOW_OPERATOR}]
            + [
                {"name": f"edge{e.index}", "role": "node", "node": f"edge{e.index}",
                 "token": f"node-token-{e.index}"}
                for e in self.lab.edges
            ],
        }  # fmt: skip
        path = self.lab.workdir / "gslb.yaml"
        path.write_text(yaml.safe_dump(settings))
        log = (self.lab.workdir / "api.log").open("ab")
        root = Path(__file__).resolve().parents[2]
        command = netns_command(
            self.router.netns, sys.executable, "-m", "api", "--config", str(path)
        )
        self.lab.spawn(command, cwd=root, stdout=log)

        async def seeded() -> bool:
            from contract.client import ApiClient, ApiError
            from contract.schemas import NodeSpec, SiteSpec

            try:
                async with ApiClient([self.api_url], FLOW_OPERATOR) as operator:
                    state = await operator.put_site("lab", SiteSpec(), revision=0)
                    if self.across_sites:
                        state = await operator.put_site("b", SiteSpec(), revision=state.revision)
                    for edge in self.lab.edges:
                        spec = NodeSpec(site=self.site(edge), weight=100)
                        state = await operator.put_node(
                            f"edge{edge.index}", spec, revision=state.revision
                        )
            except (ApiError, OSError):
                return False
            return True

        wait_for(lambda: bool(self.operate(seeded)), 30, interval=0.3, what="the GSLB API seeded")

    def site(self, edge: Edge) -> str:
        return "b" if self.across_sites and edge.index == 3 else "lab"

    def operate(self, make: Callable[[], Any]) -> Any:
        return in_netns(self.router.netns, make)

    def set_weights(self, weights: dict[str, int]) -> None:
        from contract.client import ApiClient
        from contract.schemas import WeightsUpdate

        async def change() -> None:
            async with ApiClient([self.api_url], FLOW_OPERATOR) as operator:
                state = await operator.state()
                await operator.set_weights(WeightsUpdate(nodes=weights), revision=state.revision)

        self.operate(change)

    def events(self) -> list[Any]:
        """The GSLB's event log (contract.schemas.Event), oldest first."""
        from contract.client import ApiClient

        async def read() -> list[Any]:
            async with ApiClient([self.api_url], FLOW_OPERATOR) as operator:
                return list(await operator.events(limit=500))

        return list(self.operate(read))

    def drain(self, index: int, drained: bool) -> None:
        self._drain("node", f"edge{index}", drained)

    def drain_site(self, site: str, drained: bool) -> None:
        self._drain("site", site, drained)

    def _drain(self, kind: str, name: str, drained: bool) -> None:
        from contract.client import ApiClient
        from contract.schemas import DrainKind

        async def change() -> None:
            async with ApiClient([self.api_url], FLOW_OPERATOR) as operator:
                state = await operator.state()
                if drained:
                    await operator.drain(
                        DrainKind(kind), name, "maintenance", revision=state.revision
                    )
                else:
                    await operator.undrain(DrainKind(kind), name, revision=state.revision)

        self.operate(change)

    def agent_config(self, edge: Edge) -> dict[str, Any]:
        index = edge.index
        config: dict[str, Any] = {
            "node": {"name": f"edge{index}", "site": self.site(edge)},
            "listeners": [
                {"name": "tcp", "kind": "tcp", "address": VIP, "port": FLOW_PORT, "backlog": 2048}
            ],
            "backends": [{"name": f"b{index}", "address": "127.0.0.1", "port": 9000 + index}],
            "health": {"active": {"interval": 0.2, "timeout": 0.2, "rise": 2, "fall": 2}},
            "drain": {"deadline": 600},
            "bgp": edge_bgp_config(
                edge, runtime_dir=str(self.lab.workdir / f"run{index}")
            ).model_dump(mode="json"),
            "control_plane": {
                "endpoints": [self.api_url],
                "token": f"node-token-{index}",
                "state_file": str(self.lab.workdir / f"desired{index}.json"),
                "heartbeat_interval": 0.3,
            },
        }
        config["bgp"]["neighbors"][0]["md5_password"] = edge.md5_password
        if self.forwarding:
            config["flowshare"] = {
                "local_address": str(peer_lan_address(edge)),
                "peers": [
                    {"name": f"edge{e.index}", "address": str(peer_lan_address(e))}
                    | ({"underlay": str(e.address)} if self.across_sites else {})
                    for e in self.lab.edges
                    if e is not edge
                ],
                "peer_interface": peer_lan_interface(self.lab, edge),
                "key": FLOW_KEY,
                "heartbeat_interval": 0.2,
                "peer_timeout": 2.0,
                "runtime_dir": str(self.lab.workdir / f"run{index}"),
            }
            if self.across_sites:
                config["flowshare"]["overlay"] = {
                    "vni": OVERLAY_VNI,
                    "underlay_address": str(edge.address),
                }
        return config

    def start_edge(self, index: int) -> None:
        """Backend and agent (the real `anycast-edge run`; with a flowshare: section its
        composition root adds the extension)."""
        start_echo_backend(self.lab, self.lab.edges[index - 1], 9000 + index)
        self.start_agent(index)

    def start_agent(self, index: int) -> None:
        import yaml

        edge = self.lab.edges[index - 1]
        path = self.lab.workdir / f"node{index}.yaml"
        path.write_text(yaml.safe_dump(self.agent_config(edge)))
        log = (self.lab.workdir / f"agent{index}.log").open("ab")
        command = [sys.executable, "-m", "edge.cli", "run", "--config", str(path)]
        self.agents[index] = self.lab.spawn(netns_command(edge.netns, *command), stdout=log)

    def agent_log(self, index: int) -> str:
        return (self.lab.workdir / f"agent{index}.log").read_text(errors="replace")

    def stop_agent(self, index: int, sig: int = signal.SIGINT) -> int:
        """SIGINT: the agent stops at once and removes what it installed; SIGKILL: a crash.
        Returns its exit code."""
        process = self.agents.pop(index)
        process.send_signal(sig)
        return process.wait(30)

    def status(self, index: int) -> dict[str, Any]:
        status: dict[str, Any] = json.loads(self.admin(index, "/status"))
        return status

    def admin(self, index: int, path: str) -> str:
        """A GET of the agent's admin endpoint (/status, /metrics)."""
        edge = self.lab.edges[index - 1]
        return run(*netns_command(edge.netns, "curl", "-sf", f"http://127.0.0.1:9901{path}"))

    def nexthops(self) -> set[str]:
        return set(self.router.fib_nexthops(VIP))

    def weights(self) -> dict[str, int]:
        return self.router.fib_nexthops(VIP)

    def wait_settled(self, predicate: Callable[[dict[str, int]], bool], what: str) -> None:
        """Until the router's FIB for the VIP satisfies `predicate` and has not moved for 1 s."""
        wait_for(lambda: predicate(self.weights()), 60, interval=0.05, what=what)
        last, since = self.weights(), time.monotonic()
        deadline = since + 30
        while time.monotonic() - since < 1.0 and time.monotonic() < deadline:
            time.sleep(0.1)
            now = self.weights()
            if now != last:
                last, since = now, time.monotonic()

    def edge_address(self, index: int) -> str:
        return str(self.lab.edges[index - 1].address)

    def map_elements(self, index: int) -> dict[tuple[str, int, str, int], int]:
        """The edge's forwarding map: (client, port, VIP, port) -> mark."""
        edge = self.lab.edges[index - 1]
        out = run(*netns_command(
            edge.netns, "nft", "-j", "list", "map", "inet", "anycast_edge_flows", "owners4"
        ))  # fmt: skip
        elements: dict[tuple[str, int, str, int], int] = {}
        for item in json.loads(out)["nftables"]:
            for key, mark in item.get("map", {}).get("elem", []):
                client, port, vip, vport = key["concat"]
                elements[(client, int(port), vip, int(vport))] = int(mark)
        return elements


PLANNED_CHANGES = ("join", "weight_change", "drain", "undrain")
#: Across sites (edge 3 alone in site "b"), then a drain of site b too.
CROSS_SITE_CHANGES = (*PLANNED_CHANGES, "site_drain")


def build_flow_fleet(
    forwarding: bool, connections: int, across_sites: bool = False
) -> tuple[NetLab, FlowFleet, LongLivedClient]:
    """A lab with a client and three edges, edges 1 and 2 serving (edge 3 joins later),
    `connections` long-lived connections open. The caller closes the lab."""
    lab = NetLab.create(3, client=True)
    try:
        fleet = FlowFleet(lab, forwarding, across_sites)
        fleet.start_api()
        for index in (1, 2):
            fleet.start_edge(index)
        fleet.wait_settled(lambda hops: len(hops) == 2, "edges 1 and 2 in the router's FIB")
        client = LongLivedClient.in_netlab(lab)
        opened = client.open(connections, "base")
        if opened["open"] != connections:
            raise RuntimeError(f"only {opened['open']} of {connections} connections opened")
    except BaseException:
        lab.close()
        raise
    return lab, fleet, client


def run_planned_changes(
    fleet: FlowFleet, client: LongLivedClient, connections: int, young: int = 10
) -> list[dict[str, Any]]:
    """join (edge 3), weight 3:1:1, drain edge 1, undrain edge 1 (across sites: then a
    drain of site b), each through the real path (agent start, GSLB API). Before each, the
    pool is refilled to `connections` and `young` more open right before the change. Per
    change: connections open at the change, how many broke, how many of the young ones
    broke (across sites the names end in `_across_sites`)."""
    e1, e2, e3 = fleet.edge_address(1), fleet.edge_address(2), fleet.edge_address(3)
    changes: dict[str, tuple[Callable[[], None], Callable[[dict[str, int]], bool]]] = {
        "join": (lambda: fleet.start_edge(3), lambda hops: len(hops) == 3),
        "weight_change": (
            lambda: fleet.set_weights({"edge1": 300}),
            lambda hops: hops.get(e1, 0) >= 2.5 * hops.get(e2, 1),
        ),
        "drain": (lambda: fleet.drain(1, True), lambda hops: len(hops) == 2 and e1 not in hops),
        "undrain": (lambda: fleet.drain(1, False), lambda hops: len(hops) == 3),
        "site_drain": (
            lambda: fleet.drain_site("b", True),
            lambda hops: len(hops) == 2 and e3 not in hops,
        ),
    }
    results = []
    for name in CROSS_SITE_CHANGES if fleet.across_sites else PLANNED_CHANGES:
        change, settled = changes[name]
        missing = connections - client.report()["open"]
        if missing > 0:  # without forwarding, earlier changes broke some
            client.open(missing, f"refill-{name}")
        before = client.open(young, f"young-{name}")  # the last ~100 ms before the change
        change()
        fleet.wait_settled(settled, f"the router's FIB after the {name}")
        time.sleep(2.5)  # a broken connection shows within the client's patience (2 s)
        after = client.report()
        broken = sum(after["broken"].values()) - sum(before["broken"].values())
        results.append(
            {
                "name": f"{name}_across_sites" if fleet.across_sites else name,
                "forwarding": fleet.forwarding,
                "connections": before["open"],
                "broken": broken,
                "young_broken": after["broken"].get(f"young-{name}", 0),
            }
        )
    return results
