"""edgectl: the operator CLI of the anycast edge fleet, a client of the GSLB API.

Only a client: it imports `contract.client` and `contract.schemas` and nothing else of ours. Every
failure is one line on stderr and an exit code from `edgectl.core.Exit`; `main()` is the
top-level handler, so no traceback ever reaches an operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn
from rich.text import Text

from contract.client import (
    ApiClient,
    ApiError,
    BudgetRefused,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    Unauthorized,
    Unavailable,
)
from contract.schemas import DesiredState, DrainKind, ServiceWeightsUpdate, WeightsUpdate
from edgectl import contexts, render
from edgectl.core import (
    EXIT_CODES_HELP,
    Change,
    CliError,
    Exit,
    Fleet,
    affected_nodes,
    build_fleet,
    build_nodes,
    build_service_rows,
    diff_states,
    parse_assignments,
    parse_endpoints,
    planned_changes,
    resolve_target,
    wait_progress,
)

T = TypeVar("T")

HELP = (
    "Operate the anycast edge fleet through the GSLB API. Endpoints: --api URL (repeatable, "
    "tried in order) or EDGECTL_API (comma-separated), else http://127.0.0.1:8080; token: "
    "--token or EDGECTL_TOKEN; else the current context (edgectl context list; `make lab` "
    "writes one). Read commands take --json for scripts."
)

app = typer.Typer(
    name="edgectl",
    help=HELP,
    epilog=EXIT_CODES_HELP,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
weights_app = typer.Typer(
    help="Operator weights: show them, or set several in one revision.",
    no_args_is_help=True,
    rich_markup_mode=None,
    epilog=EXIT_CODES_HELP,
)
app.add_typer(weights_app, name="weights")
context_app = typer.Typer(
    help="Named API contexts (URLs, token, CA): list them, or pick the current one.",
    no_args_is_help=True,
    rich_markup_mode=None,
    epilog=EXIT_CODES_HELP,
)
app.add_typer(context_app, name="context")

ApiOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--api", metavar="URL", help="API URL; repeat for failover. Default: EDGECTL_API."
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", metavar="TOKEN", help="Bearer token. Default: EDGECTL_TOKEN."),
]
CaOpt = Annotated[
    str | None,
    typer.Option(
        "--ca-file", metavar="FILE", help="CA file for an https API. Default: EDGECTL_CA_FILE."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine output (JSON, stable keys).")]

#: Tests set this to a path: after reading the state, edgectl writes the revision it read to
#: PATH.read and waits (at most a minute) for PATH.go, so a test can write in between.
PAUSE_ENV = "EDGECTL_TEST_PAUSE_BEFORE_WRITE"
DEFAULT_API = "http://127.0.0.1:8080"
ZERO_EVENT_ID = "0000000000000000.00"


@dataclass
class Connection:
    api: list[str]
    token: str | None
    ca_file: str | None


def _version(show: bool) -> None:
    if show:
        typer.echo(f"edgectl {package_version('anycast-edge')}")
        raise typer.Exit(0)


VersionOpt = Annotated[
    bool,
    typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_version),
]


@app.callback()
def root(
    ctx: typer.Context,
    api: ApiOpt = None,
    token: TokenOpt = None,
    ca_file: CaOpt = None,
    version: VersionOpt = False,
) -> None:
    ctx.obj = Connection(api or [], token, ca_file)


# --- plumbing -------------------------------------------------------------------------


def _fail(label: str, code: Exit, message: str) -> None:
    line = " ".join(message.split())
    typer.echo(f"edgectl: {label}: {line}", err=True)
    raise typer.Exit(int(code))


@contextlib.contextmanager
def reporting(label: str) -> Iterator[None]:
    """Turn every expected failure into one line on stderr and its exit code."""
    try:
        yield
    except CliError as e:
        _fail(label, e.code, e.message)
    except Conflict as e:
        _fail(
            label,
            Exit.CONFLICT,
            f"the state changed meanwhile (now revision {e.current.revision}); nothing written",
        )
    except BudgetRefused as e:
        _fail(label, Exit.CONFLICT, f"{e.detail}; nothing written (--force overrides)")
    except Unavailable as e:
        _fail(label, Exit.FAILURE, e.describe())
    except Unauthorized as e:
        _fail(
            label,
            Exit.FORBIDDEN,
            f"unauthorized: {e.detail} (see --token, EDGECTL_TOKEN, edgectl context list)",
        )
    except Forbidden as e:
        _fail(label, Exit.FORBIDDEN, f"forbidden: {e.detail}")
    except NotFound as e:
        _fail(label, Exit.NOT_FOUND, e.detail)
    except InvalidRequest as e:
        field = f" (field {e.field})" if e.field else ""
        _fail(label, Exit.USAGE, f"rejected by the API: {e.detail}{field}")
    except ApiError as e:
        _fail(label, Exit.FAILURE, f"API error {e.status}: {e.detail}")


def _connection(ctx: typer.Context, api: list[str] | None, token: str | None) -> Connection:
    """Flags first, then EDGECTL_* variables, then the current context, then the default."""
    base: Connection = ctx.obj if isinstance(ctx.obj, Connection) else Connection([], None, None)
    values = api or base.api
    if not values:
        values = [os.environ.get("EDGECTL_API", "")] if os.environ.get("EDGECTL_API") else []
    try:
        chosen = contexts.current()
    except contexts.ContextError as error:
        raise CliError(Exit.USAGE, str(error)) from None
    context = chosen[1] if chosen else None
    if not values and context is not None:
        values = context.api
    endpoints = parse_endpoints(values) or [DEFAULT_API]
    ca_file = base.ca_file or os.environ.get("EDGECTL_CA_FILE") or None
    if ca_file is None and context is not None:
        ca_file = context.ca_file
    if ca_file is not None and not Path(ca_file).is_file():
        raise CliError(Exit.USAGE, f"CA file {ca_file!r} does not exist")
    token = token or base.token or os.environ.get("EDGECTL_TOKEN") or None
    if token is None and context is not None:
        token = context.token
    return Connection(endpoints, token, ca_file)


def _run(
    ctx: typer.Context,
    api: list[str] | None,
    token: str | None,
    work: Callable[[ApiClient], Awaitable[T]],
) -> T:
    conn = _connection(ctx, api, token)

    async def go() -> T:
        verify: bool | str = conn.ca_file or True
        async with ApiClient(conn.api, conn.token, verify=verify) as client:
            return await work(client)

    return asyncio.run(go())


def _out() -> Console:
    return render.console()


def _pause_before_write(revision: int) -> None:
    path = os.environ.get(PAUSE_ENV)
    if not path:
        return
    Path(path + ".read").write_text(str(revision))
    deadline = time.monotonic() + 60
    while not Path(path + ".go").exists() and time.monotonic() < deadline:
        time.sleep(0.02)


async def _fleet(client: ApiClient) -> Fleet:
    state, observed, weights, convergence = await asyncio.gather(
        client.state(), client.observed(), client.effective_weights(), client.convergence()
    )
    return build_fleet(state, observed, weights, convergence)


# --- read commands --------------------------------------------------------------------


@app.command()
def status(
    ctx: typer.Context,
    service: Annotated[
        str | None,
        typer.Option("--service", metavar="NAME", help="One service: its state on each node."),
    ] = None,
    json: JsonOpt = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
) -> None:
    """Sites and nodes: state, liveness, weights, BGP sessions, applied revision, heartbeat.
    With --service NAME: that service's own state on every node that carries it."""
    if service is not None:

        async def work(client: ApiClient) -> list[Any]:
            state, observed = await asyncio.gather(client.state(), client.observed())
            return build_service_rows(state, observed, service)

        with reporting("status"):
            rows = _run(ctx, api, token, work)
            if json:
                render.print_json([r.as_json() for r in rows])
            else:
                _out().print(render.services_table(rows))
        return
    with reporting("status"):
        fleet = _run(ctx, api, token, _fleet)
        if json:
            render.print_json(fleet.as_json())
        else:
            _out().print(render.fleet_renderable(fleet))


@app.command()
def nodes(
    ctx: typer.Context, json: JsonOpt = False, api: ApiOpt = None, token: TokenOpt = None
) -> None:
    """Nodes: site, addresses, capacity, weights, reported state and liveness."""

    async def work(client: ApiClient) -> list[Any]:
        state, observed, weights = await asyncio.gather(
            client.state(), client.observed(), client.effective_weights()
        )
        return build_nodes(state, observed, weights)

    with reporting("nodes"):
        rows = _run(ctx, api, token, work)
        if json:
            render.print_json([r.as_json() for r in rows])
        else:
            _out().print(render.nodes_table(rows))


@app.command()
def events(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="How many.")] = 20,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Then print new ones.")] = False,
    count: Annotated[
        int | None, typer.Option("--count", min=1, help="With --follow: stop after N new.")
    ] = None,
    seconds: Annotated[
        float | None, typer.Option("--seconds", min=0, help="With --follow: stop after S s.")
    ] = None,
    json: JsonOpt = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
) -> None:
    """The last events (desired changes and observed transitions); --follow for new ones.
    With --json: a list, or with --follow one JSON object per line."""

    async def work(client: ApiClient) -> None:
        first = await client.events(limit=limit)
        if not follow:
            if json:
                render.print_json([render.event_json(e) for e in first])
            else:
                _out().print(render.events_table(first))
            return
        out = _out()

        def show(event: Any) -> None:
            if json:
                render.print_json_line(render.event_json(event))
            else:
                out.print(render.event_line(event))

        for event in first:
            show(event)
        after = first[-1].id if first else ZERO_EVENT_ID
        deadline = time.monotonic() + seconds if seconds is not None else None
        followed = 0
        while True:
            wait_s = 25.0
            if deadline is not None:
                wait_s = min(wait_s, deadline - time.monotonic())
                if wait_s <= 0:
                    return
            for event in await client.events(limit=100, after=after, wait_s=wait_s):
                show(event)
                after = event.id
                followed += 1
                if count is not None and followed >= count:
                    return

    with reporting("events"):
        if (count is not None or seconds is not None) and not follow:
            raise CliError(Exit.USAGE, "--count and --seconds go with --follow")
        _run(ctx, api, token, work)


@app.command()
def watch(
    ctx: typer.Context,
    count: Annotated[
        int | None, typer.Option("--count", min=1, help="Stop after N refreshes.")
    ] = None,
    seconds: Annotated[
        float | None, typer.Option("--seconds", min=0, help="Stop after S seconds.")
    ] = None,
    interval: Annotated[
        float, typer.Option("--interval", min=0.1, max=60, help="Refresh at least every S s.")
    ] = 2.0,
    json: JsonOpt = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
) -> None:
    """A live status table: refreshed at once on a new revision (long-poll), and at least
    every --interval for heartbeats. With --json: one status object per line."""

    async def work(client: ApiClient) -> None:
        deadline = time.monotonic() + seconds if seconds is not None else None
        out = _out()
        live_mode = not json and out.is_terminal
        live = Live(console=out, auto_refresh=False) if live_mode else None
        frames = 0
        fleet = await _fleet(client)  # the first read fails loudly (exit 1)
        with live if live is not None else contextlib.nullcontext():
            while True:
                frames += 1
                if json:
                    render.print_json_line(fleet.as_json())
                elif live is not None:
                    live.update(render.fleet_renderable(fleet), refresh=True)
                else:
                    out.print(render.fleet_renderable(fleet))
                    out.print()
                if count is not None and frames >= count:
                    return
                wait_s = interval
                if deadline is not None:
                    wait_s = min(wait_s, deadline - time.monotonic())
                    if wait_s <= 0:
                        return
                try:
                    await client.watch_state(fleet.revision, timeout_s=wait_s)
                    fleet = await _fleet(client)
                except Unavailable as e:
                    # Keep watching through an API outage: that is when it matters.
                    if live is not None:
                        note = Text(e.describe(), style="red")
                        live.update(note, refresh=True)
                    else:
                        print(f"edgectl: watch: {e.describe()}", file=sys.stderr)
                    await asyncio.sleep(wait_s)

    with reporting("watch"):
        _run(ctx, api, token, work)


@app.command()
def convergence(
    ctx: typer.Context, json: JsonOpt = False, api: ApiOpt = None, token: TokenOpt = None
) -> None:
    """Has every live node applied the latest desired revision?"""
    with reporting("convergence"):
        result = _run(ctx, api, token, lambda client: client.convergence())
        if json:
            render.print_json(render.convergence_json(result))
        else:
            _out().print(render.convergence_renderable(result))


# --- weights --------------------------------------------------------------------------


@weights_app.command("show")
def weights_show(
    ctx: typer.Context, json: JsonOpt = False, api: ApiOpt = None, token: TokenOpt = None
) -> None:
    """Operator and effective weights of every site and node."""

    async def work(client: ApiClient) -> tuple[Any, Any]:
        return await asyncio.gather(client.state(), client.effective_weights())

    with reporting("weights"):
        state, weights = _run(ctx, api, token, work)
        if json:
            render.print_json(render.weights_json(state, weights))
        else:
            _out().print(render.weights_renderable(state, weights))


def _show_conflict(json: bool, base: DesiredState, current: DesiredState) -> list[Change]:
    moved = diff_states(base, current)
    if json:
        render.print_json(
            {
                "conflict": True,
                "read_revision": base.revision,
                "current_revision": current.revision,
                "changed": [c.as_json() for c in moved],
            }
        )
    else:
        title = f"changed by someone else since revision {base.revision} (now {current.revision})"
        _out().print(render.changes_table(title, moved))
    return moved


def _confirm(question: str, json: bool) -> bool:
    """Ask on stdout (on stderr with --json, so stdout stays JSON); no answer means no."""
    try:
        return bool(typer.confirm(question, default=False, err=json))
    except typer.Abort:  # no answer (stdin closed): no
        return False


@weights_app.command("set")
def weights_set(
    ctx: typer.Context,
    sites: Annotated[
        list[str] | None,
        typer.Argument(metavar="SITE=WEIGHT", help="Site weights.", show_default=False),
    ] = None,
    node: Annotated[
        list[str] | None, typer.Option("--node", metavar="NODE=WEIGHT", help="Repeatable.")
    ] = None,
    service: Annotated[
        str | None,
        typer.Option(
            "--service",
            metavar="NAME",
            help="Set these weights for this service only (its other services keep theirs).",
        ),
    ] = None,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Never ask: on a conflict exit 3 instead.")
    ] = False,
    json: JsonOpt = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
) -> None:
    """Set operator weights in one revision, e.g. `weights set site-a=3 site-b=1 --node a1=2`;
    with --service NAME, that service's own weights. Written with If-Match: if the state
    changed since it was read, shows what changed and asks whether to apply on top of it
    (with --yes: exit 3, nothing written)."""

    def as_update(changes: list[Change]) -> WeightsUpdate:
        sites = {c.name: int(str(c.after)) for c in changes if c.kind == "site"}
        nodes = {c.name: int(str(c.after)) for c in changes if c.kind == "node"}
        if service is None:
            return WeightsUpdate(sites=sites, nodes=nodes)
        own = ServiceWeightsUpdate(sites=dict(sites), nodes=dict(nodes))
        return WeightsUpdate(services={service: own})

    async def work(client: ApiClient) -> None:
        base = await client.state()
        changes = planned_changes(base, site_weights, node_weights, service)
        if changes:
            _pause_before_write(base.revision)
        for _ in range(5):
            if not changes:
                break
            update = as_update(changes)
            try:
                new = await client.set_weights(update, revision=base.revision)
            except Conflict as conflict:
                moved = _show_conflict(json, base, conflict.current)
                summary = "; ".join(c.describe() for c in moved) or "no weight or drain changed"
                where = f"revision {base.revision} -> {conflict.current.revision}"
                if yes:
                    raise CliError(
                        Exit.CONFLICT,
                        f"the state changed meanwhile ({where}: {summary}); nothing written",
                    ) from None
                if not _confirm(
                    f"Apply your weights on top of revision {conflict.current.revision}?", json
                ):
                    raise CliError(
                        Exit.CONFLICT, f"the state changed meanwhile ({where}); nothing written"
                    ) from None
                base = conflict.current
                changes = planned_changes(base, site_weights, node_weights, service)
                continue
            if json:
                render.print_json(
                    {
                        "revision": new.revision,
                        "previous_revision": base.revision,
                        "service": service,
                        "changed": [c.as_json() for c in changes],
                    }
                )
            else:
                title = f"revision {base.revision} -> {new.revision}"
                if service is not None:
                    title += f", service {service}"
                _out().print(render.changes_table(title, changes))
            return
        else:
            raise CliError(Exit.CONFLICT, "the state kept changing: gave up after 5 attempts")
        if json:
            render.print_json(
                {"revision": base.revision, "previous_revision": base.revision, "changed": []}
            )
        else:
            _out().print(f"nothing to change (revision {base.revision})")

    with reporting("weights"):
        site_weights = parse_assignments(sites or [], "site")
        node_weights = parse_assignments(node or [], "node")
        if not site_weights and not node_weights:
            raise CliError(Exit.USAGE, "nothing to set: give SITE=WEIGHT and/or --node NODE=WEIGHT")
        _run(ctx, api, token, work)


# --- drains ---------------------------------------------------------------------------

KindOpt = Annotated[
    DrainKind | None,
    typer.Option("--kind", help="Only needed when a node and a site share the name."),
]
WaitOpt = Annotated[
    bool,
    typer.Option("--wait", help="Wait until the fleet applied it and the node(s) report it."),
]
TimeoutOpt = Annotated[
    float, typer.Option("--timeout", min=0, help="With --wait: give up (exit 6) after S s.")
]


ServiceOpt = Annotated[
    str | None,
    typer.Option(
        "--service",
        metavar="NAME",
        help="Only this service on the node or site (its other services keep serving); "
        "--wait then waits until the fleet applied it.",
    ),
]


def _drain_entry(
    state: DesiredState, kind: DrainKind, name: str, service: str | None = None
) -> str | None:
    for d in state.drains:
        if d.kind is kind and d.name == name and d.service == service:
            return f"{d.reason} ({d.author})"
    return None


def _require_service(state: DesiredState, service: str | None) -> None:
    if service is not None and service not in state.services:
        raise CliError(Exit.NOT_FOUND, f"no service named {service!r}")


async def _wait(
    client: ApiClient,
    revision: int,
    targets: list[str],
    *,
    draining: bool,
    limit_s: float,
) -> None:
    deadline = time.monotonic() + limit_s
    err = render.console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[note]}"),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
    goal = "draining or down" if draining else "back in service"
    task = progress.add_task(f"revision {revision}", total=None, note="")
    last_problem = ""
    with progress:
        while True:
            try:
                state, observed = await asyncio.gather(client.state(), client.observed())
            except Unavailable as e:
                last_problem = e.describe()
            else:
                p = wait_progress(revision, state, observed, targets, draining=draining)
                note = (
                    f"{p.applied}/{p.alive} live nodes applied, {p.targets_done}/{p.targets} {goal}"
                )
                progress.update(
                    task,
                    total=p.alive + p.targets,
                    completed=p.applied + p.targets_done,
                    note=note,
                )
                if p.done:
                    return
                last_problem = "; ".join(p.pending)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CliError(
                    Exit.TIMEOUT,
                    f"timed out after {limit_s:g}s waiting for revision {revision}: {last_problem}",
                )
            await asyncio.sleep(min(0.2, remaining))


async def _drain_write(
    client: ApiClient,
    target: str,
    kind: DrainKind | None,
    write: Callable[[DrainKind, DesiredState], Awaitable[DesiredState]],
    check: Callable[[DesiredState, DrainKind], None],
    service: str | None = None,
) -> tuple[DrainKind, DesiredState]:
    """Read, check, write with If-Match. A conflict caused by someone else's change to this
    very drain is reported (exit 3); any other concurrent change is not ours to overwrite
    (the API applies the drain on top of it), so the write is retried on the new revision."""
    state = await client.state()
    resolved = resolve_target(state, target, kind)
    check(state, resolved)
    _pause_before_write(state.revision)
    for _ in range(5):
        try:
            return resolved, await write(resolved, state)
        except Conflict as conflict:
            before = _drain_entry(state, resolved, target, service)
            now = _drain_entry(conflict.current, resolved, target, service)
            if before != now:
                what = f"drained: {now}" if now else "not drained"
                raise CliError(
                    Exit.CONFLICT,
                    f"{resolved} {target} was changed meanwhile (revision {state.revision} -> "
                    f"{conflict.current.revision}; now {what}); nothing written",
                ) from None
            state = conflict.current
            resolved = resolve_target(state, target, kind)
            check(state, resolved)
    raise CliError(Exit.CONFLICT, "the state kept changing: gave up after 5 attempts")


@app.command()
def drain(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(metavar="NODE|SITE")],
    reason: Annotated[str, typer.Option("--reason", help="Why (shown in status and events).")],
    kind: KindOpt = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Drain even if the disruption budget refuses it; recorded as an override "
            "event with --reason and your name.",
        ),
    ] = False,
    service: ServiceOpt = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 120.0,
    json: JsonOpt = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
) -> None:
    """Take a node or a whole site out of traffic (announce GSHUT, then withdraw), or with
    --service only that service's prefixes (GSHUT). Refused (exit 3, one line) when it
    would break the disruption budget, unless --force."""

    async def work(client: ApiClient) -> None:
        def check(state: DesiredState, __: DrainKind) -> None:
            _require_service(state, service)

        async def write(k: DrainKind, state: DesiredState) -> DesiredState:
            override = reason if force else None
            return await client.drain(
                k, target, reason, revision=state.revision, override=override, service=service
            )

        k, new = await _drain_write(client, target, kind, write, check, service)
        targets = affected_nodes(new, k, target)
        if wait:
            # A service drain leaves the nodes' own state alone: wait for the fleet only.
            waited = [] if service else targets
            await _wait(client, new.revision, waited, draining=True, limit_s=timeout)
        _report(json, "drained", k, target, new.revision, targets, wait, service)

    with reporting("drain"):
        if not reason.strip() or len(reason) > 500:
            raise CliError(Exit.USAGE, "--reason must be 1-500 characters")
        _run(ctx, api, token, work)


@app.command()
def undrain(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(metavar="NODE|SITE")],
    kind: KindOpt = None,
    service: ServiceOpt = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 120.0,
    json: JsonOpt = False,
    api: ApiOpt = None,
    token: TokenOpt = None,
) -> None:
    """Put a drained node or site back into traffic (with --service: end that service's
    drain of it; each drain is ended by its own undrain)."""

    async def work(client: ApiClient) -> None:
        def check(state: DesiredState, k: DrainKind) -> None:
            _require_service(state, service)
            if _drain_entry(state, k, target, service) is not None:
                return
            if service is not None:
                raise CliError(Exit.NOT_FOUND, f"service {service} is not drained on {k} {target}")
            site = state.nodes[target].site if k is DrainKind.NODE else ""
            if site and _drain_entry(state, DrainKind.SITE, site) is not None:
                raise CliError(
                    Exit.NOT_FOUND,
                    f"node {target} is not drained itself, its site is: undrain {site}",
                )
            raise CliError(Exit.NOT_FOUND, f"{k} {target} is not drained")

        async def write(k: DrainKind, state: DesiredState) -> DesiredState:
            return await client.undrain(k, target, revision=state.revision, service=service)

        k, new = await _drain_write(client, target, kind, write, check, service)
        targets = affected_nodes(new, k, target)
        if wait:
            waited = [] if service else targets
            await _wait(client, new.revision, waited, draining=False, limit_s=timeout)
        _report(json, "undrained", k, target, new.revision, targets, wait, service)

    with reporting("undrain"):
        _run(ctx, api, token, work)


def _report(
    json: bool,
    verb: str,
    kind: DrainKind,
    name: str,
    revision: int,
    nodes: list[str],
    waited: bool,
    service: str | None = None,
) -> None:
    if json:
        render.print_json(
            {
                "kind": str(kind),
                "name": name,
                "service": service,
                verb: True,
                "revision": revision,
                "nodes": nodes,
                "waited": waited,
            }
        )
        return
    done = ", fleet converged" if waited else ""
    what = f"service {service} on {kind} {name}" if service else f"{kind} {name}"
    _out().print(
        Text(f"{what} {verb} at revision {revision}{done} (nodes: {', '.join(nodes) or '-'})")
    )


# --- contexts -------------------------------------------------------------------------


@context_app.command("list")
def context_list(json: JsonOpt = False) -> None:
    """The contexts in the config file; * marks the current one (tokens are never shown)."""
    with reporting("context list"):
        try:
            config = contexts.load()
        except contexts.ContextError as error:
            raise CliError(Exit.USAGE, str(error)) from None
        rows: list[dict[str, object]] = [
            {"name": name, "current": name == config.current, "api": c.api}
            for name, c in sorted(config.contexts.items())
        ]
        if json:
            render.print_json({"file": str(contexts.config_path()), "contexts": rows})
            return
        if not rows:
            typer.echo(f"no contexts in {contexts.config_path()}")
            return
        for name, c in sorted(config.contexts.items()):
            mark = "*" if name == config.current else " "
            typer.echo(f"{mark} {name:<16} {', '.join(c.api)}")


@context_app.command("use")
def context_use(name: Annotated[str, typer.Argument(metavar="NAME")]) -> None:
    """Make NAME the current context."""
    with reporting("context use"):
        try:
            path = contexts.use(name)
        except contexts.ContextError as error:
            raise CliError(Exit.USAGE, str(error)) from None
        typer.echo(f"current context: {name} ({path})")


# --- the lab --------------------------------------------------------------------------


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def lab(ctx: typer.Context) -> None:
    """The docker lab: up | down | status | chaos ... (runs `python -m deploy.lab` from the
    repository checkout, or from EDGECTL_LAB_ROOT)."""
    root = Path(os.environ.get("EDGECTL_LAB_ROOT") or Path(__file__).resolve().parents[1])
    module = root / "deploy" / "lab"
    if not ((module / "__main__.py").is_file() or module.with_suffix(".py").is_file()):
        _fail(
            "lab",
            Exit.USAGE,
            f"no lab here: {root} has no deploy/lab module (run edgectl from an anycast-edge "
            "checkout, or set EDGECTL_LAB_ROOT to one)",
        )
    # exec, not import: edgectl stays a client, the lab's code is not ours to load.
    os.chdir(root)
    os.execv(sys.executable, [sys.executable, "-m", "deploy.lab", *ctx.args])


# --- entry point ----------------------------------------------------------------------


def _click_error(e: Any) -> int:
    ctx = getattr(e, "ctx", None)
    if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:
        typer.echo(ctx.get_help())
        return int(Exit.USAGE)
    message = " ".join(str(e.format_message()).split())
    if e.exit_code == Exit.USAGE:
        path = str(ctx.command_path) if ctx is not None else ""
        label = path.removeprefix("edgectl").strip() or "usage"
        typer.echo(f"edgectl: {label}: {message} (see --help)", err=True)
        return int(Exit.USAGE)
    typer.echo(f"edgectl: {message}", err=True)
    return int(e.exit_code)


def main(argv: list[str] | None = None) -> None:
    command = typer.main.get_command(app)
    code: int
    try:
        result = command.main(args=argv, prog_name="edgectl", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except typer.Abort:
        typer.echo("edgectl: aborted", err=True)
        code = 130
    except KeyboardInterrupt:
        typer.echo("edgectl: interrupted", err=True)
        code = 130
    except Exception as e:
        # Click's exceptions (typer vendors click in recent versions, so they are recognised
        # by shape): usage errors exit 2 with one line naming the command.
        if callable(getattr(e, "format_message", None)) and isinstance(
            getattr(e, "exit_code", None), int
        ):
            code = _click_error(e)
        else:  # the last resort: still one line, never a traceback
            typer.echo(f"edgectl: internal error: {type(e).__name__}: {e}", err=True)
            code = Exit.FAILURE
    sys.stdout.flush()
    sys.exit(int(code))
