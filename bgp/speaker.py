"""A standalone BGP speaker: policy + flap budget + ExaBGP driver + bfdd + loop watchdog.

What the edge agent wires, runnable on its own (tests, the lab, debugging):

    python -m bgp.speaker --config node.yaml --workdir /run/ae [--netns NS]
                          [--condition healthy] [--weight 1.0] [--watchdog-s 1.0]

It reads commands on stdin, one per line: `condition NAME`, `weight W`, `drain on|off`,
`stall SECONDS` (blocks the event loop on purpose: proves the watchdog), `status`.
It prints one JSON status line after each command. A bad config prints one line and
exits 2 before anything is started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bgp.bfd import BfdDaemon
from bgp.config import (
    BgpConfig,
    ConfigError,
    check_addresses_are_local,
    load_bgp_config,
    local_interface_addresses,
)
from bgp.exabgp import ExaBgpDriver, LoopWatchdog
from bgp.flap import FlapDamper, classify_change
from bgp.policy import NodeCondition, PolicyInputs, Reason, advertisements


class Announcer:
    """Turns (condition, weight, drain) into the driver's desired set, through the flap
    budget. The edge agent's bridge does the same from its state machine."""

    def __init__(self, config: BgpConfig, driver: ExaBgpDriver) -> None:
        self.config = config
        self.driver = driver
        self.damper = FlapDamper(config.flap)
        self.inputs = PolicyInputs(condition=NodeCondition.STARTING, config=config)
        self.reason = Reason.WITHDRAW_STARTING
        self.held_until = 0.0
        self._retry: asyncio.TimerHandle | None = None

    def update(self, **changes: Any) -> Reason:
        self.inputs = dataclasses.replace(self.inputs, **changes)
        self._apply()
        return self.reason

    def _apply(self) -> None:
        desired, self.reason = advertisements(self.inputs)
        now = time.monotonic()
        wait = self.damper.admit(classify_change(self.driver.desired, desired), now)
        if self._retry:
            self._retry.cancel()
            self._retry = None
        if wait > 0:
            self.held_until = now + wait
            self._retry = asyncio.get_running_loop().call_later(wait, self._apply)
            return
        self.held_until = 0.0
        self.driver.set_desired(desired)


async def _read_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def run(args: argparse.Namespace, config: BgpConfig) -> int:
    workdir = Path(args.workdir)
    driver = ExaBgpDriver(config, workdir, netns=args.netns)
    announcer = Announcer(config, driver)
    bfd: BfdDaemon | None = None
    watchdog = LoopWatchdog(args.watchdog_s, driver.kill_now) if args.watchdog_s > 0 else None
    await driver.start()
    if config.bfd.enabled:
        bfd = BfdDaemon(
            config,
            workdir / "bfd",
            lambda: {p for p, s in driver.neighbors().items() if s.state == "up"},
            netns=args.netns,
        )
        await bfd.start()
    if watchdog:
        watchdog.start()
    announcer.update(condition=NodeCondition(args.condition), weight=args.weight)

    def status() -> dict[str, Any]:
        return {
            "reason": str(announcer.reason),
            "held_until": announcer.held_until,
            "bgp": driver.status(),
            "bfd": None
            if bfd is None
            else {
                "running": bfd.status.running,
                "restarts": bfd.status.restarts,
                "degraded": [str(p) for p in bfd.status.degraded],
            },
            "watchdog_stalls": watchdog.stalls if watchdog else 0,
        }

    reader = await _read_lines()
    try:
        while line := (await reader.readline()).decode():
            words = line.split()
            if not words:
                continue
            match words:
                case ["condition", name]:
                    announcer.update(condition=NodeCondition(name))
                case ["weight", value]:
                    announcer.update(weight=float(value))
                case ["drain", flag]:
                    announcer.update(operator_drain=flag == "on")
                case ["stall", seconds]:
                    time.sleep(float(seconds))  # noqa: ASYNC251 - on purpose: blocks the loop
                case ["wait-sent"]:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(driver.wait_sent(), 10)
                case _:
                    pass
            print(json.dumps(status()), flush=True)
    finally:
        if watchdog:
            watchdog.stop()
        if bfd:
            await bfd.stop()
        await driver.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bgp.speaker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--netns", default=None)
    parser.add_argument("--condition", default="starting", choices=[c.value for c in NodeCondition])
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--watchdog-s", type=float, default=1.0)
    args = parser.parse_args(argv)
    try:
        config = load_bgp_config(Path(args.config), check_local=False)
        errors = check_addresses_are_local(config, local_interface_addresses(args.netns))
        if errors:
            raise ConfigError(errors[0])
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(run(args, config))


if __name__ == "__main__":
    sys.exit(main())
