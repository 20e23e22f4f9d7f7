"""The ExaBGP driver: render its config, run it as a supervised child, speak its API.

Pure parts (`render_config`, `announce_command`, `withdraw_command`, `diff_commands`,
`parse_message`) are separate from the driver (`ExaBgpDriver`) so they are unit-tested
without processes.

How the API is wired, with no file polling: ExaBGP runs `bgp/api_relay.py` as its API
helper process; the relay connects to a unix socket that this driver listens on and copies
bytes both ways. ExaBGP writes JSON (neighbor state, UPDATEs sent) and `done`/`error`
acknowledgements; we write `announce`/`withdraw` commands.

Dead-man switches, so a dead or hung agent takes its routes with it:
- ExaBGP gets PR_SET_PDEATHSIG(SIGKILL): it dies with the thread that started it.
- ExaBGP runs with `api.terminate=true`: when the relay's socket closes (agent gone), the
  relay exits and ExaBGP exits; the kernel closes its TCP sessions and routers withdraw.
- Liveness beats to the relay: the event loop writes `#beat` every `beat_interval_ms`;
  when they stop for `timeout_ms` the relay (outside this process) withdraws every route
  and says so (`#deadman fired`); the driver then re-announces its desired set.
- `LoopWatchdog`: a thread that kills ExaBGP when the event loop stalls past a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Set
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

from bgp import api_relay
from bgp.config import BgpConfig, Family, IPAddress, IPNetwork, by_family
from bgp.exabgp_main import shutdown_text
from bgp.neighbors import NeighborRoute, routes_for
from bgp.observed import carriage, describe_carriage, no_session_reason, notification_reason
from bgp.policy import Advertisement

log = logging.getLogger(__name__)

PROCESS_NAME = "agent"
RELAY_SCRIPT = Path(api_relay.__file__).resolve()
_PR_SET_PDEATHSIG = 1


# -- pure: rendering ----------------------------------------------------------------------


def render_config(config: BgpConfig, relay_command: str) -> str:
    """ExaBGP's configuration for this node. Contains the TCP-MD5 passwords: write it 0600."""
    lines = [
        f"process {PROCESS_NAME} {{",
        f"    run {relay_command};",
        "    encoder json;",
        "}",
        "",
    ]
    for neighbor in config.neighbors:
        lines += [
            f"neighbor {neighbor.peer_address} {{",
            f'    description "{neighbor.description or "anycast-edge"}";',
            f"    router-id {config.router_id};",
            f"    local-address {config.local_address_for(Family.of(neighbor.peer_address))};",
            f"    local-as {config.local_asn};",
            f"    peer-as {neighbor.peer_asn};",
            # Explicit: ExaBGP's default is 180 s; it bounds a silent peer's lifetime.
            f"    hold-time {neighbor.hold_time_s};",
        ]
        if neighbor.md5_password is not None:
            lines.append(f"    md5-password {neighbor.md5_password.get_secret_value()};")
        if neighbor.passive:
            lines += ["    passive true;", f"    listen {neighbor.port};"]
        else:
            lines.append(f"    connect {neighbor.port};")
        if neighbor.multihop and neighbor.ttl is not None:
            lines.append(f"    outgoing-ttl {neighbor.ttl};")
        lines += [
            "    capability {",
            f"        route-refresh {'enable' if neighbor.route_refresh else 'disable'};",
        ]
        if neighbor.graceful_restart_s is not None:
            lines.append(f"        graceful-restart {neighbor.graceful_restart_s};")
        lines += [
            "    }",
            "    family {",
            *(f"        {family} unicast;" for family in sorted(neighbor.carried)),
            "    }",
            "    api {",
            f"        processes [ {PROCESS_NAME} ];",
            "        neighbor-changes;",
            "        negotiated;",
            "        send {",
            "            parsed;",
            "            update;",
            "            open;",
            "            notification;",
            "        }",
            "        receive {",
            "            parsed;",
            "            open;",
            "            notification;",
            "            refresh;",
            "        }",
            "    }",
            "}",
            "",
        ]
    return "\n".join(lines)


def announce_command(peer: IPAddress, route: NeighborRoute) -> str:
    # ExaBGP sends the AS path we give verbatim (our ASN, prepends; empty for iBGP).
    parts = [
        f"neighbor {peer} announce route {route.prefix} next-hop {route.next_hop}",
        "origin igp",
        f"med {route.med}",
        f"as-path [ {' '.join(str(asn) for asn in route.as_path)} ]",
    ]
    if route.local_pref is not None:
        parts.append(f"local-preference {route.local_pref}")
    if route.communities:
        parts.append(f"community [ {' '.join(route.communities)} ]")
    if route.large_communities:
        parts.append(f"large-community [ {' '.join(route.large_communities)} ]")
    if route.extended_communities:
        parts.append(f"extended-community [ {' '.join(route.extended_communities)} ]")
    return " ".join(parts)


def withdraw_command(peer: IPAddress, prefix: IPNetwork) -> str:
    return f"neighbor {peer} withdraw route {prefix}"


def diff_commands(
    current: Set[Advertisement], desired: Set[Advertisement], config: BgpConfig
) -> list[str]:
    """Commands that take ExaBGP's RIB from `current` to `desired`, each neighbor's routes
    shaped by `bgp.neighbors`. Withdraws go first: taking traffic away must never wait
    behind attracting it."""
    withdraws: list[str] = []
    announces: list[str] = []
    for neighbor in config.neighbors:
        peer = neighbor.peer_address
        now = routes_for(current, neighbor, config)
        wanted = routes_for(desired, neighbor, config)
        gone = sorted({r.prefix for r in now} - {r.prefix for r in wanted}, key=by_family)
        withdraws += [withdraw_command(peer, prefix) for prefix in gone]
        changed = sorted(wanted - now, key=lambda route: by_family(route.prefix))
        announces += [announce_command(peer, route) for route in changed]
    return withdraws + announces


# -- pure: parsing ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NeighborState:
    peer: IPAddress
    state: str  # "up", "connected", "down"
    reason: str = ""


@dataclass(frozen=True, slots=True)
class SentUpdate:
    peer: IPAddress
    announced: frozenset[IPNetwork]
    withdrawn: frozenset[IPNetwork]
    end_of_rib: bool = False


@dataclass(frozen=True, slots=True)
class Ack:
    ok: bool


@dataclass(frozen=True, slots=True)
class DeadmanFired:
    """The relay withdrew every route: no liveness beat came for `silent_ms`; `at` is
    the relay's time.monotonic() when it fired (one clock for the whole host)."""

    silent_ms: int
    at: float = 0.0


@dataclass(frozen=True, slots=True)
class OpenSeen:
    """An OPEN we sent ("send") or received ("receive"), with its capability names."""

    peer: IPAddress
    direction: str
    asn: int
    hold_time_s: int
    capabilities: frozenset[str]


@dataclass(frozen=True, slots=True)
class Negotiated:
    peer: IPAddress
    hold_time_s: int
    route_refresh: str  # "absent", "normal", "enhanced"


@dataclass(frozen=True, slots=True)
class NotificationSeen:
    peer: IPAddress
    direction: str  # "send" or "receive"
    code: int
    subcode: int
    message: str  # the data as text (RFC 8203 shutdown communication, when any)


@dataclass(frozen=True, slots=True)
class RefreshSeen:
    """A ROUTE-REFRESH the peer sent us (its filters changed; ExaBGP re-sends)."""

    peer: IPAddress


Message = (
    NeighborState
    | SentUpdate
    | Ack
    | DeadmanFired
    | OpenSeen
    | Negotiated
    | NotificationSeen
    | RefreshSeen
    | None
)


_FAMILIES = ("ipv4 unicast", "ipv6 unicast")


def _capability_names(capabilities: Any) -> frozenset[str]:
    names: set[str] = set()
    for key, value in (capabilities or {}).items():
        name = value.get("name") if isinstance(value, dict) else None
        names.add(str(name or key).replace(" ", "-"))
    return frozenset(names)


def parse_message(line: str) -> Message:
    """One line from ExaBGP's API: an ack, a neighbor state change, an UPDATE we sent, or
    something we do not need (None)."""
    line = line.strip()
    if line in ("done", "error"):
        return Ack(ok=line == "done")
    if line.startswith(api_relay.FIRED.decode()):
        words = line.removeprefix(api_relay.FIRED.decode()).split()
        try:
            return DeadmanFired(int(words[0]), float(words[1]) if len(words) > 1 else 0.0)
        except (IndexError, ValueError):
            return DeadmanFired(0)
    if not line.startswith("{"):
        return None
    try:
        data: dict[str, Any] = json.loads(line)
    except json.JSONDecodeError:
        return None
    neighbor = data.get("neighbor", {})
    try:
        peer = ip_address(neighbor["address"]["peer"])
    except (KeyError, TypeError, ValueError):
        return None
    kind = data.get("type")
    if kind == "state":
        return NeighborState(peer, str(neighbor.get("state", "")), str(neighbor.get("reason", "")))
    try:
        return _parse_session_message(kind, peer, neighbor)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _parse_session_message(kind: Any, peer: IPAddress, neighbor: dict[str, Any]) -> Message:
    direction = str(neighbor.get("direction", ""))
    if kind == "open":
        message = neighbor["open"]
        capabilities = _capability_names(message.get("capabilities"))
        return OpenSeen(
            peer, direction, int(message["asn"]), int(message["hold_time"]), capabilities
        )
    if kind == "negotiated":
        message = neighbor["negotiated"]
        return Negotiated(peer, int(message["hold_time"]), str(message.get("refresh", "")))
    if kind == "notification":
        message = neighbor["notification"]
        text = str(message.get("message", ""))
        return NotificationSeen(
            peer, direction, int(message["code"]), int(message["subcode"]), text
        )
    if kind == "refresh" and direction == "receive":
        return RefreshSeen(peer)
    if kind == "update" and neighbor.get("direction") == "send":
        message = neighbor.get("message", {})
        if "eor" in message:
            return SentUpdate(peer, frozenset(), frozenset(), end_of_rib=True)
        update = message.get("update", {})
        announced = {
            ip_network(entry["nlri"])
            for family in _FAMILIES
            for by_hop in update.get("announce", {}).get(family, {}).values()
            for entry in by_hop
        }
        withdrawn = {
            ip_network(entry["nlri"])
            for family in _FAMILIES
            for entry in update.get("withdraw", {}).get(family, [])
        }
        return SentUpdate(peer, frozenset(announced), frozenset(withdrawn))
    return None


# -- the driver ---------------------------------------------------------------------------


def set_parent_death_signal() -> None:
    """preexec: SIGKILL this child when the thread that forked it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def default_exabgp_binary() -> str:
    beside = Path(sys.executable).with_name("exabgp")
    if beside.exists():
        return str(beside)
    found = shutil.which("exabgp")
    if not found:
        raise FileNotFoundError("exabgp not found beside the interpreter or on PATH")
    return found


@dataclass
class _PeerView:
    state: str = "down"
    reason: str = ""
    since: float = field(default_factory=time.monotonic)
    # prefix -> (announced?, monotonic time the UPDATE was reported sent)
    last_sent: dict[IPNetwork, tuple[bool, float]] = field(default_factory=dict)
    # When ExaBGP last finished sending its whole RIB to this peer (End-of-RIB): that
    # covers every change written before it, withdraws included.
    end_of_rib_at: float = 0.0
    # What the last OPENs said (ours, theirs) and what was negotiated.
    offered: frozenset[str] = frozenset()
    received: frozenset[str] = frozenset()
    hold_time_s: int | None = None
    route_refresh: str = ""
    # direction ("send"/"receive") -> the last NOTIFICATION and when (monotonic).
    notifications: dict[str, tuple[NotificationSeen, float]] = field(default_factory=dict)
    # Counters since the agent started (Prometheus counters).
    established_total: int = 0
    updates_sent: dict[str, int] = field(
        default_factory=lambda: {"announce": 0, "withdraw": 0, "end-of-rib": 0}
    )
    notifications_total: dict[tuple[str, str], int] = field(default_factory=dict)
    refreshes_received: int = 0

    def record(self, message: Message, now: float) -> None:
        """Fold one of ExaBGP's reports about this peer into the view."""
        if isinstance(message, OpenSeen):
            if message.direction == "send":
                self.offered = message.capabilities
            else:
                self.received = message.capabilities
        elif isinstance(message, Negotiated):
            self.hold_time_s, self.route_refresh = message.hold_time_s, message.route_refresh
        elif isinstance(message, NotificationSeen):
            self.notifications[message.direction] = (message, now)
            key = (message.direction, notification_reason(message.code, message.subcode))
            self.notifications_total[key] = self.notifications_total.get(key, 0) + 1
        elif isinstance(message, RefreshSeen):
            self.refreshes_received += 1
        elif isinstance(message, SentUpdate):
            if message.end_of_rib:
                self.end_of_rib_at = now
                self.updates_sent["end-of-rib"] += 1
            for prefix in message.announced:
                self.last_sent[prefix] = (True, now)
            for prefix in message.withdrawn:
                self.last_sent[prefix] = (False, now)
            self.updates_sent["announce"] += bool(message.announced)
            self.updates_sent["withdraw"] += bool(message.withdrawn)

    def announced(self) -> set[IPNetwork]:
        """Prefixes this peer was last sent as announced (its Adj-RIB-In from us)."""
        return {prefix for prefix, (up, _) in self.last_sent.items() if up}

    def snapshot(self, now: float) -> dict[str, Any]:
        def notification(direction: str) -> dict[str, Any] | None:
            if direction not in self.notifications:
                return None
            seen, at = self.notifications[direction]
            return {
                "code": seen.code,
                "subcode": seen.subcode,
                "reason": notification_reason(seen.code, seen.subcode),
                "message": seen.message,
                "age_s": round(now - at, 3),
            }

        up = self.state == "up"
        return {
            "state": self.state,
            "reason": self.reason,
            "uptime_s": round(now - self.since, 3) if up else None,
            "hold_time_s": self.hold_time_s if up else None,
            "route_refresh": self.route_refresh if up else None,
            "capabilities": {
                "offered": sorted(self.offered),
                "received": sorted(self.received),
                "negotiated": sorted(self.offered & self.received) if up else [],
            },
            "sent": {
                str(prefix): {"announced": announced, "age_s": round(now - at, 3)}
                for prefix, (announced, at) in sorted(
                    self.last_sent.items(), key=lambda item: by_family(item[0])
                )
            },
            "last_notification_sent": notification("send"),
            "last_notification_received": notification("receive"),
            "counters": {
                "established": self.established_total,
                "updates_sent": dict(self.updates_sent),
                "notifications": [
                    {"direction": direction, "reason": reason, "count": count}
                    for (direction, reason), count in sorted(self.notifications_total.items())
                ],
                "route_refreshes_received": self.refreshes_received,
            },
        }


class ExaBgpDriver:
    """Runs ExaBGP for one node and keeps its announcements equal to the desired set.

    `set_desired()` takes the whole desired set (MetalLB-style); the driver works out
    the difference against what it wrote to the current ExaBGP process. `wait_sent()`
    waits until every established neighbor was sent an UPDATE for each change.
    Start it from the event loop's (main) thread: the parent-death signal is per thread.
    """

    def __init__(
        self,
        config: BgpConfig,
        workdir: Path,
        *,
        netns: str | None = None,
        exabgp_binary: str | None = None,
        restart_backoff_s: tuple[float, float] = (0.5, 10.0),
        on_neighbor_change: Callable[[NeighborState], None] | None = None,
    ) -> None:
        self.config = config
        self.workdir = workdir
        self.netns = netns
        self.exabgp_binary = exabgp_binary or default_exabgp_binary()
        self.restart_backoff_s = restart_backoff_s
        self.on_neighbor_change = on_neighbor_change
        self.restarts = 0
        self.deadman_firings = 0
        self.last_deadman_firing: DeadmanFired | None = None
        # Bumped whenever ExaBGP's RIB is no longer what we wrote (the relay withdrew
        # everything): a batch of commands in flight then must not count as written.
        self._rib_generation = 0
        # After a firing, announces wait until the loop has beaten for one more dead-man
        # period: what the agent learnt while frozen (health, stdin, API) is handled first.
        self._resync_at = 0.0
        self._desired: frozenset[Advertisement] = frozenset()
        self._written: frozenset[Advertisement] = frozenset()
        self._peers: dict[IPAddress, _PeerView] = {
            n.peer_address: _PeerView() for n in config.neighbors
        }
        self._changed = asyncio.Event()
        self._state_changed = asyncio.Event()
        self._acks: list[asyncio.Future[bool]] = []
        self._writer: asyncio.StreamWriter | None = None
        self._connected: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )
        self._process: asyncio.subprocess.Process | None = None
        self._server: asyncio.Server | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        # Time the last batch of changes was written (for wait_sent), and what each
        # changed prefix should now be: announced (True) or withdrawn (False).
        self._written_at = 0.0
        self._pending: dict[IPNetwork, bool] = {}

    # -- public API -------------------------------------------------------------------

    @property
    def socket_path(self) -> Path:
        return self.workdir / "exabgp-api.sock"

    @property
    def config_path(self) -> Path:
        return self.workdir / "exabgp.conf"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process and self._process.returncode is None else None

    def neighbors(self) -> dict[IPAddress, NeighborState]:
        return {
            peer: NeighborState(peer, view.state, view.reason) for peer, view in self._peers.items()
        }

    @property
    def desired(self) -> frozenset[Advertisement]:
        return self._desired

    @property
    def written(self) -> frozenset[Advertisement]:
        """What the running ExaBGP was told (its RIB, sent to every established peer)."""
        return self._written

    def sent_to(self) -> dict[IPNetwork, set[IPAddress]]:
        """Per desired prefix, the established peers last sent it as announced."""
        return {
            adv.prefix: {
                peer
                for peer, view in self._peers.items()
                if view.state == "up" and adv.prefix in view.announced()
            }
            for adv in self._desired
        }

    def no_session_reason(self) -> str | None:
        """It wants to announce and no session carries it (see bgp.observed)."""
        established = sum(view.state == "up" for view in self._peers.values())
        return no_session_reason(
            {adv.prefix for adv in self._desired}, self.sent_to(), established, len(self._peers)
        )

    def status(self) -> dict[str, Any]:
        """For the agent's /status: what we want, what ExaBGP holds, what each peer was
        sent (the peers' view), per session its state, capabilities and NOTIFICATIONs."""
        now = time.monotonic()
        sent_to = self.sent_to()
        established = {peer for peer, view in self._peers.items() if view.state == "up"}
        desired = {adv.prefix for adv in self._desired}
        prefixes = {}
        for prefix in sorted(desired | {adv.prefix for adv in self._written}, key=by_family):
            peers = sent_to.get(prefix, set())
            # Of the sessions that carry this prefix's family.
            carriers = self._carriers(Family.of(prefix))
            state = carriage(prefix in desired, established & carriers, peers)
            prefixes[str(prefix)] = {
                "desired": prefix in desired,
                "written": any(adv.prefix == prefix for adv in self._written),
                "sent_to": sorted(str(peer) for peer in peers),
                "carriage": describe_carriage(state, len(peers), len(carriers)),
            }
        return {
            "exabgp_pid": self.pid,
            "restarts": self.restarts,
            "sessions": {str(peer): view.snapshot(now) for peer, view in self._peers.items()},
            "prefixes": prefixes,
            # Announced = some established peer holds it from us, not merely intended.
            "announced": sorted(str(prefix) for prefix, peers in sent_to.items() if peers),
            "desired": sorted(str(prefix) for prefix in desired),
            "written": sorted(str(adv.prefix) for adv in self._written),
        }

    def _carriers(self, family: Family) -> set[IPAddress]:
        return {n.peer_address for n in self.config.neighbors if family in n.carried}

    def set_desired(self, advertisements: Iterable[Advertisement]) -> None:
        self._desired = frozenset(advertisements)
        self._changed.set()

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._server = await asyncio.start_unix_server(self._on_relay, path=str(self.socket_path))
        relay = f"{sys.executable} {RELAY_SCRIPT} {self.socket_path}"
        if self.config.deadman.enabled:
            relay += f" --deadman-ms {self.config.deadman.timeout_ms}"
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(render_config(self.config, relay))
        self._supervisor = asyncio.create_task(self._supervise(), name="exabgp-supervisor")

    async def stop(
        self,
        withdraw_first: bool = True,
        withdraw_wait_s: float = 2.0,
        reason: str = "anycast-edge agent stopping",
    ) -> None:
        """Withdraw (best effort, bounded), end each session with a Cease NOTIFICATION
        (Administrative Shutdown) whose RFC 8203 message is `reason`, then stop ExaBGP;
        nothing is left running."""
        # `_desired` too: a batch still in flight counts (written once it is acked).
        if withdraw_first and self._writer is not None and (self._written or self._desired):
            self.set_desired(())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wait_sent(), withdraw_wait_s)
        if withdraw_first:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.shut_down_sessions(reason), withdraw_wait_s)
        self._stopping = True
        self._changed.set()
        if self._supervisor:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self._kill_process()
        if self._server:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    async def shut_down_sessions(self, reason: str) -> None:
        """Cease 6/2 with `reason` (RFC 8203) to every established peer, no reconnect;
        returns once ExaBGP reported each NOTIFICATION sent and the session closed (it
        reports the NOTIFICATION before its bytes are on the wire: killing it at once
        could lose them)."""
        if self._writer is None:
            return
        started = time.monotonic()
        await self._command(f"shutdown-sessions {shutdown_text(reason)}")
        # ExaBGP answers in order: once the ack is read, so is every session change it
        # reported before, and the sessions it tears down are the ones up now.
        peers = [peer for peer, view in self._peers.items() if view.state == "up"]

        def notified(peer: IPAddress) -> bool:
            view = self._peers[peer]
            sent = view.notifications.get("send")
            return sent is not None and sent[1] >= started and view.state != "up"

        while not all(notified(peer) for peer in peers):
            await self._wait_state_change()

    async def wait_written(self) -> None:
        """Until ExaBGP acknowledged commands that bring its RIB to the desired set."""
        while self._written != self._desired or self._writer is None:
            await self._wait_state_change()

    async def wait_sent(self) -> None:
        """Until the desired set was written and every established neighbor was sent an
        UPDATE for each prefix that changed in the last batch."""
        await self.wait_written()
        while not self._all_up_peers_sent():
            await self._wait_state_change()

    async def wait_established(self, peers: Iterable[IPAddress] | None = None) -> None:
        wanted = list(peers) if peers is not None else list(self._peers)
        while not all(self._peers[p].state == "up" for p in wanted):
            await self._wait_state_change()

    async def send_raw(self, command: str) -> bool:
        """Write one API command as is (tests: e.g. a prefix our config would refuse)."""
        return await self._command(command)

    def kill_now(self) -> None:
        """Thread-safe: SIGKILL ExaBGP at once (its TCP sessions close; routes go)."""
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)

    # -- internals --------------------------------------------------------------------

    async def _wait_state_change(self) -> None:
        self._state_changed.clear()
        await self._state_changed.wait()

    def _notify(self) -> None:
        self._state_changed.set()

    def _all_up_peers_sent(self) -> bool:
        for view in self._peers.values():
            if view.state != "up":
                continue
            if view.end_of_rib_at >= self._written_at:
                continue
            for prefix, announced in self._pending.items():
                sent = view.last_sent.get(prefix)
                # The kind matters too: a late report of the previous batch's announce
                # must not pass for this batch's withdraw.
                if sent is None or sent[1] < self._written_at or sent[0] != announced:
                    return False
        return True

    async def _on_relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._connected.put((reader, writer))

    def _exabgp_command(self) -> list[str]:
        # ExaBGP's own script, run by bgp.exabgp_main for its one extra API command.
        wrapper = [sys.executable, "-m", "bgp.exabgp_main"]
        command = [*wrapper, self.exabgp_binary, str(self.config_path)]
        if self.netns:
            command = ["ip", "netns", "exec", self.netns, *command]
        return command

    def _exabgp_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "exabgp_daemon_daemonize": "false",
                "exabgp_daemon_user": "root",
                "exabgp_daemon_drop": "false",
                "exabgp_api_terminate": "true",  # relay gone (agent gone) -> ExaBGP gone
                "exabgp_api_respawn": "false",
                "exabgp_api_ack": "true",
                "exabgp_api_cli": "false",
                "exabgp_log_destination": "stderr",
                "exabgp_log_level": "WARNING",
            }
        )
        return env

    async def _supervise(self) -> None:
        low, high = self.restart_backoff_s
        backoff = low
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._run_once()
            except Exception:  # a crash of one run must not end supervision
                log.exception("ExaBGP run failed")
            if self._stopping:
                break
            self.restarts += 1
            backoff = low if time.monotonic() - started > 30 else min(high, backoff * 2)
            log.warning("ExaBGP exited; restarting in %.1f s", backoff)
            await asyncio.sleep(backoff)

    async def _run_once(self) -> None:
        stderr = (self.workdir / "exabgp.log").open("ab")
        try:
            self._process = await asyncio.create_subprocess_exec(
                *self._exabgp_command(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                env=self._exabgp_env(),
                preexec_fn=set_parent_death_signal,
            )
        finally:
            stderr.close()
        process = self._process
        exited = asyncio.create_task(process.wait())
        connected = asyncio.create_task(self._connected.get())
        await asyncio.wait({exited, connected}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        if not connected.done():
            connected.cancel()
            exited.cancel()
            await self._kill_process()
            return
        reader, writer = connected.result()
        self._writer = writer
        self._written = frozenset()  # a new ExaBGP has an empty RIB
        self._changed.set()
        reading = asyncio.create_task(self._read_loop(reader))
        writing = asyncio.create_task(self._write_loop())
        beating = asyncio.create_task(self._beat_loop(writer))
        try:
            await asyncio.wait({exited, reading}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            beating.cancel()
            writing.cancel()
            reading.cancel()
            exited.cancel()
            self._writer = None
            writer.close()
            for ack in self._acks:
                if not ack.done():
                    ack.set_result(False)
            self._acks.clear()
            for peer, view in self._peers.items():
                if view.state != "down":
                    self._set_peer_state(NeighborState(peer, "down", "ExaBGP exited"))
            await self._kill_process()
            self._notify()

    async def _kill_process(self) -> None:
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 5)

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        while True:
            line = await reader.readline()
            if not line:
                return
            message = parse_message(line.decode(errors="replace"))
            if isinstance(message, Ack):
                if self._acks:
                    self._acks.pop(0).set_result(message.ok)
            elif isinstance(message, NeighborState):
                self._set_peer_state(message)
            elif isinstance(message, DeadmanFired):
                # We were frozen or stalled; ExaBGP's RIB is empty now. Re-sync: the
                # desired set is what our state says *now*.
                log.warning("dead-man switch fired: no beat for %d ms", message.silent_ms)
                self.deadman_firings += 1
                self.last_deadman_firing = message
                self._rib_generation += 1
                self._written = frozenset()
                hold_s = self.config.deadman.timeout_ms / 1000
                self._resync_at = time.monotonic() + hold_s
                asyncio.get_running_loop().call_later(hold_s, self._changed.set)
                self._changed.set()
                self._notify()
            elif message is not None and (view := self._peers.get(message.peer)) is not None:
                view.record(message, time.monotonic())
                self._notify()

    def _set_peer_state(self, message: NeighborState) -> None:
        view = self._peers.get(message.peer)
        if view is None:
            return
        if message.state != view.state:
            view.state, view.reason, view.since = message.state, message.reason, time.monotonic()
            if message.state == "up":
                view.established_total += 1
                # ExaBGP re-sends its whole RIB (= our desired set, once written) to a
                # returning peer; a pass of the write loop catches up anything pending.
                view.last_sent.clear()
                view.end_of_rib_at = 0.0
                self._changed.set()
            if self.on_neighbor_change:
                self.on_neighbor_change(message)
        self._notify()

    async def _command(self, command: str) -> bool:
        writer = self._writer
        if writer is None:
            return False
        ack: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._acks.append(ack)
        writer.write(command.encode() + b"\n")
        await writer.drain()
        return await ack

    async def _write_loop(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            desired, written = self._desired, self._written
            if time.monotonic() < self._resync_at:
                # Re-sync after a dead-man firing: withdraws only, until the hold ends.
                desired = frozenset(adv for adv in desired if adv in written)
            commands = diff_commands(written, desired, self.config)
            if not commands:
                self._notify()
                continue
            desired_prefixes = {adv.prefix for adv in desired}
            self._pending = {
                adv.prefix: adv.prefix in desired_prefixes
                for adv in desired.symmetric_difference(written)
            }
            self._written_at = time.monotonic()
            generation = self._rib_generation
            results = await asyncio.gather(*(self._command(c) for c in commands))
            if generation != self._rib_generation:
                continue  # the RIB was cleared under this batch: _changed is set again
            if all(results):
                self._written = desired
            else:
                log.error("ExaBGP refused a command; will retry on the next change")
                # Forget what we believed: the next pass re-sends the whole desired set.
                self._written = frozenset()
            self._notify()

    async def _beat_loop(self, writer: asyncio.StreamWriter) -> None:
        """Liveness beats for the relay's dead-man switch, from this event loop."""
        if not self.config.deadman.enabled:
            return
        interval_s = self.config.deadman.beat_interval_ms / 1000
        beat = api_relay.BEAT + b"\n"
        while True:
            writer.write(beat)
            await asyncio.sleep(interval_s)


class LoopWatchdog:
    """A thread that calls `on_stall` (e.g. `ExaBgpDriver.kill_now`) when the event loop
    has not beaten for `deadline_s`: a hung agent must not keep attracting traffic."""

    def __init__(self, deadline_s: float, on_stall: Callable[[], None]) -> None:
        self.deadline_s = deadline_s
        self.on_stall = on_stall
        self.stalls = 0
        self.process_freezes = 0
        self._last_beat = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="loop-watchdog", daemon=True)
        self._beating: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._last_beat = time.monotonic()
        self._beating = asyncio.get_running_loop().create_task(self._beat())
        self._thread.start()

    async def _beat(self) -> None:
        while True:
            self._last_beat = time.monotonic()
            await asyncio.sleep(self.deadline_s / 4)

    def _watch(self) -> None:
        fired = False
        tick = self.deadline_s / 8
        last_tick = time.monotonic()
        while not self._stop.wait(tick):
            now = time.monotonic()
            if now - last_tick > self.deadline_s:
                # This thread was frozen too: the whole process was stopped (SIGSTOP, a
                # suspended VM). The freeze is over; the dead-man switch outside (the
                # relay) covered it, and killing ExaBGP now would only reset sessions.
                self.process_freezes += 1
                self._last_beat = now
            last_tick = now
            stalled = now - self._last_beat > self.deadline_s
            if stalled and not fired:
                self.stalls += 1
                self.on_stall()
            fired = stalled

    def stop(self) -> None:
        self._stop.set()
        if self._beating:
            self._beating.cancel()


__all__ = [
    "Ack",
    "DeadmanFired",
    "ExaBgpDriver",
    "LoopWatchdog",
    "NeighborState",
    "SentUpdate",
    "announce_command",
    "diff_commands",
    "parse_message",
    "render_config",
    "withdraw_command",
]
