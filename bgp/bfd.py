"""bfdd beside ExaBGP: config, supervision, session state.

FRR's bfdd runs alone (no zebra) on the edge: single-hop `peer ROUTER local-address SELF`
(`multihop` for a multihop neighbor).
The router's `neighbor X bfd profile P` then drops a dead edge's BGP session in a few
hundred ms instead of the hold time. The trap: when the edge's bfdd dies, the router
brings BGP back *without* BFD and fast failover is silently gone. So a BFD session that
is not up while its BGP session is up is a degraded condition: reported, and repaired by
restarting bfdd.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path

from bgp.config import BgpConfig, Family, IPAddress, by_family
from bgp.exabgp import set_parent_death_signal

log = logging.getLogger(__name__)

BFDD = Path("/usr/lib/frr/bfdd")


def render_bfdd_config(config: BgpConfig) -> str:
    bfd = config.bfd
    lines = ["log stdout warnings", "bfd"]
    for neighbor in config.neighbors:
        multihop = " multihop" if neighbor.multihop else ""
        local = config.local_address_for(Family.of(neighbor.peer_address))
        lines += [
            f" peer {neighbor.peer_address}{multihop} local-address {local}",
            f"  detect-multiplier {bfd.detect_multiplier}",
            f"  receive-interval {bfd.receive_interval_ms}",
            f"  transmit-interval {bfd.transmit_interval_ms}",
            " exit",
        ]
    lines += ["exit", ""]
    return "\n".join(lines)


def parse_bfd_peers(text: str) -> dict[IPAddress, str]:
    """`show bfd peers json` -> peer -> status ("up", "down", "init", "shutdown")."""
    try:
        peers = json.loads(text or "[]")
    except json.JSONDecodeError:
        return {}
    result: dict[IPAddress, str] = {}
    for peer in peers if isinstance(peers, list) else []:
        with contextlib.suppress(KeyError, ValueError, TypeError):
            result[ip_address(peer["peer"])] = str(peer.get("status", ""))
    return result


def degraded_peers(
    bfd_status: Mapping[IPAddress, str], bgp_established: Set[IPAddress]
) -> list[IPAddress]:
    """Peers whose BGP session is up while BFD is not: fast failover silently lost."""
    return sorted((p for p in bgp_established if bfd_status.get(p) != "up"), key=by_family)


@dataclass
class BfdStatus:
    running: bool
    peers: dict[IPAddress, str] = field(default_factory=dict)
    degraded: list[IPAddress] = field(default_factory=list)
    restarts: int = 0


class BfdDaemon:
    """Runs one bfdd with its own vty socket and pid paths (several run side by side in
    separate namespaces), watches its sessions against BGP's, restarts it when it dies or
    when BFD stays down under an established BGP session for `repair_after_s`."""

    def __init__(
        self,
        config: BgpConfig,
        workdir: Path,
        bgp_established: Callable[[], Set[IPAddress]],
        *,
        netns: str | None = None,
        check_interval_s: float = 0.5,
        # BFD sessions take a few seconds to come up (slow start at 1 s intervals): a
        # session younger than this is not yet a fault.
        report_after_s: float = 5.0,
        repair_after_s: float = 10.0,
        on_degraded: Callable[[list[IPAddress]], None] | None = None,
    ) -> None:
        self.config = config
        self.workdir = workdir
        self.bgp_established = bgp_established
        self.netns = netns
        self.check_interval_s = check_interval_s
        self.report_after_s = report_after_s
        self.repair_after_s = repair_after_s
        self._reported = False
        self.on_degraded = on_degraded
        self.status = BfdStatus(running=False)
        self._process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._degraded_since: float | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process and self._process.returncode is None else None

    def _netns(self, command: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *command] if self.netns else command

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # bfdd drops privileges to FRR's user, which must own its socket directory.
        with contextlib.suppress(LookupError, PermissionError):
            shutil.chown(self.workdir, "frr", "frr")
        (self.workdir / "bfdd.conf").write_text(render_bfdd_config(self.config))
        await self._spawn()
        self._task = asyncio.create_task(self._supervise(), name="bfdd-supervisor")

    async def _spawn(self) -> None:
        args = [
            str(BFDD),
            "-f", str(self.workdir / "bfdd.conf"),
            "-i", str(self.workdir / "bfdd.pid"),
            "--vty_socket", str(self.workdir),
            # No zebra: bfdd runs alone; the path only keeps it off the system's socket.
            "-z", str(self.workdir / "zserv.api"),
            "--bfdctl", str(self.workdir / "bfdd.sock"),
        ]  # fmt: skip
        out = (self.workdir / "bfdd.out").open("ab")
        try:
            self._process = await asyncio.create_subprocess_exec(
                *self._netns(args),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                preexec_fn=set_parent_death_signal,
            )
        finally:
            out.close()
        self.status.running = True

    async def peers(self) -> dict[IPAddress, str]:
        """Session state read from this bfdd through vtysh (bounded)."""
        process = await asyncio.create_subprocess_exec(
            *self._netns(["vtysh", "--vty_socket", str(self.workdir), "-c", "show bfd peers json"]),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        stdout = b""
        try:
            stdout, _ = await asyncio.wait_for(process.communicate(), 5)
        except TimeoutError:
            pass  # a hung bfdd: no answer is "no session up"
        finally:
            # Also when cancelled (supervisor stopping): never leave vtysh behind.
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await asyncio.shield(process.wait())
        return parse_bfd_peers(stdout.decode(errors="replace"))

    async def check_once(self) -> BfdStatus:
        process = self._process
        if process is None or process.returncode is not None:
            self.status.running = False
            self.status.peers = {}
        else:
            self.status.peers = await self.peers()
        self.status.degraded = degraded_peers(self.status.peers, self.bgp_established())
        return self.status

    @property
    def reported_degraded(self) -> bool:
        """BFD has been down under an established BGP session past the report delay."""
        return self._reported

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval_s)
            status = await self.check_once()
            now = time.monotonic()
            if status.degraded:
                if self._degraded_since is None:
                    self._degraded_since = now
                late = now - self._degraded_since > self.report_after_s
                if late and not self._reported:
                    self._reported = True
                    log.warning("BFD down while BGP up: %s", status.degraded)
                    if self.on_degraded:
                        self.on_degraded(status.degraded)
            else:
                self._degraded_since = None
                self._reported = False
            stuck = self._degraded_since is not None and (
                now - self._degraded_since > self.repair_after_s
            )
            if not status.running or stuck:
                log.warning(
                    "bfdd %s; restarting it", "died" if not status.running else "sessions down"
                )
                await self._kill()
                self.status.restarts += 1
                await self._spawn()
                self._degraded_since = None
                self._reported = False

    async def _kill(self) -> None:
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 5)
        # `ip netns exec` execs bfdd, so the pid we hold is bfdd's; a stale pid file
        # would make the next bfdd refuse to start.
        with contextlib.suppress(FileNotFoundError):
            (self.workdir / "bfdd.pid").unlink()

    def kill_now(self) -> None:
        """Kill bfdd at once (tests: prove that the loss is seen and repaired)."""
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._kill()
        self.status.running = False


__all__ = [
    "BfdDaemon",
    "BfdStatus",
    "degraded_peers",
    "parse_bfd_peers",
    "render_bfdd_config",
]
