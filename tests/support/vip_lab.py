"""An L2 segment of network namespaces for the active-passive mode, for tests and `make bench-ap`.

    client ─┐
    node 1 ─┤ bridge (its own namespace)   198.18.2.0/24, VIP 198.18.2.100
    node 2 ─┤ gateway 198.18.2.254 (the bridge's own address: the nodes' ARP target)
    backend ┘

Names start with `ae-` plus a random suffix (tests/support/netlab.py), and `close()` kills
every process and deletes every namespace. The nodes reach the real etcd cluster of the
tests (loopback of the root namespace) through a relay that listens on the same loopback
ports inside each node's namespace (a process per node, tests/support/store_relay.py):
`cut_store(node)` blackholes that relay (bytes are dropped, no FIN, no RST), the way a cut
link would. An `Observer` samples every 10 ms which
namespaces hold the VIP in their kernel.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from tests.support.netlab import NetLab
from tests.support.procs import run, wait_for

#: The agent as operators run it (`anycast-edge run`), with its vip_group extension.
AGENT = str(Path(sys.executable).parent / "anycast-edge")
SUBNET = "198.18.2"
VIP = f"{SUBNET}.100"
VIP_CIDR = f"{VIP}/24"
CLIENT = f"{SUBNET}.50"
BACKEND = f"{SUBNET}.20"
GATEWAY = f"{SUBNET}.254"
BACKEND_PORT = 8081
SERVICE_PORT = 8080
ADMIN_PORT = 9901
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def in_netns(netns: str, make: Callable[[], socket.socket]) -> socket.socket:
    """A socket created inside `netns` (it stays there), from a throwaway thread so no
    thread of ours ever runs in another namespace afterwards."""
    result: list[socket.socket | BaseException] = []

    def worker() -> None:
        target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            if _libc.setns(target, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {netns}")
            result.append(make())
        except BaseException as error:
            result.append(error)
        finally:
            os.close(target)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


@dataclass
class Node:
    name: str
    netns: str
    address: str
    veth: str  # the node's end of its link to the bridge
    bridge_port: str  # the bridge's end
    mac: str = ""
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    store_cut: threading.Event = field(default_factory=threading.Event)


class StoreRelay:
    """Inside each node's namespace, 127.0.0.1:<port of each etcd member> relays to the
    same port of the root namespace's loopback, unless that node's store link is cut."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self._closing = threading.Event()
        self._sockets: list[socket.socket] = []

    def add(self, node: Node) -> None:
        for port in self.ports:

            def listen(port: int = port) -> socket.socket:
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
                s.listen(64)
                return s

            server = in_netns(node.netns, listen)
            self._sockets.append(server)
            threading.Thread(target=self._accept, args=(server, port, node), daemon=True).start()

    def _accept(self, server: socket.socket, port: int, node: Node) -> None:
        while not self._closing.is_set():
            try:
                inner, _ = server.accept()
            except OSError:
                return
            try:
                outer = socket.create_connection(("127.0.0.1", port), timeout=2)
            except OSError:
                inner.close()
                continue
            self._sockets += [inner, outer]
            for a, b in ((inner, outer), (outer, inner)):
                threading.Thread(target=self._pump, args=(a, b, node), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, node: Node) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not node.store_cut.is_set():  # cut: bytes vanish, nothing is closed
                    sink.sendall(data)
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closing.set()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()


class ApLab(NetLab):
    """Build with `ApLab.create(...)`; always `close()`."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: list[Node] = []
        self.client_netns = ""
        self.backend_netns = ""
        self.switch_netns = ""
        self.relays: dict[str, subprocess.Popen[bytes]] = {}
        self.key = secrets.token_hex(24)
        self.etcd_urls: list[str] = []
        self.backend_count = 1
        self.sticky_header: str | None = None
        self.sticky_algorithm = "maglev"
        # node_config gives every node an arp_monitor on the gateway
        self.arp_monitor = False

    @classmethod
    def create_segment(
        cls,
        node_count: int = 2,
        etcd_urls: list[str] | None = None,
        *,
        backends: int = 1,
        sticky_header: str | None = None,
        sticky_algorithm: str = "maglev",
        relay_ports: list[int] | None = None,
    ) -> ApLab:
        """`etcd_urls`: loopback client URLs of the root namespace's etcd members;
        `sticky_header`: the nodes balance by maglev on that request header, or by
        `sticky_algorithm` with `pool.sticky` (the session table keeps a key's backend);
        `relay_ports`: more root-namespace loopback ports the nodes reach on their own
        loopback (e.g. the GSLB API's)."""
        lab = cls()
        lab.etcd_urls = list(etcd_urls or [])
        lab.backend_count, lab.sticky_header = backends, sticky_header
        lab.sticky_algorithm = sticky_algorithm
        ports = [int(url.rsplit(":", 1)[1]) for url in lab.etcd_urls] + list(relay_ports or [])
        try:
            lab._build_segment(node_count, ports)
        except BaseException:
            lab.close()
            raise
        return lab

    def _port(self, role: str, address: str) -> tuple[str, str, str]:
        netns = self._add_netns(role)
        inner, outer = f"ae{self.suffix}{role}", f"ae{self.suffix}{role}s"
        self._veth(netns, inner, self.switch_netns, outer)
        run("ip", "-n", self.switch_netns, "link", "set", outer, "master", "br0", "up")
        run("ip", "-n", netns, "addr", "add", f"{address}/24", "dev", inner)
        run("ip", "-n", netns, "link", "set", inner, "up")
        return netns, inner, outer

    def _build_segment(self, node_count: int, etcd_ports: list[int]) -> None:
        self.switch_netns = self._add_netns("sw")
        run("ip", "-n", self.switch_netns, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.switch_netns, "link", "set", "br0", "up")
        run("ip", "-n", self.switch_netns, "addr", "add", f"{GATEWAY}/24", "dev", "br0")
        self.client_netns, _, _ = self._port("c", CLIENT)
        self.backend_netns, _, _ = self._port("b", BACKEND)
        for index in range(1, node_count + 1):
            address = f"{SUBNET}.{index}"
            netns, inner, outer = self._port(f"n{index}", address)
            node = Node(f"n{index}", netns, address, inner, outer)
            link = json.loads(run("ip", "-n", netns, "-j", "link", "show", "dev", inner))
            node.mac = link[0]["address"]
            self.nodes.append(node)
        for node in self.nodes if etcd_ports else []:
            relay = self.spawn(
                [sys.executable, "-m", "tests.support.store_relay", node.netns]
                + [str(p) for p in etcd_ports],
                stdout=subprocess.PIPE,
                stdin_pipe=True,
            )
            assert relay.stdout is not None
            if relay.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"the store relay of {node.name} did not start")
            self.relays[node.name] = relay
        for index in range(1, self.backend_count + 1):
            # fmt: off
            self.spawn(
                [
                    "ip", "netns", "exec", self.backend_netns, sys.executable, "-m",
                    "deploy.backend.named_backend", "--host", BACKEND,
                    "--port", str(BACKEND_PORT + index - 1), "--name", f"backend-{index}",
                ]
            )
            # fmt: on

    # -- nodes --------------------------------------------------------------------------
    def node_config(
        self,
        node: Node,
        priority: int,
        *,
        etcd: list[str] | None = None,
        prefix: str = "",
        **group: Any,
    ) -> dict[str, Any]:
        vip_group: dict[str, Any] = {
            "name": "g1",
            "interface": node.veth,
            "vip": VIP_CIDR,
            "node_id": node.name,
            "priority": priority,
            "members": [{"id": n.name, "address": n.address} for n in self.nodes],
            "key": self.key,
            **group,
        }
        if self.arp_monitor:
            vip_group.setdefault("arp_monitor", {"targets": [GATEWAY]})
        if etcd:
            vip_group["fencing"] = {"endpoints": etcd, "prefix": prefix or f"/t-{self.suffix}/"}
        return {
            "node": {"name": node.name, "site": "site-ap"},
            "listeners": [
                {"name": "web", "kind": "http", "address": "0.0.0.0", "port": SERVICE_PORT}
            ],
            "backends": [
                {"name": f"backend-{i}", "address": BACKEND, "port": BACKEND_PORT + i - 1}
                for i in range(1, self.backend_count + 1)
            ],
            **(
                {
                    "pool": {
                        "algorithm": self.sticky_algorithm,
                        "hash_key": {"kind": "header", "name": h},
                        # any other algorithm keeps a client on its backend by the table
                        "sticky": self.sticky_algorithm != "maglev",
                    }
                }
                if (h := self.sticky_header)
                else {}
            ),
            "health": {"active": {"kind": "tcp", "interval": 0.2, "timeout": 0.2, "rise": 1}},
            "admin": {"port": ADMIN_PORT},
            "log_level": "info",
            "vip_group": vip_group,
        }

    def start_node(self, node: Node, config: dict[str, Any]) -> subprocess.Popen[bytes]:
        path = self.workdir / f"{node.name}.yaml"
        path.write_text(yaml.safe_dump(config))
        node.log = self.workdir / f"{node.name}.log"
        command = ["ip", "netns", "exec", node.netns, AGENT, "run"]
        node.process = self.spawn([*command, "-c", str(path)], stdout=node.log.open("ab"))
        return node.process

    def start_witness(
        self, node: Node, members: list[dict[str, object]]
    ) -> subprocess.Popen[bytes]:
        """`anycast-edge witness` in the node's namespace, voting in group g1."""
        path = self.workdir / f"{node.name}-witness.yaml"
        config = {"witness": {"group": "g1", "node_id": node.name, "members": members}}
        config["witness"]["key"] = self.key
        path.write_text(yaml.safe_dump(config))
        node.log = self.workdir / f"{node.name}.log"
        command = ["ip", "netns", "exec", node.netns, AGENT, "witness", "-c", str(path)]
        node.process = self.spawn(command, stdout=node.log.open("ab"))
        return node.process

    def run_node_once(self, node: Node, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        """Run a node to its exit (for configs that must be refused)."""
        path = self.workdir / f"{node.name}-once.yaml"
        path.write_text(yaml.safe_dump(config))
        command = ["ip", "netns", "exec", node.netns, AGENT, "run"]
        return subprocess.run(
            [*command, "-c", str(path)], capture_output=True, text=True, timeout=30, check=False
        )

    def signal_node(self, node: Node, sig: signal.Signals, *, whole: bool = False) -> None:
        """`sig` to the node's agent; `whole`: to its process group (the agent and its VIP
        guard, as a frozen host would be)."""
        assert node.process is not None
        with contextlib.suppress(ProcessLookupError):
            if whole:
                os.killpg(node.process.pid, sig)  # spawned in a session of its own
            else:
                os.kill(node.process.pid, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(timeout=10)

    def status(self, node: Node, timeout: float = 2.0) -> dict[str, Any]:
        """GET /status from the node's admin endpoint (its namespace's loopback)."""

        def connect() -> socket.socket:
            return socket.create_connection(("127.0.0.1", ADMIN_PORT), timeout=timeout)

        conn = http.client.HTTPConnection("127.0.0.1", ADMIN_PORT, timeout=timeout)
        conn.sock = in_netns(node.netns, connect)
        try:
            conn.request("GET", "/status")
            data: dict[str, Any] = json.loads(conn.getresponse().read())
            return data
        finally:
            conn.close()

    def vip_status(self, node: Node) -> dict[str, Any]:
        group: dict[str, Any] = self.status(node)["vip_group"]
        return group

    def wait_vip(self, node: Node, field: str, value: Any, timeout: float = 15.0) -> None:
        """Until the node's /status says vip_group[field] == value (it may still be starting)."""

        def reached() -> bool:
            with contextlib.suppress(OSError, ValueError, KeyError):
                return bool(self.vip_status(node)[field] == value)
            return False

        wait_for(reached, timeout, 0.05, what=f"{node.name} {field} {value}")

    def wait_role(self, node: Node, role: str, timeout: float = 15.0) -> None:
        self.wait_vip(node, "role", role, timeout)

    # -- the segment --------------------------------------------------------------------
    def holds_vip(self, node: Node) -> bool:
        out = run("ip", "-n", node.netns, "-o", "addr", "show", "dev", node.veth)
        return f" {VIP}/" in out

    def client_neighbour(self) -> str:
        """The client's ARP entry for the VIP: 'mac state' or ''."""
        out = run("ip", "-n", self.client_netns, "neigh", "show", VIP).split()
        if "lladdr" not in out:
            return ""
        return f"{out[out.index('lladdr') + 1]} {out[-1]}"

    def client_mac_for_vip(self) -> str:
        return self.client_neighbour().split(" ")[0]

    def _client_request(self, timeout: float, headers: dict[str, str]) -> http.client.HTTPResponse:
        def connect() -> socket.socket:
            return socket.create_connection((VIP, SERVICE_PORT), timeout=timeout)

        conn = http.client.HTTPConnection(VIP, SERVICE_PORT, timeout=timeout)
        conn.sock = in_netns(self.client_netns, connect)
        try:
            conn.request("GET", "/", headers={"Host": "ap", **headers})
            response = conn.getresponse()
            response.read()
            return response
        finally:
            conn.close()

    def client_get(self, timeout: float = 2.0) -> str:
        """One HTTP request from the client to the VIP: the node in its Via header."""
        via = self._client_request(timeout, {}).getheader("Via") or ""
        return via.split(" ")[-1].split(".")[0]

    def client_get_backend(self, key: str, timeout: float = 2.0) -> str:
        """The backend that answered a request carrying `key` in the sticky header."""
        assert self.sticky_header is not None
        response = self._client_request(timeout, {self.sticky_header: key})
        return response.getheader("X-Backend") or ""

    def cut_link(self, node: Node) -> None:
        """Blackhole the node's link to the segment, both ways (no carrier loss)."""
        for netns, dev in ((node.netns, node.veth), (self.switch_netns, node.bridge_port)):
            run("tc", "-n", netns, "qdisc", "add", "dev", dev, "root", "pfifo", "limit", "0")

    def heal_link(self, node: Node) -> None:
        for netns, dev in ((node.netns, node.veth), (self.switch_netns, node.bridge_port)):
            run("tc", "-n", netns, "qdisc", "del", "dev", dev, "root", check=False)

    def cut_heartbeats(self, node: Node, port: int = 5405, peer: Node | None = None) -> None:
        """Drop the group's heartbeats to and from the node (nftables inside its namespace,
        gone with it), or only those between it and `peer`; the data path and the store
        stay up."""
        source = f"ip saddr {peer.address} " if peer else ""
        target = f"ip daddr {peer.address} " if peer else ""
        rules = (
            "table inet ae_vip {\n"
            f" chain in {{ type filter hook input priority 0; {source}udp dport {port} drop; }}\n"
            f" chain out {{ type filter hook output priority 0; {target}udp dport {port} drop; }}\n"
            "}\n"
        )
        subprocess.run(
            ["ip", "netns", "exec", node.netns, "nft", "-f", "-"],
            input=rules.encode(),
            check=True,
            timeout=10,
        )

    def heal_heartbeats(self, node: Node) -> None:
        run(
            "ip",
            "netns",
            "exec",
            node.netns,
            "nft",
            "delete",
            "table",
            "inet",
            "ae_vip",
            check=False,
        )

    def _relay(self, node: Node, command: bytes) -> None:
        relay = self.relays[node.name]
        assert relay.stdin is not None and relay.stdout is not None
        relay.stdin.write(command + b"\n")
        relay.stdin.flush()
        if relay.stdout.readline().strip() != b"ok":  # in force once it said so
            raise RuntimeError(f"the store relay of {node.name} refused {command!r}")

    def cut_store(self, node: Node) -> None:
        self._relay(node, b"cut")

    def heal_store(self, node: Node) -> None:
        self._relay(node, b"heal")

    def close(self) -> None:
        for node in self.nodes:  # a frozen node would not die of SIGKILL before SIGCONT
            if node.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.process.pid, signal.SIGCONT)
        super().close()


class Observer:
    """Samples every `interval_s` which nodes hold the VIP in their kernel (netlink) and,
    with `arp=True`, which MACs answer an ARP request for it broadcast from the client."""

    def __init__(self, lab: ApLab, interval_s: float = 0.01, *, arp: bool = False) -> None:
        from pyroute2 import NetNS

        self.lab = lab
        self.interval_s = interval_s
        self._handles = [(node.name, NetNS(node.netns)) for node in lab.nodes]
        self.samples: list[tuple[float, frozenset[str]]] = []
        self.arp_answers: list[frozenset[str]] = []  # per sample: MACs that answered
        self.dual_times: list[float] = []  # monotonic times at which two nodes held the VIP
        self.dual_wall: list[float] = []  # the same, wall clock (to find them in node logs)
        self._arp: socket.socket | None = None
        if arp:
            self._arp, self._arp_request = self._arp_socket()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _arp_socket(self) -> tuple[socket.socket, bytes]:
        from scapy.layers.l2 import ARP, Ether

        veth = f"ae{self.lab.suffix}c"
        mac = json.loads(run("ip", "-n", self.lab.client_netns, "-j", "link", "show", veth))[0][
            "address"
        ]
        request = bytes(
            Ether(dst="ff:ff:ff:ff:ff:ff", src=mac) / ARP(op=1, hwsrc=mac, psrc=CLIENT, pdst=VIP)
        )

        def make() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
            s.bind((veth, 0))
            s.setblocking(False)
            return s

        return in_netns(self.lab.client_netns, make), request

    def _arp_repliers(self) -> frozenset[str]:
        """MACs of the ARP replies for the VIP that arrived since the last request."""
        assert self._arp is not None
        macs = set()
        with contextlib.suppress(BlockingIOError):
            while True:
                frame = self._arp.recv(128)
                arp = frame[14:]
                if arp[6:8] == b"\x00\x02" and socket.inet_ntoa(arp[14:18]) == VIP:
                    macs.add(arp[8:14].hex(":"))
        return frozenset(macs)

    def _holders(self, handles: list[tuple[str, Any]]) -> frozenset[str]:
        held = set()
        for name, ns in handles:
            if any(a.get("address") == VIP for a in ns.get_addr(family=socket.AF_INET)):
                held.add(name)
        return frozenset(held)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._arp is not None:
                self.arp_answers.append(self._arp_repliers())
                self._arp.send(self._arp_request)
            now = time.monotonic()
            forward = self._holders(self._handles)
            self.samples.append((now, forward))
            # The kernels are read one after the other, so a handover that falls between two
            # reads would look like two owners. A second read in the reverse order brackets
            # every pair: for nodes read i before j, i's two reads enclose both of j's, so a
            # node in both reads beside another in both reads held the VIP at the same time.
            if len(forward) > 1 and len(forward & self._holders(self._handles[::-1])) > 1:
                self.dual_times.append(now)
                self.dual_wall.append(time.time())
            time.sleep(self.interval_s)

    def __enter__(self) -> Observer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for _, ns in self._handles:
            ns.close()
        if self._arp is not None:
            self._arp.close()

    def dual_owner_samples(self) -> int:
        return len(self.dual_times)

    def logs_around_dual(self, before_s: float = 2.0, after_s: float = 0.5) -> str:
        """Every node's log lines from `before_s` before the first two-owner sample to
        `after_s` after the last one (the lines carry wall-clock times)."""
        if not self.dual_wall:
            return ""
        low, high = self.dual_wall[0] - before_s, self.dual_wall[-1] + after_s
        stamp = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")
        first = datetime.fromtimestamp(self.dual_wall[0]).strftime("%H:%M:%S.%f")[:-3]
        out = [f"two owners first at {first}, {len(self.dual_wall)} samples"]
        for node in self.lab.nodes:
            out.append(f"--- {node.name}")
            if node.log is None or not node.log.exists():
                continue
            keep = False
            for line in node.log.read_text(errors="replace").splitlines():
                m = stamp.match(line)
                if m:
                    t = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S").timestamp() + int(m[2]) / 1000
                    keep = low <= t <= high
                if keep:
                    out.append(line)
        return "\n".join(out)

    def dual_arp_answers(self) -> int:
        """Samples in which two different MACs answered ARP for the VIP."""
        return sum(1 for macs in self.arp_answers if len(macs) > 1)

    def holders_now(self) -> frozenset[str]:
        return self.samples[-1][1] if self.samples else frozenset()

    def wait_sees(self, holders: set[str], timeout: float = 10.0) -> None:
        """Until a sample shows exactly `holders`. On a loaded host the sampler can lag the
        nodes by far more than its interval: a test that reasons about what it saw waits for
        it to have seen the state the nodes reported."""
        wanted = frozenset(holders)
        what = f"the observer to see {sorted(wanted)} holding the VIP"
        wait_for(lambda: self.holders_now() == wanted, timeout, 0.01, what=what)

    def wait_sampled_after(self, moment: float, timeout: float = 10.0) -> None:
        """Until a sample was taken after `moment` (monotonic): what it saw covers it."""
        wait_for(
            lambda: bool(self.samples) and self.samples[-1][0] > moment,
            timeout,
            0.01,
            what="the observer to sample",
        )

    def first_time_held_by(self, name: str, after: float) -> float | None:
        for t, held in self.samples:
            if t >= after and name in held:
                return t
        return None

    def last_time_held_by(self, name: str, before: float) -> float | None:
        times = [t for t, held in self.samples if t <= before and name in held]
        return times[-1] if times else None
