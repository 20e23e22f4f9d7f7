"""What both listeners share: sockets, the proxy context, idle-deadline sweeping."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from edge.config import NodeConfig
from edge.flows import Flow, FlowTable
from edge.health import OutlierPolicy
from edge.pool import Backend, Pool
from edge.proxy.framing import Limits

# Linux: bind an address that is not (yet) on an interface, e.g. the anycast /32
# before it is put on lo; the listener then serves as soon as it appears.
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
IPV6_FREEBIND = 78  # linux/in6.h (Python names no constant for it)


def bind_to_device(sock: socket.socket, vrf: str | None) -> None:
    """SO_BINDTODEVICE to a VRF device: the socket then uses that VRF's routing table
    (listeners take connections to addresses in it; connects route through it)."""
    if vrf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, vrf.encode())


def listening_socket(
    address: str, port: int, backlog: int, vrf: str | None = None
) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    # IPPROTO_TCP explicitly: the event loop only turns TCP_NODELAY on for
    # sockets whose proto says TCP, and accepted sockets inherit it.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if family == socket.AF_INET:
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        bind_to_device(sock, vrf)
        sock.bind((address, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


P = TypeVar("P", bound=asyncio.BaseProtocol)


async def connected_socket(address: str, port: int, vrf: str) -> socket.socket:
    """A TCP socket bound to the VRF device `vrf` and connected to (address, port)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setblocking(False)
        bind_to_device(sock, vrf)
        await asyncio.get_running_loop().sock_connect(sock, (address, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_backend(
    factory: Callable[[], P], backend: Backend, connect_timeout: float, vrf: str | None = None
) -> tuple[P | None, str]:
    """A new connection to a backend (through the service's VRF, if any), or None and why
    not (for passive detection)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_timeout):
            if vrf is None:
                _, protocol = await loop.create_connection(factory, backend.address, backend.port)
            else:
                sock = await connected_socket(backend.address, backend.port, vrf)
                _, protocol = await loop.create_connection(factory, sock=sock)
    except TimeoutError:
        return None, "connect failed: timed out"
    except OSError as error:
        return None, f"connect failed: {error.strerror or error}"
    return protocol, ""


def client_address(peername: Any) -> tuple[str, int]:
    """A client's address as X-Forwarded-For, the flow table and Maglev keys take it: an
    IPv6 address bare (no brackets, no port, no zone), an IPv4-mapped one as IPv4 (the
    same client hashes alike on a dual-stack listener)."""
    address, port = (peername or ("?", 0))[:2]
    address = str(address).partition("%")[0]
    if address.startswith("::ffff:") and "." in address:
        address = address.removeprefix("::ffff:")
    return address, int(port)


_background: set[asyncio.Task[None]] = set()


def spawn(coro: Coroutine[None, None, None]) -> None:
    """Run a task that nothing awaits, keeping a reference so it is not collected."""
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


class HasDeadline(Protocol):
    deadline: float

    def on_deadline(self) -> None: ...


class DeadlineSweeper:
    """One periodic sweep instead of a timer per request: cheap on the hot path.

    Connections set `deadline` (a monotonic time, or 0 for none) and register
    themselves while they are open; the sweep calls `on_deadline` on the ones
    that passed it. Granularity is the sweep interval.
    """

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self._members: set[HasDeadline] = set()
        self._task: asyncio.Task[None] | None = None

    def add(self, member: HasDeadline) -> None:
        self._members.add(member)

    def discard(self, member: HasDeadline) -> None:
        self._members.discard(member)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def sweep(self, now: float) -> None:
        expired = [m for m in self._members if 0 < m.deadline <= now]
        for member in expired:
            member.on_deadline()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.sweep(time.monotonic())


class IdleConnection(Protocol):
    transport: asyncio.Transport | None


class IdlePool:
    """Idle keep-alive upstream connections per backend, most recently used first."""

    def __init__(self) -> None:
        self._idle: dict[int, list[IdleConnection]] = {}

    def acquire(self, backend: Backend) -> Any:
        conns = self._idle.get(id(backend))
        while conns:
            conn = conns.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    def put(self, backend: Backend, conn: IdleConnection, limit: int) -> bool:
        conns = self._idle.setdefault(id(backend), [])
        if len(conns) >= limit:
            return False
        conns.append(conn)
        return True

    def remove(self, backend: Backend, conn: IdleConnection) -> None:
        conns = self._idle.get(id(backend))
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._idle[id(backend)]

    def close_backend(self, backend: Backend) -> None:
        for conn in self._idle.pop(id(backend), []):
            if conn.transport is not None:
                conn.transport.close()


class ClientConnection(Protocol):
    def close_when_idle(self, grace: float) -> None:
        """Close once no request is in flight and none arrived for `grace` seconds."""

    def abort(self) -> None: ...


# Called with (backend, detail) for a failed request that is evidence against its
# backend (at most once per request); the outlier rule decides what it leads to.
PassiveFailure = Callable[[Backend, str], None]


@dataclass(slots=True)
class ProxyContext:
    """Everything a listener needs; swapped as a whole on reload."""

    config: NodeConfig
    pool: Pool
    flows: FlowTable
    sweeper: DeadlineSweeper
    on_passive_failure: PassiveFailure
    # Open client connections per listener, so a drain can close them at its deadline.
    connections: dict[str, set[ClientConnection]] = field(default_factory=dict)
    # Reads the node's drain (its state machine owns it): while draining, responses say
    # `Connection: close` so keep-alive clients leave.
    is_draining: Callable[[], bool] = lambda: False
    # The Via header line added both ways, naming node and site (CRLF first).
    via_line: bytes = b""
    idle_upstreams: IdlePool = field(default_factory=IdlePool)
    limits: Limits = field(default_factory=Limits)
    outlier_policy: OutlierPolicy = field(default_factory=OutlierPolicy)
    # Messages the framing core refused, by (side, reason): side is "client" or "backend".
    rejections: dict[tuple[str, str], int] = field(default_factory=dict)
    # The service's VRF device: backend connections bind to it.
    vrf: str | None = None
    # Client connections this service accepted (a removed service's drain watches its rate).
    accepted_total: int = 0

    def __post_init__(self) -> None:
        self.update_config(self.config)

    def update_config(self, config: NodeConfig) -> None:
        self.config = config
        self.via_line = b"\r\nVia: 1.1 %b" % self.node_label.encode()
        limits = config.limits
        self.limits = Limits(limits.max_header_bytes, limits.max_headers, limits.max_request_line)
        passive = config.health.passive
        self.outlier_policy = OutlierPolicy(
            passive.consecutive_failures,
            passive.max_ejected_share,
            passive.ejection_time,
            passive.max_ejection_time,
        )

    def rejected(self, side: str, reason: str) -> None:
        key = (side, reason)
        self.rejections[key] = self.rejections.get(key, 0) + 1

    def accepted(self, conn: ClientConnection, listener: str, transport: asyncio.Transport) -> Flow:
        """Register a new client connection and open its flow (backend not chosen yet)."""
        self.connections.setdefault(listener, set()).add(conn)
        self.accepted_total += 1
        transport.set_write_buffer_limits(high=self.config.limits.buffer_high_water)
        address, port = client_address(transport.get_extra_info("peername"))
        return self.flows.open(address, port, listener, "")

    def open_connections(self) -> int:
        return sum(len(conns) for conns in self.connections.values())

    @property
    def node_label(self) -> str:
        return f"{self.config.node.name}.{self.config.node.site}"
