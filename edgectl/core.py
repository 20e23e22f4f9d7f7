"""The pure part of edgectl: exit codes, argument parsing, the fleet view built from the API's
answers, weight diffs and the drain-wait verdict. No I/O here, so unit tests cover it all."""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from contract.schemas import (
    Convergence,
    DesiredState,
    DrainKind,
    EffectiveWeights,
    Liveness,
    NodeObserved,
    NodeState,
)


class Exit(enum.IntEnum):
    """Exit codes that scripts can rely on."""

    OK = 0
    FAILURE = 1  # API unavailable, or any other failure
    USAGE = 2  # bad usage or a bad argument
    CONFLICT = 3  # 412: the state changed under us and was not overwritten
    NOT_FOUND = 4
    FORBIDDEN = 5  # forbidden or unauthorized
    TIMEOUT = 6  # --wait timed out


EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 API unavailable or other failure; 2 bad usage or argument; "
    "3 conflict (the state changed meanwhile, nothing overwritten); 4 not found; "
    "5 forbidden or unauthorized; 6 --wait timed out."
)


class CliError(Exception):
    """A failure reported as one line on stderr with an exit code."""

    def __init__(self, code: Exit, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- arguments ------------------------------------------------------------------------

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MAX_WEIGHT = 1000


def parse_assignments(items: Iterable[str], what: str) -> dict[str, int]:
    """`["site-a=3", "site-b=1"]` -> `{"site-a": 3, "site-b": 1}`, or CliError(USAGE)."""
    result: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not re.fullmatch(r"[+]?\d+", value):
            raise CliError(Exit.USAGE, f"{item!r} is not NAME=WEIGHT with an integer weight")
        if not _NAME.match(name):
            raise CliError(
                Exit.USAGE, f"{name!r} is not a valid {what} name (lowercase letters, digits, -)"
            )
        weight = int(value)
        if weight > MAX_WEIGHT:
            raise CliError(Exit.USAGE, f"{item!r}: weight must be between 0 and {MAX_WEIGHT}")
        if name in result and result[name] != weight:
            raise CliError(Exit.USAGE, f"{what} {name!r} is given two different weights")
        result[name] = weight
    return result


def parse_endpoints(values: Sequence[str]) -> list[str]:
    """`--api` values and/or EDGECTL_API (comma-separated) -> URLs, or CliError(USAGE)."""
    endpoints: list[str] = []
    for value in values:
        for part in re.split(r"[,\s]+", value):
            if not part:
                continue
            if not re.match(r"^https?://[^/\s]+", part):
                raise CliError(Exit.USAGE, f"API endpoint {part!r} is not an http(s):// URL")
            endpoints.append(part.rstrip("/"))
    return endpoints


def resolve_target(state: DesiredState, name: str, kind: DrainKind | None) -> DrainKind:
    """Is NAME a node or a site? CliError(NOT_FOUND) if neither, (USAGE) if both."""
    is_node, is_site = name in state.nodes, name in state.sites
    if kind is DrainKind.NODE or (kind is None and is_node and not is_site):
        if not is_node:
            raise CliError(Exit.NOT_FOUND, f"no node named {name!r}")
        return DrainKind.NODE
    if kind is DrainKind.SITE or (kind is None and is_site and not is_node):
        if not is_site:
            raise CliError(Exit.NOT_FOUND, f"no site named {name!r}")
        return DrainKind.SITE
    if is_node and is_site:
        raise CliError(Exit.USAGE, f"{name!r} is both a node and a site: add --kind node|site")
    raise CliError(Exit.NOT_FOUND, f"no node or site named {name!r}")


def affected_nodes(state: DesiredState, kind: DrainKind, name: str) -> list[str]:
    if kind is DrainKind.NODE:
        return [name] if name in state.nodes else []
    return sorted(n for n, spec in state.nodes.items() if spec.site == name)


def drain_reasons(state: DesiredState) -> dict[str, str]:
    """node -> why it is drained (its own drain first, else its site's; a drain of one
    service leaves the node in traffic)."""
    whole = [d for d in state.drains if d.service is None]
    site_drains = {d.name: d for d in whole if d.kind is DrainKind.SITE}
    node_drains = {d.name: d for d in whole if d.kind is DrainKind.NODE}
    reasons: dict[str, str] = {}
    for node, spec in state.nodes.items():
        if node in node_drains:
            d = node_drains[node]
            reasons[node] = f"{d.reason} ({d.author})"
        elif spec.site in site_drains:
            d = site_drains[spec.site]
            reasons[node] = f"site: {d.reason} ({d.author})"
    return reasons


# --- the fleet view (status, nodes, watch) --------------------------------------------


@dataclass(frozen=True)
class NodeRow:
    name: str
    site: str
    addresses: list[str]
    capacity_mbps: int
    weight: int
    effective_weight: float
    drained: bool
    drain_reason: str
    state: str  # reported by the node, "-" if it never reported
    liveness: str
    bgp_sessions: list[dict[str, str]]
    applied_revision: int | None
    last_seen: datetime | None
    connections: int | None
    backends_healthy: int | None
    backends_total: int | None

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "site": self.site,
            "addresses": self.addresses,
            "capacity_mbps": self.capacity_mbps,
            "weight": self.weight,
            "effective_weight": self.effective_weight,
            "drained": self.drained,
            "drain_reason": self.drain_reason,
            "state": self.state,
            "liveness": self.liveness,
            "bgp_sessions": self.bgp_sessions,
            "applied_revision": self.applied_revision,
            "last_seen": self.last_seen.isoformat() if self.last_seen else None,
            "connections": self.connections,
            "backends_healthy": self.backends_healthy,
            "backends_total": self.backends_total,
        }


@dataclass(frozen=True)
class SiteRow:
    name: str
    capacity_mbps: int
    weight: int
    effective_weight: float
    drained: bool
    drain_reason: str
    nodes: list[str]

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "capacity_mbps": self.capacity_mbps,
            "weight": self.weight,
            "effective_weight": self.effective_weight,
            "drained": self.drained,
            "drain_reason": self.drain_reason,
            "nodes": self.nodes,
        }


@dataclass(frozen=True)
class GroupMember:
    node: str
    role: str
    liveness: str
    term: int
    fencing_token: int | None
    reason: str
    last_transition: str
    last_transition_at: datetime | None

    def as_json(self) -> dict[str, object]:
        return {
            "node": self.node,
            "role": self.role,
            "liveness": self.liveness,
            "term": self.term,
            "fencing_token": self.fencing_token,
            "reason": self.reason,
            "last_transition": self.last_transition,
            "last_transition_at": self.last_transition_at.isoformat()
            if self.last_transition_at
            else None,
        }


@dataclass(frozen=True)
class GroupRow:
    """An active-passive group as its members report it (their heartbeats)."""

    name: str
    vip: str
    members: list[GroupMember]

    @property
    def active(self) -> list[str]:
        """Live members that say they own the VIP: one, or none during a failover. Two
        would be a split brain that fencing exists to prevent: shown, never hidden."""
        return [m.node for m in self.members if m.role == "active" and m.liveness == "alive"]

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "vip": self.vip,
            "active": self.active,
            "members": [m.as_json() for m in self.members],
        }


def build_groups(observed: Iterable[NodeObserved]) -> list[GroupRow]:
    groups: dict[str, list[tuple[str, GroupMember]]] = {}
    for o in sorted(observed, key=lambda o: o.node):
        report = o.heartbeat.vip_group if o.heartbeat else None
        if report is None:
            continue
        member = GroupMember(
            node=o.node,
            role=str(report.role),
            liveness=str(o.liveness),
            term=report.term,
            fencing_token=report.fencing_token,
            reason=report.reason,
            last_transition=report.last_transition,
            last_transition_at=report.last_transition_at,
        )
        groups.setdefault(report.group, []).append((report.vip, member))
    return [
        GroupRow(name, members[0][0], [m for _, m in members])
        for name, members in sorted(groups.items())
    ]


@dataclass(frozen=True)
class Fleet:
    revision: int
    converged: bool
    lagging: list[str]  # every node that has not applied the revision, live or not
    sites: list[SiteRow]
    nodes: list[NodeRow]
    groups: list[GroupRow] = field(default_factory=list)

    @property
    def behind(self) -> list[str]:
        """Live nodes that have not applied the revision: what convergence waits for."""
        return [
            n.name for n in self.nodes if n.name in self.lagging and n.liveness == Liveness.ALIVE
        ]

    @property
    def silent(self) -> list[str]:
        return [n.name for n in self.nodes if n.liveness != Liveness.ALIVE]

    def as_json(self) -> dict[str, object]:
        return {
            "revision": self.revision,
            "converged": self.converged,
            "lagging": self.lagging,
            "sites": [s.as_json() for s in self.sites],
            "nodes": [n.as_json() for n in self.nodes],
            "groups": [g.as_json() for g in self.groups],
        }


@dataclass(frozen=True)
class ServiceRow:
    """One node's view of one service (`edgectl status --service NAME`)."""

    node: str
    site: str
    liveness: str
    node_state: str
    state: str
    cause: str
    prefixes: list[str]
    backends_healthy: int
    backends_total: int

    def as_json(self) -> dict[str, object]:
        return {
            "node": self.node,
            "site": self.site,
            "liveness": self.liveness,
            "node_state": self.node_state,
            "state": self.state,
            "cause": self.cause,
            "prefixes": self.prefixes,
            "backends_healthy": self.backends_healthy,
            "backends_total": self.backends_total,
        }


def build_service_rows(
    state: DesiredState, observed: Iterable[NodeObserved], service: str
) -> list[ServiceRow]:
    """Every node that reports `service` in its last heartbeat, with that service's state.
    A name no node reports is a usage error (one line)."""
    seen = {o.node: o for o in observed}
    rows: list[ServiceRow] = []
    for name in sorted(state.nodes):
        o = seen.get(name)
        hb = o.heartbeat if o else None
        report = next((s for s in hb.services if s.name == service), None) if hb else None
        if o is None or hb is None or report is None:
            continue
        rows.append(
            ServiceRow(
                node=name,
                site=state.nodes[name].site,
                liveness=str(o.liveness),
                node_state=str(hb.state),
                state=str(report.state),
                cause=report.cause,
                prefixes=list(report.prefixes),
                backends_healthy=report.backends_healthy,
                backends_total=report.backends_total,
            )
        )
    if not rows:
        raise CliError(Exit.USAGE, f"--service: no node reports a service named {service!r}")
    return rows


def build_nodes(
    state: DesiredState, observed: Iterable[NodeObserved], weights: EffectiveWeights | None
) -> list[NodeRow]:
    seen = {o.node: o for o in observed}
    reasons = drain_reasons(state)
    rows: list[NodeRow] = []
    for name in sorted(state.nodes):
        spec = state.nodes[name]
        o = seen.get(name)
        hb = o.heartbeat if o else None
        rows.append(
            NodeRow(
                name=name,
                site=spec.site,
                addresses=[str(a) for a in spec.addresses],
                capacity_mbps=spec.capacity_mbps,
                weight=spec.weight,
                effective_weight=(weights.nodes.get(name, 0.0) if weights else 0.0),
                drained=name in reasons,
                drain_reason=reasons.get(name, ""),
                state=str(hb.state) if hb else "-",
                liveness=str(o.liveness if o else Liveness.UNKNOWN),
                bgp_sessions=[{"peer": s.peer, "state": s.state} for s in hb.bgp_sessions]
                if hb
                else [],
                applied_revision=hb.applied_revision if hb else None,
                last_seen=o.last_seen if o else None,
                connections=hb.connections if hb else None,
                backends_healthy=hb.health.backends_healthy if hb else None,
                backends_total=hb.health.backends_total if hb else None,
            )
        )
    return rows


def build_fleet(
    state: DesiredState,
    observed: Iterable[NodeObserved],
    weights: EffectiveWeights,
    convergence: Convergence,
) -> Fleet:
    observed = list(observed)
    nodes = build_nodes(state, observed, weights)
    site_drains = {d.name: d for d in state.drains if d.kind is DrainKind.SITE}
    sites = [
        SiteRow(
            name=name,
            capacity_mbps=spec.capacity_mbps,
            weight=spec.weight,
            effective_weight=weights.sites.get(name, 0.0),
            drained=name in site_drains,
            drain_reason=(
                f"{site_drains[name].reason} ({site_drains[name].author})"
                if name in site_drains
                else ""
            ),
            nodes=[n.name for n in nodes if n.site == name],
        )
        for name, spec in sorted(state.sites.items())
    ]
    return Fleet(
        revision=state.revision,
        converged=convergence.converged and convergence.revision >= state.revision,
        lagging=[n.node for n in convergence.lagging],
        sites=sites,
        nodes=nodes,
        groups=build_groups(observed),
    )


# --- weights --------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Change:
    """One difference between two states: `kind` is site, node or drain."""

    kind: str
    name: str
    before: str | None  # None: did not exist
    after: str | None  # None: no longer exists

    def describe(self) -> str:
        if self.kind == "drain":
            if self.before is None:
                return f"{self.name} drained: {self.after}"
            if self.after is None:
                return f"{self.name} undrained"
            return f"{self.name} drain reason {self.before!r} -> {self.after!r}"
        if self.before is None:
            return f"{self.kind} {self.name} added with weight {self.after}"
        if self.after is None:
            return f"{self.kind} {self.name} removed (weight was {self.before})"
        return f"{self.kind} {self.name} weight {self.before} -> {self.after}"

    def as_json(self) -> dict[str, object]:
        return {"kind": self.kind, "name": self.name, "before": self.before, "after": self.after}


def _diff_maps(kind: str, before: Mapping[str, str], after: Mapping[str, str]) -> list[Change]:
    return [
        Change(kind, name, before.get(name), after.get(name))
        for name in sorted(set(before) | set(after))
        if before.get(name) != after.get(name)
    ]


def diff_states(before: DesiredState, after: DesiredState) -> list[Change]:
    """What changed between two revisions, as far as weights and drains go."""

    def drains(state: DesiredState) -> dict[str, str]:
        return {
            f"{d.kind} {d.name}" + (f" service {d.service}" if d.service else ""): (
                f"{d.reason} ({d.author})"
            )
            for d in state.drains
        }

    def service_weights(state: DesiredState, kind: str) -> dict[str, str]:
        return {
            f"{name} (service {service})": str(weight)
            for service, own in state.service_weights.items()
            for name, weight in (own.sites if kind == "site" else own.nodes).items()
        }

    return (
        _diff_maps(
            "site",
            {n: str(s.weight) for n, s in before.sites.items()},
            {n: str(s.weight) for n, s in after.sites.items()},
        )
        + _diff_maps(
            "node",
            {n: str(s.weight) for n, s in before.nodes.items()},
            {n: str(s.weight) for n, s in after.nodes.items()},
        )
        + _diff_maps("site", service_weights(before, "site"), service_weights(after, "site"))
        + _diff_maps("node", service_weights(before, "node"), service_weights(after, "node"))
        + _diff_maps("drain", drains(before), drains(after))
    )


def planned_changes(
    state: DesiredState,
    sites: Mapping[str, int],
    nodes: Mapping[str, int],
    service: str | None = None,
) -> list[Change]:
    """The weight changes that `weights set` would make on `state` (unchanged ones omitted),
    of one service's own weights when `service` is given; CliError if a name is unknown or
    in the wrong place."""
    if service is not None and service not in state.services:
        raise CliError(Exit.NOT_FOUND, f"no service named {service!r}")
    for name in sites:
        if name not in state.sites:
            if name in state.nodes:
                raise CliError(
                    Exit.USAGE, f"{name!r} is a node, not a site: use --node {name}=WEIGHT"
                )
            raise CliError(Exit.NOT_FOUND, f"no site named {name!r}")
    for name in nodes:
        if name not in state.nodes:
            if name in state.sites:
                raise CliError(Exit.USAGE, f"{name!r} is a site, not a node: drop --node")
            raise CliError(Exit.NOT_FOUND, f"no node named {name!r}")
    own = state.service_weights.get(service) if service is not None else None
    site_now = {n: s.weight for n, s in state.sites.items()} | (own.sites if own else {})
    node_now = {n: s.weight for n, s in state.nodes.items()} | (own.nodes if own else {})
    changes = [
        Change("site", n, str(site_now[n]), str(w))
        for n, w in sorted(sites.items())
        if site_now[n] != w
    ]
    changes += [
        Change("node", n, str(node_now[n]), str(w))
        for n, w in sorted(nodes.items())
        if node_now[n] != w
    ]
    return changes


# --- drain --wait ---------------------------------------------------------------------


@dataclass
class WaitProgress:
    """How far the fleet is towards `revision` and the drained (or undrained) nodes."""

    revision: int
    alive: int = 0
    applied: int = 0
    targets: int = 0
    targets_done: int = 0
    pending: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return not self.pending


def wait_progress(
    revision: int,
    state: DesiredState,
    observed: Iterable[NodeObserved],
    targets: Sequence[str],
    *,
    draining: bool,
) -> WaitProgress:
    """Done when every live node applied `revision` and every live target reports draining
    or down (`draining`), or no longer reports draining unless still drained otherwise
    (undrain). A node that is not alive takes no traffic and is not waited for."""
    seen = {o.node: o for o in observed}
    still_drained = drain_reasons(state)
    progress = WaitProgress(revision=revision, targets=len(targets))
    for name in sorted(state.nodes):
        o = seen.get(name)
        hb = o.heartbeat if o else None
        if o is None or o.liveness is not Liveness.ALIVE or hb is None:
            if name in targets:
                progress.targets_done += 1
            continue
        progress.alive += 1
        if hb.applied_revision >= revision:
            progress.applied += 1
        else:
            progress.pending.append(f"{name} applied revision {hb.applied_revision}")
            continue
        if name not in targets:
            continue
        if draining:
            ok = hb.state in (NodeState.DRAINING, NodeState.DOWN)
        else:
            ok = hb.state is not NodeState.DRAINING or name in still_drained
        if ok:
            progress.targets_done += 1
        else:
            progress.pending.append(f"{name} reports {hb.state}")
    return progress
