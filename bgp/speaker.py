"""The node's BGP side in one object: policy + flap budget + ExaBGP driver + bfdd + watchdog.

`BgpSpeaker` is what the edge agent drives (node state in, announcements out); it is
also runnable on its own, for tests, the lab and debugging:

    python -m bgp.speaker --config node.yaml --workdir /run/ae [--netns NS]
                          [--serving full] [--bandwidth-mbps 1000] [--watchdog-s 1.0]

It then reads commands on stdin, one per line: `serving NAME`, `bandwidth MBPS`,
`stall SECONDS` (blocks the event loop on purpose: proves the watchdog),
`wait-sent`, `status`, and prints one JSON status line after each. A bad config prints
one line and exits 2 before anything is started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence, Set
from ipaddress import ip_address
from pathlib import Path
from typing import Any, Protocol

from bgp.bfd import BfdDaemon
from bgp.config import (
    BgpConfig,
    ConfigError,
    IPAddress,
    check_addresses_are_local,
    load_bgp_config,
    local_interface_addresses,
)
from bgp.drain import DrainReport, wait_quiet
from bgp.exabgp import ExaBgpDriver, LoopWatchdog
from bgp.flap import FlapDamper, classify_change
from bgp.observed import degraded_for_want_of_session
from bgp.policy import (
    Advertisement,
    PolicyInputs,
    PrefixGroup,
    Reason,
    Serving,
    advertisements,
    announced_mbps,
    group_decision,
)

# Bounds how long the drain choreography waits for ExaBGP to confirm an UPDATE was sent.
SEND_CONFIRM_S = 5.0


class DesiredSink(Protocol):
    """What the announcer needs of a driver: the current desired set and a way to set it."""

    @property
    def desired(self) -> frozenset[Advertisement]: ...

    def set_desired(self, advertisements: Set[Advertisement]) -> None: ...


class Announcer:
    """Turns (serving, link bandwidth) into the driver's desired set, through the flap
    budget: changes that take traffic away go at once, the others may be held down."""

    def __init__(
        self,
        config: BgpConfig,
        sink: DesiredSink,
        groups: Sequence[PrefixGroup] = (),
        med_penalty: int = 0,
    ) -> None:
        self.config = config
        self.sink = sink
        self.damper = FlapDamper(config.flap)
        self.inputs = PolicyInputs(
            Serving.NOT_READY,
            config,
            config.capacity_mbps,
            groups=tuple(groups),
            med_penalty=med_penalty,
        )
        self.reason = Reason.WITHDRAW_STARTING
        self.held_until = 0.0
        self.holddowns = 0  # changes the flap budget held back (a Prometheus counter)
        self._retry: asyncio.TimerHandle | None = None

    def update(
        self,
        *,
        serving: Serving | None = None,
        link_bandwidth_mbps: float | None = None,
        group_serving: Mapping[str, Serving] | None = None,
        group_link_bandwidth_mbps: Mapping[str, float] | None = None,
        med_penalty: int | None = None,
    ) -> Reason:
        given = (
            ("serving", serving),
            ("link_bandwidth_mbps", link_bandwidth_mbps),
            ("group_serving", None if group_serving is None else dict(group_serving)),
            (
                "group_link_bandwidth_mbps",
                None if group_link_bandwidth_mbps is None else dict(group_link_bandwidth_mbps),
            ),
            ("med_penalty", med_penalty),
        )
        changes: dict[str, Any] = {key: value for key, value in given if value is not None}
        self.inputs = dataclasses.replace(self.inputs, **changes)
        self._apply()
        return self.reason

    def _apply(self) -> None:
        desired, self.reason = advertisements(self.inputs)
        now = time.monotonic()
        wait = self.damper.admit(classify_change(self.sink.desired, desired), now)
        if self._retry:
            self._retry.cancel()
            self._retry = None
        if wait > 0:
            if not self.held_until:
                self.holddowns += 1
            self.held_until = now + wait
            self._retry = asyncio.get_running_loop().call_later(wait, self._apply)
            return
        self.held_until = 0.0
        self.sink.set_desired(desired)

    def set_groups(self, groups: Sequence[PrefixGroup]) -> None:
        """The groups announced from the next update on (a group no longer named is
        withdrawn then; a new one is announced once its serving is given)."""
        self.inputs = dataclasses.replace(self.inputs, groups=tuple(groups))

    def close(self) -> None:
        if self._retry:
            self._retry.cancel()


class BgpSpeaker:
    """One node's announcements, sessions and failure detection.

    `update()` takes what the node serves and the link bandwidth to announce;
    `wait_traffic_moved()` is the drain's wait; `status()` is for the agent's /status.
    """

    def __init__(
        self,
        config: BgpConfig,
        workdir: Path,
        *,
        netns: str | None = None,
        watchdog_s: float | None = None,
        groups: Sequence[PrefixGroup] = (),
        med_penalty: int = 0,
    ) -> None:
        """`groups`: the services' prefixes, each announced by its own serving (none:
        `config.prefixes`, by the node's alone)."""
        self.config = config
        self.driver = ExaBgpDriver(config, workdir, netns=netns)
        self.announcer = Announcer(config, self.driver, groups, med_penalty)
        self.bfd: BfdDaemon | None = None
        if config.bfd.enabled:
            self.bfd = BfdDaemon(config, workdir / "bfd", self.established, netns=netns)
        # `watchdog_s` overrides the config's loop_stall_deadline_s (0 disables).
        deadline_s = config.loop_stall_deadline_s if watchdog_s is None else watchdog_s
        self.watchdog = LoopWatchdog(deadline_s, self.driver.kill_now) if deadline_s else None
        self.last_drain: DrainReport | None = None
        # Since when the node has wanted to announce with no session carrying it.
        self._no_session_since: float | None = None

    def established(self) -> set[IPAddress]:
        return {peer for peer, s in self.driver.neighbors().items() if s.state == "up"}

    async def start(self) -> None:
        await self.driver.start()
        if self.bfd:
            await self.bfd.start()
        if self.watchdog:
            self.watchdog.start()

    async def stop(self, reason: str | None = None) -> None:
        """Withdraw (bounded), end the sessions with a Cease NOTIFICATION carrying
        `reason` (RFC 8203; by default whether a drain finished first), stop ExaBGP and
        bfdd."""
        if reason is None:
            reason = "anycast-edge agent stopping"
            if self.last_drain is not None:
                reason += f" after a drain ({self.last_drain.outcome})"
        self.announcer.close()
        if self.watchdog:
            self.watchdog.stop()
        if self.bfd:
            await self.bfd.stop()
        await self.driver.stop(reason=reason)

    def update(
        self,
        *,
        serving: Serving | None = None,
        link_bandwidth_mbps: float | None = None,
        group_serving: Mapping[str, Serving] | None = None,
        group_link_bandwidth_mbps: Mapping[str, float] | None = None,
        med_penalty: int | None = None,
    ) -> Reason:
        return self.announcer.update(
            serving=serving,
            link_bandwidth_mbps=link_bandwidth_mbps,
            group_serving=group_serving,
            group_link_bandwidth_mbps=group_link_bandwidth_mbps,
            med_penalty=med_penalty,
        )

    def set_groups(self, groups: Sequence[PrefixGroup]) -> None:
        """The services' prefixes from the next `update` on (a reload that starts or removes
        services)."""
        self.announcer.set_groups(groups)

    async def wait_sent(self, bound_s: float = SEND_CONFIRM_S) -> bool:
        """True once every established neighbor was sent the current desired set."""
        try:
            await asyncio.wait_for(self.driver.wait_sent(), bound_s)
        except TimeoutError:
            return False
        return True

    async def wait_traffic_moved(self, new_connections_total: Callable[[], int]) -> DrainReport:
        """With the draining announcement (GRACEFUL_SHUTDOWN + prepends) in force: wait until
        it was sent, then until the node's new-connection rate is quiet, bounded by the
        config's drain deadline. The caller then withdraws (by its drain phase) and finishes
        its open connections."""
        started = time.monotonic()
        await self.wait_sent()
        self.last_drain = await wait_quiet(
            new_connections_total,
            quiet_rate_per_s=self.config.drain_quiet_rate_per_s,
            quiet_window_s=self.config.drain_quiet_window_s,
            deadline_s=self.config.drain_deadline_s,
            started=started,
        )
        return self.last_drain

    def degraded_reason(self) -> str | None:
        """Why announcing is less safe than it should be, or None (for the node's state):
        it wants to announce and no session carries it (past a grace period), or BFD is
        down under an established session."""
        no_session = self.driver.no_session_reason()
        now = time.monotonic()
        if no_session is None:
            self._no_session_since = None
        elif self._no_session_since is None:
            self._no_session_since = now
        if degraded_for_want_of_session(no_session, self._no_session_since, now):
            return no_session
        if self.bfd is not None and self.bfd.reported_degraded:
            peers = ", ".join(str(p) for p in self.bfd.status.degraded)
            return f"BFD down while BGP up with {peers}: fast failover lost"
        return None

    def status(self) -> dict[str, Any]:
        inputs = self.announcer.inputs
        driver = self.driver.status()
        bfd_peers = {} if self.bfd is None else self.bfd.status.peers
        for peer, session in driver["sessions"].items():
            session["bfd"] = None if self.bfd is None else bfd_peers.get(ip_address(peer), "down")
        return {
            "reason": str(self.announcer.reason),
            "serving": str(inputs.serving),
            "link_bandwidth_mbps": inputs.link_bandwidth_mbps,
            "announced_mbps": announced_mbps(inputs),
            "groups": {
                name: {"serving": str(inputs.serving_of(group)), "reason": str(reason)}
                for group in inputs.effective_groups()
                for name, reason in [(group.name, group_decision(inputs, group)[1])]
            },
            "held_until_monotonic": self.announcer.held_until or None,
            "flap_holddowns": self.announcer.holddowns,
            "degraded_reason": self.degraded_reason(),
            **driver,
            "bfd": None
            if self.bfd is None
            else {
                "running": self.bfd.status.running,
                "restarts": self.bfd.status.restarts,
                "peers": {str(p): s for p, s in self.bfd.status.peers.items()},
                "degraded": [str(p) for p in self.bfd.status.degraded],
            },
            "watchdog_stalls": self.watchdog.stalls if self.watchdog else 0,
            "deadman": {
                "enabled": self.config.deadman.enabled,
                "timeout_ms": self.config.deadman.timeout_ms,
                "firings": self.driver.deadman_firings,
                "last": None
                if (fired := self.driver.last_deadman_firing) is None
                else {"silent_ms": fired.silent_ms, "at_monotonic": fired.at},
            },
            "last_drain": None
            if self.last_drain is None
            else {
                "outcome": str(self.last_drain.outcome),
                "waited_s": round(self.last_drain.waited_s, 3),
            },
        }


# -- the standalone command -----------------------------------------------------------------


async def _stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def run(args: argparse.Namespace, config: BgpConfig) -> int:
    speaker = BgpSpeaker(config, Path(args.workdir), netns=args.netns, watchdog_s=args.watchdog_s)
    await speaker.start()
    speaker.update(serving=Serving(args.serving), link_bandwidth_mbps=args.bandwidth_mbps)
    reader = await _stdin_reader()
    try:
        while line := (await reader.readline()).decode():
            match line.split():
                case ["serving", name]:
                    speaker.update(serving=Serving(name))
                case ["bandwidth", value]:
                    speaker.update(link_bandwidth_mbps=float(value))
                case ["stall", seconds]:
                    time.sleep(float(seconds))  # noqa: ASYNC251 - on purpose: blocks the loop
                case ["wait-sent"]:
                    await speaker.wait_sent(10)
                case _:
                    pass
            print(json.dumps(speaker.status()), flush=True)
    finally:
        await speaker.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bgp.speaker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--netns", default=None)
    parser.add_argument("--serving", default="not-ready", choices=[s.value for s in Serving])
    parser.add_argument("--bandwidth-mbps", type=float, default=None, help="default: capacity")
    parser.add_argument("--watchdog-s", type=float, default=None, help="0 disables")
    args = parser.parse_args(argv)
    try:
        config = load_bgp_config(Path(args.config), check_local=False)
        errors = check_addresses_are_local(config, local_interface_addresses(args.netns))
        if errors:
            raise ConfigError(errors[0])
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run(args, config))
    return 130


if __name__ == "__main__":
    sys.exit(main())
