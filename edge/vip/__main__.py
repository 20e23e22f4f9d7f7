"""`python -m edge.vip --config node.yaml`: an agent with its active-passive group.

A standalone runner until the composition root builds the extension (the lead wires it):
the same agent as `anycast-edge run`, plus the `vip_group:` section. Exit 2 with one line
for a bad config (a VIP outside the interface's subnet, a missing or short key, a duplicate
node id, a priority out of range, ...), and then no VIP is claimed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from edge.config import ConfigError, NodeConfig, load_config


def _fail(message: str, code: int) -> int:
    print(f"anycast-edge vip: {message}", file=sys.stderr)
    return code


async def run(config: NodeConfig, path: Path) -> int:
    from edge.agent import Agent
    from edge.vip.address import check_vip_interface
    from edge.vip.extension import VipExtension, VipSetupError

    group = config.vip_group
    assert group is not None
    if problem := await check_vip_interface(group.interface, group.vip):
        return _fail(f"config error: {problem}", 2)  # before anything is started
    agent = Agent(config, path)
    vip = VipExtension(group, config.node.name, lambda: agent.state)
    try:
        await agent.start()
    except OSError as error:
        return _fail(str(error), 1)
    agent.status_extras[vip.name] = vip.status
    agent.degradations[vip.name] = vip.degraded_reason
    agent.before_stop_accepting = vip.before_stop_accepting
    try:
        await vip.start()
    except VipSetupError as error:
        await agent.stop()
        return _fail(f"config error: {error}", 2)
    except OSError as error:
        await vip.stop()
        await agent.stop()
        return _fail(str(error), 1)
    agent.install_signal_handlers()
    try:
        await agent.run_until_stopped()
    finally:
        await vip.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge.vip")
    parser.add_argument("--config", "-c", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as error:
        return _fail(f"config error: {error}", 2)
    if config.vip_group is None:
        return _fail("config error: vip_group: missing (this runner needs the section)", 2)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return asyncio.run(run(config, args.config))


if __name__ == "__main__":
    sys.exit(main())
