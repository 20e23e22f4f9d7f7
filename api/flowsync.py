"""Does a weight change wait for the fleet's flow tables? The decision, pure.

Edges that share their flow tables (node.yaml `flowshare:`) forward the packets of a flow
that the routers move to the edge that owns its socket. A weight change moves flows
between nodes that did nothing themselves, so the GSLB applies one only once every
flow-sharing node reports its flow tables in sync with its peers (the heartbeat's
`flowshare` report), bounded by `flow_sync_bound_s`: after the bound the change goes
ahead and the `flow-sync` event names whoever was not in sync.

- Only alive nodes count, and of their peers only those the GSLB does not know as dead
  or never heard from (a peer that cannot answer is never waited for).
- A fleet in which no alive node reports flow sharing waits for nothing.
- An alive node without a report (no flow sharing, or an agent older than the report),
  in a fleet where others report, is unknown: waited for, but never beyond the bound.
- An alive node of an active-passive group that runs no BGP (its heartbeat has a
  `vip_group` and neither a `bgp` report nor BGP sessions) attracts no routed anycast
  flows: a weight change moves none of them, so it is not waited for.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from contract.schemas import DesiredState, Heartbeat, Liveness, NodeObserved


class Sync(enum.StrEnum):
    NOT_SHARING = "not sharing"  # no alive node reports flow sharing: nothing to wait for
    IN_SYNC = "in sync"
    WAIT = "wait"
    BOUND = "bound"  # not in sync, the bound passed: proceed and say so


@dataclass(frozen=True, slots=True)
class OutOfSync:
    node: str
    peers: tuple[str, ...]
    lag_ms: float  # the longest lag among those peers

    def __str__(self) -> str:
        return f"{self.node} (peers {', '.join(self.peers)}; lag {self.lag_ms:.0f} ms)"


@dataclass(frozen=True, slots=True)
class Verdict:
    sync: Sync
    waited_s: float
    bound_s: float
    sharing: tuple[str, ...] = ()  # alive nodes that report flow sharing
    out_of_sync: tuple[OutOfSync, ...] = ()
    unknown: tuple[str, ...] = ()  # alive nodes without a report

    @property
    def proceed(self) -> bool:
        return self.sync is not Sync.WAIT

    def describe(self) -> str:
        """The `flow-sync` event's cause."""
        if self.sync is Sync.NOT_SHARING:
            return "no node shares flows: applied at once"
        if self.sync is Sync.IN_SYNC:
            return (
                f"flow tables in sync on {len(self.sharing)} node(s) after "
                f"{self.waited_s:.3f} s: applied"
            )
        parts = [f"out of sync: {'; '.join(str(o) for o in self.out_of_sync)}"] * bool(
            self.out_of_sync
        )
        if self.unknown:
            parts.append(f"no flow-sharing report from {', '.join(self.unknown)}")
        state = "applied after the bound" if self.sync is Sync.BOUND else "waiting"
        return (
            f"flow tables not in sync after {self.waited_s:.3f} s "
            f"(bound {self.bound_s:g} s), {state}: {'; '.join(parts)}"
        )


def judge(observed: Mapping[str, NodeObserved], waited_s: float, bound_s: float) -> Verdict:
    """The gate's verdict `waited_s` after the weight change came in."""
    alive = {
        name: record.heartbeat
        for name, record in observed.items()
        if record.liveness is Liveness.ALIVE and record.heartbeat is not None
    }
    reports = {name: hb.flowshare for name, hb in alive.items() if hb.flowshare is not None}
    if not reports:
        return Verdict(Sync.NOT_SHARING, waited_s, bound_s)
    # Peers the GSLB knows as not alive cannot answer; a peer it does not know still counts.
    absent = {name for name, record in observed.items() if record.liveness is not Liveness.ALIVE}
    out: list[OutOfSync] = []
    for name in sorted(reports):
        behind = [p for p in reports[name].peers if not p.synced and p.peer not in absent]
        if behind:
            peers = tuple(sorted(p.peer for p in behind))
            out.append(OutOfSync(name, peers, max(p.lag_ms for p in behind)))
    unknown = tuple(
        sorted(name for name in set(alive) - set(reports) if not _vip_only(alive[name]))
    )
    sharing = tuple(sorted(reports))
    if not out and not unknown:
        sync = Sync.IN_SYNC
    elif waited_s >= bound_s:
        sync = Sync.BOUND
    else:
        sync = Sync.WAIT
    return Verdict(sync, waited_s, bound_s, sharing, tuple(out), unknown)


def _vip_only(heartbeat: Heartbeat) -> bool:
    """A node of an active-passive group without BGP: no anycast flow reaches it."""
    return heartbeat.vip_group is not None and heartbeat.bgp is None and not heartbeat.bgp_sessions


def moves_shares(before: DesiredState, after: DesiredState) -> bool:
    """A weight change: an operator weight (a site's, a node's, or a service's own) or the
    capacity of a site or node that exists before and after is different."""
    if before.service_weights != after.service_weights:
        return True
    for name in before.sites.keys() & after.sites.keys():
        old, new = before.sites[name], after.sites[name]
        if (old.weight, old.capacity_mbps) != (new.weight, new.capacity_mbps):
            return True
    for name in before.nodes.keys() & after.nodes.keys():
        old_node, new_node = before.nodes[name], after.nodes[name]
        if (old_node.weight, old_node.capacity_mbps) != (new_node.weight, new_node.capacity_mbps):
            return True
    return False
