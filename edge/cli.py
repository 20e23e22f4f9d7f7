"""`anycast-edge`: run the node agent, check a config, or serve the GSLB API."""

from __future__ import annotations

import asyncio
import os
import sys
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated

import typer

from contract import logs
from contract.logs import LogFormat
from edge.config import ConfigError, NodeConfig, load_config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="anycast-edge: the edge node agent of a BGP anycast fleet.",
)


def _version(show: bool) -> None:
    if show:
        typer.echo(f"anycast-edge {package_version('anycast-edge')}")
        raise typer.Exit(0)


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit.", is_eager=True, callback=_version
        ),
    ] = False,
) -> None:
    """anycast-edge: the edge node agent of a BGP anycast fleet."""


ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="node.yaml", dir_okay=False, show_default=False)
]


def _fail(message: str, code: int) -> None:
    typer.echo(f"anycast-edge: {message}", err=True)
    raise typer.Exit(code)


def _host_problem(node: NodeConfig) -> str | None:
    """What the config asks of this host that it cannot give (checked before anything starts:
    a config refused here has claimed and announced nothing)."""
    if node.vip_group is not None and node.vip_group.announce == "arp":
        from edge.vip.address import check_vip_interface

        group = node.vip_group
        problem = asyncio.run(check_vip_interface(group.interface, group.vip))
        if problem:
            return f"vip_group.vip: {problem}"
    return None


def _load(config: Path) -> NodeConfig:
    try:
        node = load_config(config)
    except ConfigError as error:
        _fail(f"config error: {error}", 2)
        raise  # unreachable: _fail exits
    if problem := _host_problem(node):
        _fail(f"config error: {problem}", 2)
    return node


LogFormatOption = Annotated[
    LogFormat | None,
    typer.Option(
        "--log-format",
        help="text (the default) or json: one object per line; overrides log_format in the config",
        show_default=False,
    ),
]


@app.command()
def run(config: ConfigOption, log_format: LogFormatOption = None) -> None:
    """Run the edge node agent."""
    node = _load(config)
    static = {"component": "agent", "node": node.node.name, "site": node.node.site}
    logs.configure(node.log_level.upper(), log_format or node.log_format, static)
    import uvloop

    from edge.agent import run_agent

    code = uvloop.run(run_agent(node, config))
    raise typer.Exit(code)


@app.command("check-config")
def check_config(config: ConfigOption) -> None:
    """Validate node.yaml (and what it asks of this host) and exit: 0 when valid, 2 with
    the problem otherwise."""
    node = _load(config)
    from edge.agent import sigterm_stop_bound_s

    typer.echo(
        f"{config}: valid (node {node.node.name}, site {node.node.site}); a SIGTERM drain "
        f"takes at most {sigterm_stop_bound_s(node):.0f} s (keep the service manager's stop "
        "timeout, systemd's TimeoutStopSec, above it)"
    )


WitnessOption = Annotated[
    Path, typer.Option("--config", "-c", help="witness.yaml", dir_okay=False, show_default=False)
]


@app.command()
def witness(config: WitnessOption, log_format: LogFormatOption = None) -> None:
    """Run a witness of an active-passive group: it only votes (never owns the VIP)."""
    import yaml

    from edge.config import parse_witness_config

    try:
        data = yaml.safe_load(config.read_text())
    except OSError as error:
        _fail(f"config error: {config}: cannot read: {error.strerror}", 2)
    except yaml.YAMLError:
        _fail(f"config error: {config}: not valid YAML", 2)
    try:
        witness_config = parse_witness_config(data)
    except ConfigError as error:
        _fail(f"config error: {error}", 2)
        raise  # unreachable: _fail exits
    static = {"component": "witness", "node": witness_config.node_id}
    logs.configure(witness_config.log_level.upper(), log_format or "text", static)
    from edge.vip.witness import run_witness

    raise typer.Exit(asyncio.run(run_witness(witness_config)))


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def api(ctx: typer.Context) -> None:
    """Serve the GSLB control plane (same arguments as `python -m api`)."""
    # exec, not import: the agent's package never imports the API's internals.
    os.execv(sys.executable, [sys.executable, "-m", "api", *ctx.args])


def main() -> None:
    app()


if __name__ == "__main__":
    main()
