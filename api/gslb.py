"""Shares: how much of the anycast traffic each node should attract. Pure, no I/O.

Inputs are the operator's desired state (site and node weights, capacities, drains) and
what the nodes report (their state and whether their lease is alive). The output is, per
node, the link-bandwidth in Mbit/s it announces when it serves at full health
(`link_bandwidth_mbps`): one unit from here to the routers, which split new flows in
proportion to it. Whether the node serves is not folded into that number: a drain is the
admin state published beside it, and the node's own health is the node's to act on (its
BGP policy withdraws a DOWN node and reduces a DEGRADED one, with or without the API).

Rules (each has a property test in tests/unit/test_gslb.py):

* A node is serving when it is alive, reports healthy or degraded, is not drained (itself
  or its site) and has a non-zero operator weight and capacity. Degraded counts as
  serving at full here: the node reduces its own announcement, and counting it twice
  (here and there) would skew every share.
* A site's raw share is its operator weight times the fraction of its capacity that is
  serving, so a site that loses half its nodes gets half its share instead of sending the
  same traffic to half the machines (an overload).
* Raw site shares are normalised so the serving nodes announce FLEET_LINK_BANDWIDTH_MBPS
  between them (0 when none serves); inside a site, its share is split between its serving
  nodes in proportion to operator weight x capacity.
* Each node's share is computed as if that node were serving (other nodes' drains and
  health count, its own do not), so the number it holds is right the moment it serves
  again, and it needs nothing else while it drains or while no API answers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from contract.schemas import (
    FLEET_LINK_BANDWIDTH_MBPS,
    AdminState,
    DesiredState,
    DrainKind,
    Liveness,
    NodeState,
)

#: The reported states in which a node takes traffic.
SERVING_STATES = frozenset({NodeState.HEALTHY, NodeState.DEGRADED})


@dataclass(frozen=True, slots=True)
class NodeHealth:
    """The observed facts shares depend on."""

    liveness: Liveness
    state: NodeState | None


@dataclass(frozen=True, slots=True)
class NodeDrain:
    source: DrainKind
    reason: str


@dataclass(frozen=True, slots=True)
class Shares:
    #: Per node: the Mbit/s it announces when serving at full health (as if it served).
    link_bandwidth_mbps: dict[str, float]
    #: The nodes that take traffic now.
    serving: frozenset[str]

    @property
    def nodes(self) -> dict[str, float]:
        """What each node is asked to announce now: its share if serving, else 0."""
        return {n: (bw if n in self.serving else 0.0) for n, bw in self.link_bandwidth_mbps.items()}

    def sites(self, desired: DesiredState) -> dict[str, float]:
        now = self.nodes
        totals = dict.fromkeys(desired.sites, 0.0)
        for name, spec in desired.nodes.items():
            if spec.site in totals:
                totals[spec.site] += now[name]
        return totals


def drained_nodes(desired: DesiredState) -> dict[str, NodeDrain]:
    """Node name -> its drain, for nodes drained directly or through their site."""
    node_drains = {d.name: d.reason for d in desired.drains if d.kind is DrainKind.NODE}
    site_drains = {d.name: d.reason for d in desired.drains if d.kind is DrainKind.SITE}
    drained: dict[str, NodeDrain] = {}
    for name, node in desired.nodes.items():
        if name in node_drains:
            drained[name] = NodeDrain(DrainKind.NODE, node_drains[name])
        elif node.site in site_drains:
            reason = f"site {node.site} drained: {site_drains[node.site]}"
            drained[name] = NodeDrain(DrainKind.SITE, reason)
    return drained


def admin_state(drain: NodeDrain | None, observed: NodeHealth | None) -> AdminState:
    """ACTIVE without a drain; with one, DRAINED once the node no longer serves or drains."""
    if drain is None:
        return AdminState.ACTIVE
    still_going = (
        observed is not None
        and observed.liveness is Liveness.ALIVE
        and observed.state in (*SERVING_STATES, NodeState.DRAINING)
    )
    return AdminState.DRAINING if still_going else AdminState.DRAINED


def serving_nodes(
    desired: DesiredState, health: Mapping[str, NodeHealth], drained: Mapping[str, NodeDrain]
) -> frozenset[str]:
    serving = set()
    for name, node in desired.nodes.items():
        observed = health.get(name)
        if (
            name not in drained
            and observed is not None
            and observed.liveness is Liveness.ALIVE
            and observed.state in SERVING_STATES
            and node.weight * node.capacity_mbps > 0
        ):
            serving.add(name)
    return frozenset(serving)


def shares(desired: DesiredState, health: Mapping[str, NodeHealth]) -> Shares:
    serving = serving_nodes(desired, health, drained_nodes(desired))
    capacity = {n: spec.weight * spec.capacity_mbps for n, spec in desired.nodes.items()}

    full: dict[str, float] = dict.fromkeys(desired.sites, 0.0)
    available: dict[str, float] = dict.fromkeys(desired.sites, 0.0)
    for name, spec in desired.nodes.items():
        if spec.site in full:
            full[spec.site] += capacity[name]
            if name in serving:
                available[spec.site] += capacity[name]

    def raw(site: str, available_mbps: float) -> float:
        # Full capacity counts every member as if serving: available/full is the site's
        # serving fraction.
        if full[site] <= 0:
            return 0.0
        return desired.sites[site].weight * available_mbps / full[site]

    raw_total = sum(raw(site, available[site]) for site in desired.sites)
    bandwidth: dict[str, float] = {}
    for name, spec in desired.nodes.items():
        site = spec.site
        if site not in full or full[site] <= 0 or capacity[name] <= 0:
            bandwidth[name] = 0.0
            continue
        # The same normalisation with this one node counted as serving (a no-op when it
        # is): node share = total x raw'(site) / total' x capacity / available'(site),
        # which simplifies to the line below.
        own = 0.0 if name in serving else capacity[name]
        total = raw_total - raw(site, available[site]) + raw(site, available[site] + own)
        site_weight = desired.sites[site].weight
        bandwidth[name] = (
            0.0
            if total <= 0
            else FLEET_LINK_BANDWIDTH_MBPS * site_weight * capacity[name] / (full[site] * total)
        )
    return Shares(link_bandwidth_mbps=bandwidth, serving=serving)
