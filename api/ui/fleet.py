"""The page's model of the fleet: a pure function of the API's snapshot, its events and the
recent history of heartbeats. No I/O: the routes feed it, tests call it directly."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from api.views import Snapshot, convergence_view, node_view
from contract.schemas import Event, Liveness

#: How much history the page draws, and how densely.
HISTORY_S = 300.0
SAMPLE_EVERY_S = 1.0
EVENTS_SHOWN = 25


@dataclass(frozen=True, slots=True)
class Sample:
    time: float
    state: str
    connections: int
    liveness: str


@dataclass(slots=True)
class FleetHistory:
    """Per node, what its heartbeats said over the last `HISTORY_S` seconds (bounded)."""

    samples: dict[str, deque[Sample]] = field(default_factory=dict)
    last_at: float = 0.0

    def record(self, snapshot: Snapshot, now: float) -> bool:
        """Add one sample per node unless the last is younger than `SAMPLE_EVERY_S`."""
        if now - self.last_at < SAMPLE_EVERY_S:
            return False
        self.last_at = now
        keep = int(HISTORY_S / SAMPLE_EVERY_S)
        for name in snapshot.desired.nodes:
            observed = snapshot.observed.get(name)
            beat = observed.heartbeat if observed else None
            series = self.samples.setdefault(name, deque(maxlen=keep))
            series.append(
                Sample(
                    time=now,
                    state=str(beat.state) if beat else "unknown",
                    connections=beat.connections if beat else 0,
                    liveness=str(observed.liveness if observed else Liveness.UNKNOWN),
                )
            )
        for gone in set(self.samples) - set(snapshot.desired.nodes):
            del self.samples[gone]
        return True


def _age(now: float, when: datetime | None) -> float | None:
    return None if when is None else round(max(0.0, now - when.timestamp()), 1)


def fleet_model(
    snapshot: Snapshot, events: Iterable[Event], history: FleetHistory, now: float
) -> dict[str, Any]:
    desired = snapshot.desired
    convergence = convergence_view(snapshot)
    site_shares = snapshot.shares.sites(desired)
    total_share = sum(site_shares.values())
    drains = {(d.kind.value, d.name): d for d in desired.drains}

    nodes: list[dict[str, Any]] = []
    for name in sorted(desired.nodes):
        spec = desired.nodes[name]
        observed = snapshot.observed.get(name)
        beat = observed.heartbeat if observed else None
        view = node_view(snapshot, name)
        drain = drains.get(("node", name)) or drains.get(("site", spec.site))
        sessions = beat.bgp_sessions if beat else []
        applied = beat.applied_revision if beat else None
        nodes.append(
            {
                "name": name,
                "site": spec.site,
                "state": str(beat.state) if beat else "unknown",
                # The drain as the node runs it (its phase), beside the operator's wish.
                "drain_phase": str(beat.drain.phase) if beat and beat.drain else None,
                "liveness": str(observed.liveness if observed else Liveness.UNKNOWN),
                "last_seen_age_s": _age(now, observed.last_seen if observed else None),
                "admin_state": str(view.admin_state) if view else "active",
                "drain": None
                if drain is None
                else {"kind": str(drain.kind), "reason": drain.reason, "author": drain.author},
                "operator_weight": spec.weight,
                "share_mbps": round(snapshot.shares.nodes.get(name, 0.0), 1),
                "applied_revision": applied,
                "revision_lag": None if applied is None else max(0, desired.revision - applied),
                "bgp": {
                    "established": sum(1 for s in sessions if s.state.lower() == "established"),
                    "peers": len(sessions),
                    "reason": beat.bgp.reason if beat and beat.bgp else "",
                },
                "connections": beat.connections if beat else 0,
                "backends": {
                    "healthy": beat.health.backends_healthy if beat else 0,
                    "total": beat.health.backends_total if beat else 0,
                },
                "health_detail": beat.health.detail if beat else "",
                "series": [
                    [round(s.time - now, 1), s.connections, s.state, s.liveness]
                    for s in history.samples.get(name, ())
                ],
            }
        )

    sites: list[dict[str, Any]] = []
    for name in sorted(desired.sites):
        site = desired.sites[name]
        members = [n for n in nodes if n["site"] == name]
        share = site_shares.get(name, 0.0)
        site_drain = drains.get(("site", name))
        sites.append(
            {
                "name": name,
                "operator_weight": site.weight,
                "share_mbps": round(share, 1),
                "share_pct": round(100 * share / total_share, 1) if total_share > 0 else 0.0,
                "nodes": len(members),
                "serving": sum(1 for n in members if n["share_mbps"] > 0),
                "drain": None
                if site_drain is None
                else {"reason": site_drain.reason, "author": site_drain.author},
            }
        )

    return {
        "revision": desired.revision,
        "generated_at": now,
        "converged": convergence.converged,
        "lagging": [n.node for n in convergence.lagging if n.liveness is Liveness.ALIVE],
        "sites": sites,
        "nodes": nodes,
        "drains": [
            {
                "kind": str(d.kind),
                "name": d.name,
                "reason": d.reason,
                "author": d.author,
                "since": d.since.isoformat(),
            }
            for d in desired.drains
        ],
        "events": [
            {
                "time": e.time.isoformat(),
                "kind": e.kind,
                "subject": e.subject,
                "cause": e.cause,
                "author": e.author,
            }
            for e in list(events)[-EVENTS_SHOWN:][::-1]
        ],
    }


def fleet_summary(model: Mapping[str, Any]) -> str:
    """One line for the page title: what an operator glances at first."""
    nodes = model["nodes"]
    alive = sum(1 for n in nodes if n["liveness"] == "alive")
    serving = sum(1 for n in nodes if n["share_mbps"] > 0)
    return f"{serving}/{len(nodes)} serving, {alive} alive, revision {model['revision']}"
