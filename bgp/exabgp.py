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
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from bgp import api_relay
from bgp.config import BgpConfig
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
            f"    local-address {config.local_address};",
            f"    local-as {config.local_asn};",
            f"    peer-as {neighbor.peer_asn};",
            # Explicit: ExaBGP's default is 180 s; it bounds a silent peer's lifetime.
            f"    hold-time {neighbor.hold_time_s};",
        ]
        if neighbor.md5_password is not None:
            lines.append(f"    md5-password {neighbor.md5_password.get_secret_value()};")
        lines += [
            "    family {",
            "        ipv4 unicast;",
            "    }",
            "    api {",
            f"        processes [ {PROCESS_NAME} ];",
            "        neighbor-changes;",
            "        send {",
            "            parsed;",
            "            update;",
            "        }",
            "    }",
            "}",
            "",
        ]
    return "\n".join(lines)


def announce_command(adv: Advertisement) -> str:
    # ExaBGP sends the AS path we give verbatim: our own ASN once, plus the prepends.
    as_path = " ".join([str(adv.local_asn)] * (1 + adv.as_path_prepends))
    parts = [
        f"announce route {adv.prefix} next-hop {adv.next_hop}",
        "origin igp",
        f"med {adv.med}",
        f"as-path [ {as_path} ]",
    ]
    if adv.communities:
        parts.append(f"community [ {' '.join(adv.communities)} ]")
    parts.append(f"extended-community [ {' '.join(adv.extended_communities)} ]")
    return " ".join(parts)


def withdraw_command(prefix: IPv4Network) -> str:
    return f"withdraw route {prefix}"


def diff_commands(current: Set[Advertisement], desired: Set[Advertisement]) -> list[str]:
    """Commands that take ExaBGP's RIB from `current` to `desired`. Withdraws go first:
    taking traffic away must never wait behind attracting it."""
    desired_prefixes = {adv.prefix for adv in desired}
    withdraws = sorted({adv.prefix for adv in current} - desired_prefixes)
    announces = sorted(desired - current, key=lambda adv: adv.prefix)
    return [withdraw_command(p) for p in withdraws] + [announce_command(a) for a in announces]


# -- pure: parsing ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NeighborState:
    peer: IPv4Address
    state: str  # "up", "connected", "down"
    reason: str = ""


@dataclass(frozen=True, slots=True)
class SentUpdate:
    peer: IPv4Address
    announced: frozenset[IPv4Network]
    withdrawn: frozenset[IPv4Network]
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


Message = NeighborState | SentUpdate | Ack | DeadmanFired | None


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
        peer = IPv4Address(neighbor["address"]["peer"])
    except (KeyError, TypeError, ValueError):
        return None
    kind = data.get("type")
    if kind == "state":
        return NeighborState(peer, str(neighbor.get("state", "")), str(neighbor.get("reason", "")))
    if kind == "update" and neighbor.get("direction") == "send":
        message = neighbor.get("message", {})
        if "eor" in message:
            return SentUpdate(peer, frozenset(), frozenset(), end_of_rib=True)
        update = message.get("update", {})
        announced = {
            IPv4Network(entry["nlri"])
            for by_hop in update.get("announce", {}).get("ipv4 unicast", {}).values()
            for entry in by_hop
        }
        withdrawn = {
            IPv4Network(entry["nlri"])
            for entry in update.get("withdraw", {}).get("ipv4 unicast", [])
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
    last_sent: dict[IPv4Network, tuple[bool, float]] = field(default_factory=dict)
    # When ExaBGP last finished sending its whole RIB to this peer (End-of-RIB): that
    # covers every change written before it, withdraws included.
    end_of_rib_at: float = 0.0


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
        self._peers: dict[IPv4Address, _PeerView] = {
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
        self._pending: dict[IPv4Network, bool] = {}

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

    def neighbors(self) -> dict[IPv4Address, NeighborState]:
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

    def status(self) -> dict[str, Any]:
        """For the agent's /status: sessions and what is announced."""
        return {
            "exabgp_pid": self.pid,
            "restarts": self.restarts,
            "sessions": {
                str(peer): {"state": view.state, "reason": view.reason}
                for peer, view in self._peers.items()
            },
            "announced": sorted(str(adv.prefix) for adv in self._written),
            "desired": sorted(str(adv.prefix) for adv in self._desired),
        }

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

    async def stop(self, withdraw_first: bool = True, withdraw_wait_s: float = 2.0) -> None:
        """Withdraw (best effort, bounded), then stop ExaBGP; nothing is left running."""
        if withdraw_first and self._writer is not None and self._written:
            self.set_desired(())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wait_sent(), withdraw_wait_s)
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

    async def wait_established(self, peers: Iterable[IPv4Address] | None = None) -> None:
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
        command = [self.exabgp_binary, str(self.config_path)]
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
            elif isinstance(message, SentUpdate):
                view = self._peers.get(message.peer)
                if view is not None:
                    now = time.monotonic()
                    if message.end_of_rib:
                        view.end_of_rib_at = now
                    for prefix in message.announced:
                        view.last_sent[prefix] = (True, now)
                    for prefix in message.withdrawn:
                        view.last_sent[prefix] = (False, now)
                self._notify()

    def _set_peer_state(self, message: NeighborState) -> None:
        view = self._peers.get(message.peer)
        if view is None:
            return
        if message.state != view.state:
            view.state, view.reason, view.since = message.state, message.reason, time.monotonic()
            if message.state == "up":
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
            commands = diff_commands(written, desired)
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
