"""Human output: rich tables built from the pure fleet view. Every free-text cell is a
`Text`, so reasons and causes are shown as written, never read as rich markup."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from contract.schemas import Convergence, DesiredState, EffectiveWeights, Event
from edgectl.core import Change, Fleet, NodeRow, ServiceRow


def console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # Not a terminal (a pipe, a test): wide enough that names never wrap.
    width = None if stream.isatty() else 200
    return Console(file=stream, width=width, highlight=False, soft_wrap=False)


def print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def print_json_line(data: object) -> None:
    sys.stdout.write(json.dumps(data, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _t(value: object) -> Text:
    return Text("-" if value is None or value == "" else str(value))


def age(moment: datetime | None, now: datetime | None = None) -> str:
    if moment is None:
        return "never"
    seconds = ((now or datetime.now(UTC)) - moment).total_seconds()
    if seconds < 1:
        return "just now"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.0f}h ago"


def sessions(row: NodeRow) -> str:
    if not row.bgp_sessions:
        return "-"
    up = sum(1 for s in row.bgp_sessions if s["state"].lower() in ("up", "established"))
    return f"{up}/{len(row.bgp_sessions)} up"


def applied(row: NodeRow, revision: int) -> Text:
    if row.applied_revision is None:
        return Text("-")
    if row.applied_revision >= revision:
        return Text(f"{row.applied_revision} ok", style="green")
    return Text(f"{row.applied_revision} behind", style="yellow")


_STATE_STYLE = {
    "healthy": "green",
    "degraded": "yellow",
    "draining": "yellow",
    "down": "red",
    "alive": "green",
    "dead": "red",
}


def _styled(value: str) -> Text:
    return Text(value, style=_STATE_STYLE.get(value, ""))


def fleet_renderable(fleet: Fleet) -> RenderableType:
    head = Text(f"revision {fleet.revision}  ")
    if fleet.converged:
        head.append("converged", style="green")
    else:
        head.append("converging, behind: " + ", ".join(fleet.behind), style="yellow")
    if fleet.silent:
        head.append("  not reporting: " + ", ".join(fleet.silent), style="red")
    sites = Table(title="sites", title_justify="left")
    for column in ("site", "weight", "effective", "capacity Mbit/s", "nodes", "drained"):
        sites.add_column(column)
    for s in fleet.sites:
        sites.add_row(
            _t(s.name),
            _t(s.weight),
            _t(f"{s.effective_weight:g}"),
            _t(s.capacity_mbps),
            _t(len(s.nodes)),
            _t(s.drain_reason),
        )
    nodes = Table(title="nodes", title_justify="left")
    columns = ("node", "site", "state", "liveness", "weight", "effective", "bgp", "applied")
    for column in (*columns, "last heartbeat", "drained"):
        nodes.add_column(column)
    for n in fleet.nodes:
        nodes.add_row(
            _t(n.name),
            _t(n.site),
            _styled(n.state),
            _styled(n.liveness),
            _t(n.weight),
            _t(f"{n.effective_weight:g}"),
            _t(sessions(n)),
            applied(n, fleet.revision),
            _t(age(n.last_seen)),
            _t(n.drain_reason),
        )
    if not fleet.groups:
        return Group(head, sites, nodes)
    return Group(head, sites, nodes, groups_table(fleet))


def groups_table(fleet: Fleet) -> Table:
    """Active-passive groups: who owns each VIP, under which term and fencing token."""
    table = Table(title="active-passive groups", title_justify="left")
    for column in ("group", "vip", "node", "role", "liveness", "term", "token", "last change"):
        table.add_column(column)
    for g in fleet.groups:
        split = len(g.active) > 1
        for m in g.members:
            role = Text(m.role, style="red" if split else _ROLE_STYLE.get(m.role, ""))
            change = m.last_transition
            if m.last_transition_at:
                change += f", {age(m.last_transition_at)}"
            table.add_row(
                _t(g.name),
                _t(g.vip),
                _t(m.node),
                role,
                _styled(m.liveness),
                _t(m.term),
                _t("-" if m.fencing_token is None else m.fencing_token),
                _t(change),
            )
    return table


_ROLE_STYLE = {"active": "green", "standby": ""}


def nodes_table(rows: Sequence[NodeRow]) -> Table:
    table = Table()
    columns = ("node", "site", "addresses", "capacity Mbit/s", "weight", "effective", "state")
    for column in (*columns, "liveness", "connections", "backends", "drained"):
        table.add_column(column)
    for n in rows:
        backends = f"{n.backends_healthy}/{n.backends_total}" if n.backends_total else "-"
        table.add_row(
            _t(n.name),
            _t(n.site),
            _t(", ".join(n.addresses)),
            _t(n.capacity_mbps),
            _t(n.weight),
            _t(f"{n.effective_weight:g}"),
            _styled(n.state),
            _styled(n.liveness),
            _t(n.connections),
            _t(backends),
            _t(n.drain_reason),
        )
    return table


def services_table(rows: Sequence[ServiceRow]) -> Table:
    table = Table()
    columns = ("node", "site", "liveness", "node state", "service state", "prefixes")
    for column in (*columns, "backends", "cause"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            _t(r.node),
            _t(r.site),
            _styled(r.liveness),
            _styled(r.node_state),
            _styled(r.state),
            _t(", ".join(r.prefixes)),
            _t(f"{r.backends_healthy}/{r.backends_total}"),
            _t(r.cause),
        )
    return table


def events_table(events: Sequence[Event]) -> Table:
    table = Table()
    for column in ("time (UTC)", "kind", "subject", "cause", "author", "revision"):
        table.add_column(column)
    for e in events:
        table.add_row(*event_cells(e))
    return table


def event_cells(e: Event) -> list[Text]:
    when = e.time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return [
        _t(when),
        _t(e.kind),
        _t(e.subject),
        _t(e.cause),
        _t(e.author),
        _t(e.revision or None),
    ]


def event_line(e: Event) -> Text:
    return Text("  ".join(str(c) for c in event_cells(e)))


def event_json(e: Event) -> dict[str, object]:
    return e.model_dump(mode="json")


def weights_json(state: DesiredState, weights: EffectiveWeights) -> dict[str, object]:
    return {
        "revision": state.revision,
        "sites": {
            n: {"weight": s.weight, "effective_weight": weights.sites.get(n, 0.0)}
            for n, s in sorted(state.sites.items())
        },
        "nodes": {
            n: {"site": s.site, "weight": s.weight, "effective_weight": weights.nodes.get(n, 0.0)}
            for n, s in sorted(state.nodes.items())
        },
        "services": {
            service: {
                "sites": {
                    n: {
                        "weight": _service_weight(state, service, "site", n),
                        "effective_weight": shares.sites.get(n, 0.0),
                    }
                    for n in sorted(state.sites)
                },
                "nodes": {
                    n: {
                        "weight": _service_weight(state, service, "node", n),
                        "effective_weight": shares.nodes.get(n, 0.0),
                    }
                    for n in sorted(state.nodes)
                },
            }
            for service, shares in sorted(weights.services.items())
        },
    }


def _service_weight(state: DesiredState, service: str, kind: str, name: str) -> int:
    """A site's (or node's) weight for one service: its own for the service, else its own."""
    own = state.service_weights.get(service)
    if kind == "site":
        fallback = state.sites[name].weight
        return own.sites.get(name, fallback) if own else fallback
    fallback = state.nodes[name].weight
    return own.nodes.get(name, fallback) if own else fallback


def weights_renderable(state: DesiredState, weights: EffectiveWeights) -> RenderableType:
    sites = Table(title="sites", title_justify="left")
    for column in ("site", "weight", "effective"):
        sites.add_column(column)
    for n, s in sorted(state.sites.items()):
        sites.add_row(_t(n), _t(s.weight), _t(f"{weights.sites.get(n, 0.0):g}"))
    nodes = Table(title="nodes", title_justify="left")
    for column in ("node", "site", "weight", "effective"):
        nodes.add_column(column)
    for n, spec in sorted(state.nodes.items()):
        nodes.add_row(_t(n), _t(spec.site), _t(spec.weight), _t(f"{weights.nodes.get(n, 0.0):g}"))
    per_service = Table(title="per service", title_justify="left")
    for column in ("service", "node", "weight", "effective"):
        per_service.add_column(column)
    for service, shares in sorted(weights.services.items()):
        for n in sorted(state.nodes):
            weight = _service_weight(state, service, "node", n)
            per_service.add_row(_t(service), _t(n), _t(weight), _t(f"{shares.nodes.get(n, 0.0):g}"))
    tables = [sites, nodes, per_service] if weights.services else [sites, nodes]
    return Group(Text(f"revision {state.revision}"), *tables)


def changes_table(title: str, changes: Sequence[Change]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("kind", "name", "before", "after"):
        table.add_column(column)
    for c in changes:
        table.add_row(_t(c.kind), _t(c.name), _t(c.before), _t(c.after))
    return table


def convergence_json(c: Convergence) -> dict[str, object]:
    return c.model_dump(mode="json")


def convergence_renderable(c: Convergence) -> RenderableType:
    head = Text(f"revision {c.revision}  ")
    head.append(
        "converged" if c.converged else "not converged",
        style="green" if c.converged else "yellow",
    )
    head.append(f"  applied: {', '.join(c.applied) or '-'}")
    if not c.lagging:
        return head
    table = Table(title="lagging", title_justify="left")
    for column in ("node", "applied revision", "liveness"):
        table.add_column(column)
    for n in c.lagging:
        table.add_row(_t(n.node), _t(n.applied_revision), _styled(str(n.liveness)))
    return Group(head, table)
