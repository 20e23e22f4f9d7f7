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
  nodes in proportion to operator weight x capacity. When every site with a serving node
  weighs 0 (the sites meant to take the traffic are all down or drained), site weights
  are left out: a control plane never asks every serving node to withdraw.
* Each node's share is computed as if that node were serving (other nodes' drains and
  health count, its own do not), so the number it holds is right the moment it serves
  again, and it needs nothing else while it drains or while no API answers.

Per service (`service_shares`), the same rules on the service's own inputs:

* The service's weights are its own where the operator set them (`service_weights`), the
  site's and node's elsewhere.
* A node carries the service when it reports it in its heartbeats, or reports no services
  of its own (an agent older than services, or today's one implicit service: it announces
  everything by its node state). A node that does not carry it counts for nothing.
* A node serves the service when it serves (as above) and reports the service serving.
* Drains: a node drain and a site drain apply to every service; a service drain (of a
  node or of a site) only to its service.
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
    ServiceState,
)

#: The reported states in which a node takes traffic.
SERVING_STATES = frozenset({NodeState.HEALTHY, NodeState.DEGRADED})
#: The name of the one implicit service of a node of the single-service shape.
IMPLICIT_SERVICE = "default"


@dataclass(frozen=True, slots=True)
class NodeHealth:
    """The observed facts shares depend on."""

    liveness: Liveness
    state: NodeState | None
    #: Each service's own state as the node reports it; None (or only the implicit
    #: service): the node carries every service, by its node state.
    services: Mapping[str, ServiceState] | None = None

    def for_service(self, service: str) -> NodeHealth | None:
        """The node's health as seen by one service (a node that serves but whose service
        does not is down for it); None when the node does not carry the service."""
        if self.services is None or set(self.services) <= {IMPLICIT_SERVICE}:
            return NodeHealth(self.liveness, self.state)
        own = self.services.get(service)
        if own is None:
            return None
        if self.state in SERVING_STATES and not own.serving:
            return NodeHealth(self.liveness, NodeState.DOWN)
        return NodeHealth(self.liveness, self.state)


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


def _drains_of(desired: DesiredState, kind: DrainKind, service: str | None) -> dict[str, str]:
    return {d.name: d.reason for d in desired.drains if d.kind is kind and d.service == service}


def drained_nodes(desired: DesiredState) -> dict[str, NodeDrain]:
    """Node name -> its drain, for nodes drained directly or through their site (drains of
    one service only are not among them: `service_drained_nodes`)."""
    node_drains = _drains_of(desired, DrainKind.NODE, None)
    site_drains = _drains_of(desired, DrainKind.SITE, None)
    drained: dict[str, NodeDrain] = {}
    for name, node in desired.nodes.items():
        if name in node_drains:
            drained[name] = NodeDrain(DrainKind.NODE, node_drains[name])
        elif node.site in site_drains:
            reason = f"site {node.site} drained: {site_drains[node.site]}"
            drained[name] = NodeDrain(DrainKind.SITE, reason)
    return drained


def service_drained_nodes(desired: DesiredState, service: str) -> dict[str, NodeDrain]:
    """Node name -> its drain for one service: its node or site drain (they apply to every
    service, and win), else the service's drain of the node, else of its site."""
    drained = drained_nodes(desired)
    node_drains = _drains_of(desired, DrainKind.NODE, service)
    site_drains = _drains_of(desired, DrainKind.SITE, service)
    for name, node in desired.nodes.items():
        if name in drained:
            continue
        if name in node_drains:
            reason = f"service {service} drained: {node_drains[name]}"
            drained[name] = NodeDrain(DrainKind.NODE, reason)
        elif node.site in site_drains:
            reason = f"service {service} drained on site {node.site}: {site_drains[node.site]}"
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
    return _shares(desired, health, drained_nodes(desired))


def service_health(health: Mapping[str, NodeHealth], service: str) -> dict[str, NodeHealth]:
    """The health of the nodes that may carry `service`, as that service sees it."""
    result = {}
    for name, observed in health.items():
        own = observed.for_service(service)
        if own is not None:
            result[name] = own
    return result


def service_weighted(
    desired: DesiredState, health: Mapping[str, NodeHealth], service: str
) -> DesiredState:
    """The desired state with the service's own weights in force; a node known not to carry
    the service weighs 0 (it counts for nothing in its site's capacity)."""
    own = desired.service_weights.get(service)
    sites = dict(desired.sites)
    nodes = dict(desired.nodes)
    if own is not None:
        for name, weight in own.sites.items():
            if name in sites:
                sites[name] = sites[name].model_copy(update={"weight": weight})
        for name, weight in own.nodes.items():
            if name in nodes:
                nodes[name] = nodes[name].model_copy(update={"weight": weight})
    for name, observed in health.items():
        if name in nodes and observed.for_service(service) is None:
            nodes[name] = nodes[name].model_copy(update={"weight": 0})
    return desired.model_copy(update={"sites": sites, "nodes": nodes})


def service_shares(desired: DesiredState, health: Mapping[str, NodeHealth], service: str) -> Shares:
    """One service's shares (module docstring: per service)."""
    weighted = service_weighted(desired, health, service)
    return _shares(
        weighted, service_health(health, service), service_drained_nodes(desired, service)
    )


def _shares(
    desired: DesiredState, health: Mapping[str, NodeHealth], drained: Mapping[str, NodeDrain]
) -> Shares:
    serving = serving_nodes(desired, health, drained)
    capacity = {n: spec.weight * spec.capacity_mbps for n, spec in desired.nodes.items()}

    full: dict[str, float] = dict.fromkeys(desired.sites, 0.0)
    available: dict[str, float] = dict.fromkeys(desired.sites, 0.0)
    for name, spec in desired.nodes.items():
        if spec.site in full:
            full[spec.site] += capacity[name]
            if name in serving:
                available[spec.site] += capacity[name]

    def raw(site: str, available_mbps: float, weighted: bool = True) -> float:
        # Full capacity counts every member as if serving: available/full is the site's
        # serving fraction.
        if full[site] <= 0:
            return 0.0
        weight = desired.sites[site].weight if weighted else 1
        return weight * available_mbps / full[site]

    raw_total = sum(raw(site, available[site]) for site in desired.sites)
    even_total = sum(raw(site, available[site], weighted=False) for site in desired.sites)
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
        site_weight: float = desired.sites[site].weight
        if total <= 0:
            # Every serving site weighs 0 (the sites that should take the traffic are all
            # down or drained): the site weights cannot split the fleet, so they are left
            # out, rather than every serving node asked to announce 0 (a withdraw).
            site_weight = 1
            total = (
                even_total
                - raw(site, available[site], weighted=False)
                + raw(site, available[site] + own, weighted=False)
            )
        bandwidth[name] = (
            0.0
            if total <= 0
            else FLEET_LINK_BANDWIDTH_MBPS * site_weight * capacity[name] / (full[site] * total)
        )
    return Shares(link_bandwidth_mbps=bandwidth, serving=serving)
