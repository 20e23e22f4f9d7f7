"""Effective weights: how much of the anycast traffic each node should attract. Pure, no I/O.

Inputs are the operator's desired state (site and node weights, capacities, drains) and
what the nodes report (their state and whether their lease is alive). The output is one
number per node, published to the node, which announces it as BGP link-bandwidth.

Rules (each has a property test in tests/unit/test_gslb.py):

* A node can take traffic when it is alive, healthy or degraded, not drained (itself or its
  site) and has a non-zero operator weight and capacity. Degraded nodes count for half:
  they still serve, but should not attract as much as a clean node.
* A site's raw share is its operator weight times the fraction of its capacity that can
  take traffic. So a site that loses half its nodes gets half its share instead of sending
  the same traffic to half the machines (an overload).
* Raw site shares are normalised so the sum over every node is EFFECTIVE_WEIGHT_TOTAL
  whenever at least one node can take traffic (and 0 when none can).
* Inside a site, its share is split between its available nodes in proportion to
  operator weight x capacity x health factor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from contract.schemas import (
    EFFECTIVE_WEIGHT_TOTAL,
    DesiredState,
    DrainKind,
    Liveness,
    NodeState,
)

#: How much of a node's capacity counts, by the state it reports.
HEALTH_FACTOR: Mapping[NodeState, float] = {
    NodeState.HEALTHY: 1.0,
    NodeState.DEGRADED: 0.5,
    NodeState.STARTING: 0.0,
    NodeState.DRAINING: 0.0,
    NodeState.DOWN: 0.0,
}


@dataclass(frozen=True, slots=True)
class NodeHealth:
    """The observed facts effective weights depend on."""

    liveness: Liveness
    state: NodeState | None


@dataclass(frozen=True, slots=True)
class WeightResult:
    nodes: dict[str, float]
    sites: dict[str, float]


def drained_nodes(desired: DesiredState) -> dict[str, str]:
    """Node name -> drain reason, for nodes drained directly or through their site."""
    node_drains = {d.name: d.reason for d in desired.drains if d.kind is DrainKind.NODE}
    site_drains = {d.name: d.reason for d in desired.drains if d.kind is DrainKind.SITE}
    drained: dict[str, str] = {}
    for name, node in desired.nodes.items():
        if name in node_drains:
            drained[name] = node_drains[name]
        elif node.site in site_drains:
            drained[name] = f"site {node.site} drained: {site_drains[node.site]}"
    return drained


def usable_capacity(
    desired: DesiredState, health: Mapping[str, NodeHealth], drained: Mapping[str, str]
) -> dict[str, float]:
    """Per node: operator weight x capacity x health factor, 0 for nodes that cannot serve."""
    usable: dict[str, float] = {}
    for name, node in desired.nodes.items():
        observed = health.get(name)
        if (
            name in drained
            or observed is None
            or observed.liveness is not Liveness.ALIVE
            or observed.state is None
        ):
            usable[name] = 0.0
            continue
        usable[name] = node.weight * node.capacity_mbps * HEALTH_FACTOR[observed.state]
    return usable


def effective_weights(desired: DesiredState, health: Mapping[str, NodeHealth]) -> WeightResult:
    drained = drained_nodes(desired)
    usable = usable_capacity(desired, health, drained)

    members: dict[str, list[str]] = {site: [] for site in desired.sites}
    for name, spec in desired.nodes.items():
        members.setdefault(spec.site, []).append(name)

    raw_site_share: dict[str, float] = {}
    site_available: dict[str, float] = {}
    for site_name, site in desired.sites.items():
        names = members[site_name]
        # Full capacity counts every member as if healthy and undrained: the fraction
        # available/full is the "healthy share" of the site.
        full = sum(desired.nodes[n].weight * desired.nodes[n].capacity_mbps for n in names)
        available = sum(usable[n] for n in names)
        site_available[site_name] = available
        raw_site_share[site_name] = 0.0 if full <= 0 else site.weight * (available / full)

    total_raw = sum(raw_site_share.values())
    site_share = {
        s: (0.0 if total_raw <= 0 else EFFECTIVE_WEIGHT_TOTAL * raw / total_raw)
        for s, raw in raw_site_share.items()
    }

    node_weights: dict[str, float] = {}
    for name, spec in desired.nodes.items():
        available = site_available.get(spec.site, 0.0)
        share = site_share.get(spec.site, 0.0)
        node_weights[name] = 0.0 if available <= 0 else share * usable[name] / available
    return WeightResult(nodes=node_weights, sites=site_share)
