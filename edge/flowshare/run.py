"""`python -m edge.flowshare.run --config node.yaml`: the real agent with flow sharing.

The same composition as `edge.agent.run_agent` plus the extension, until the agent's
composition root takes extensions. The wiring it shows (and the root needs):
1. after `agent.start()`: `await ext.start()`, then `await ext.wait_peers_synced()`, so
   a joining node holds its peers' flows before it announces;
2. `agent.status_extras["flowshare"] = ext.status`;
3. the BGP bridge starts after that, and `agent.before_stop_accepting` awaits
   `ext.before_stop_accepting(reason)` before the BGP choreography (or accept_grace);
4. on the way out, `await ext.stop()` after the control-plane link and the announcer.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
from pathlib import Path

from edge.agent import Agent
from edge.config import ConfigError, NodeConfig, load_config
from edge.flowshare.extension import FlowShareExtension

log = logging.getLogger("edge.flowshare.run")


def wire_before_stop_accepting(agent: Agent, ext: FlowShareExtension) -> None:
    """Step 3: the planned-change step goes before the BGP one (or the accept grace)."""
    inner = agent.before_stop_accepting
    grace = agent.config.drain.accept_grace

    async def before_stop_accepting(reason: str) -> None:
        await ext.before_stop_accepting(reason)
        if inner is not None:
            await inner(reason)
        elif grace:
            await asyncio.sleep(grace)

    agent.before_stop_accepting = before_stop_accepting


async def run(config: NodeConfig, config_path: Path) -> int:
    agent = Agent(config, config_path)
    try:
        await agent.start()
    except OSError as error:
        log.error("%s", error)
        return 1
    agent.install_signal_handlers()
    ext = None
    if config.flowshare is not None:
        ext = FlowShareExtension(config, agent.flows)
        try:
            await ext.start()
        except OSError as error:
            log.error("%s", error)
            await agent.stop()
            return 1
        agent.status_extras[ext.name] = ext.status
        missing = await ext.wait_peers_synced()
        if missing:
            log.warning("flowshare: announcing without the flows of %s", ", ".join(missing))
    announcer = None
    if config.bgp is not None:
        from edge.announcer import BgpAnnouncer

        announcer = BgpAnnouncer(agent, config.bgp)
        await announcer.start()
    if ext is not None:
        wire_before_stop_accepting(agent, ext)
    link = None
    if config.control_plane is not None:
        from edge.control import ControlPlaneLink

        link = ControlPlaneLink(agent, config.control_plane, announcer)
        await link.start()
    gc.freeze()
    log.info("node %s serving with flow sharing %s", config.node.name, "on" if ext else "off")
    await agent.run_until_stopped()
    if link is not None:
        await link.stop()
    if announcer is not None:
        await announcer.stop()
    if ext is not None:
        await ext.stop()
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args()
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"anycast-edge: config error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    import uvloop

    raise SystemExit(uvloop.run(run(config, args.config)))


if __name__ == "__main__":
    main()
