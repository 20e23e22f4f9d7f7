"""The disruption budget: may this change of desired state take this much out of service?

Pure: no I/O. The API asks `judge(before, after, alive, budget)` for every desired-state
write, with the state the write replaces (the one its compare-and-swap is on) and what each
node alive to the GSLB reports; the answer says which bounds the change would break.

Words, with one meaning each:
- healthy: alive to the GSLB and reporting healthy, degraded or draining (a draining node is
  capacity taken out, not capacity gone). The budget only protects capacity that exists:
  dead, starting, down or never-heard-of nodes are nobody's to drain.
- in service: reporting healthy or degraded, not drained (itself or its site), operator
  weight > 0, site weight > 0.
- out: healthy but not in service.
- capacity: `capacity_mbps`, Mbit/s, end to end.

Bounds, per site and for the fleet: at least `min_share` of the healthy capacity stays in
service, and at most `max_out` nodes are out at once (None: no count bound). A change is
refused only where it makes a bound worse and leaves it broken: undrains, repairs and
changes that take nothing out always pass, even when a bound is already broken. A site
that the change takes out as a whole (site drain, site weight 0) is judged by the fleet
bounds, not by its own: emptying a site on purpose is the point of a site drain. Removing
the last service (or changing the prefix of the only one) leaves the fleet announcing
nothing, so it breaks the fleet bound whenever any capacity is in service; with other
services left, the fleet's capacity still serves them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from contract.schemas import (
    BudgetBound,
    BudgetBreach,
    DesiredState,
    DrainKind,
    Liveness,
    NodeObserved,
    NodeState,
    ServiceState,
)

FLEET = "fleet"
#: The one implicit service of a node of the single-service shape (api.gslb's too).
IMPLICIT_SERVICE = "default"


@dataclass(frozen=True, slots=True)
class Limits:
    min_share: float = 0.5
    max_out: int | None = None


@dataclass(frozen=True, slots=True)
class Budget:
    site: Limits = Limits()
    fleet: Limits = Limits()


@dataclass(frozen=True, slots=True)
class Tally:
    healthy_mbps: int = 0
    in_service_mbps: int = 0
    out: int = 0

    def plus(self, capacity_mbps: int, in_service: bool) -> Tally:
        return Tally(
            self.healthy_mbps + capacity_mbps,
            self.in_service_mbps + (capacity_mbps if in_service else 0),
            self.out + (0 if in_service else 1),
        )


_HEALTHY = frozenset({NodeState.HEALTHY, NodeState.DEGRADED, NodeState.DRAINING})
_SERVING = frozenset({NodeState.HEALTHY, NodeState.DEGRADED})


def alive_states(observed: Mapping[str, NodeObserved]) -> dict[str, NodeState]:
    """What each node that is alive to the GSLB reports (the input `judge` needs)."""
    return {
        name: o.heartbeat.state
        for name, o in observed.items()
        if o.liveness is Liveness.ALIVE and o.heartbeat is not None
    }


def alive_services(observed: Mapping[str, NodeObserved]) -> dict[str, dict[str, ServiceState]]:
    """Per node alive to the GSLB that reports services of its own, their states."""
    result = {}
    for name, o in observed.items():
        if o.liveness is Liveness.ALIVE and o.heartbeat is not None:
            reported = {s.name: s.state for s in o.heartbeat.services}
            if set(reported) - {IMPLICIT_SERVICE}:
                result[name] = reported
    return result


def _drained(state: DesiredState, kind: DrainKind, name: str, service: str | None) -> bool:
    return any(d.kind is kind and d.name == name and d.service == service for d in state.drains)


def site_out_as_a_whole(state: DesiredState, site: str, service: str | None = None) -> bool:
    """The site takes no traffic (of `service`, when given) by the operator's will."""
    spec = state.sites.get(site)
    if spec is None or spec.weight == 0 or _drained(state, DrainKind.SITE, site, None):
        return True
    if service is None:
        return False
    own = state.service_weights.get(service)
    weight = own.sites.get(site, spec.weight) if own else spec.weight
    return weight == 0 or _drained(state, DrainKind.SITE, site, service)


def in_service(
    state: DesiredState, node: str, alive: Mapping[str, NodeState], service: str | None = None
) -> bool:
    spec = state.nodes.get(node)
    if spec is None or alive.get(node) not in _SERVING or spec.weight == 0:
        return False
    if site_out_as_a_whole(state, spec.site, service):
        return False
    if _drained(state, DrainKind.NODE, node, None):
        return False
    if service is None:
        return True
    own = state.service_weights.get(service)
    if own is not None and own.nodes.get(node, spec.weight) == 0:
        return False
    return not _drained(state, DrainKind.NODE, node, service)


def _healthy_for(
    node: str, service: str | None, services: Mapping[str, Mapping[str, ServiceState]]
) -> bool:
    if service is None or node not in services:
        return True
    own = services[node].get(service)
    return own is not None and own.serving


def tallies(
    state: DesiredState,
    alive: Mapping[str, NodeState],
    service: str | None = None,
    services: Mapping[str, Mapping[str, ServiceState]] | None = None,
) -> dict[str, Tally]:
    """Per site name and for FLEET: healthy capacity, capacity in service, nodes out (of
    one service, when given; `services`: what the nodes report of theirs)."""
    result: dict[str, Tally] = {FLEET: Tally()}
    for name, spec in state.nodes.items():
        if alive.get(name) not in _HEALTHY or not _healthy_for(name, service, services or {}):
            continue
        serving = in_service(state, name, alive, service)
        result[spec.site] = result.get(spec.site, Tally()).plus(spec.capacity_mbps, serving)
        result[FLEET] = result[FLEET].plus(spec.capacity_mbps, serving)
    return result


def _breaches_of(scope: str, before: Tally, after: Tally, limits: Limits) -> Iterable[BudgetBreach]:
    minimum = limits.min_share * after.healthy_mbps
    if after.in_service_mbps < minimum and after.in_service_mbps < before.in_service_mbps:
        yield _breach(scope, BudgetBound.MIN_SHARE, before, after, limits)
    if limits.max_out is not None and after.out > limits.max_out and after.out > before.out:
        yield _breach(scope, BudgetBound.MAX_OUT, before, after, limits)


def _breach(
    scope: str, bound: BudgetBound, before: Tally, after: Tally, limits: Limits
) -> BudgetBreach:
    return BudgetBreach(
        scope=scope,
        bound=bound,
        healthy_mbps=after.healthy_mbps,
        in_service_mbps=before.in_service_mbps,
        would_leave_mbps=after.in_service_mbps if bound is not BudgetBound.SERVICE else 0,
        min_share=limits.min_share,
        min_in_service_mbps=limits.min_share * after.healthy_mbps,
        out=before.out,
        would_be_out=after.out,
        max_out=limits.max_out,
    )


def _withdrawn_services(before: DesiredState, after: DesiredState) -> list[str]:
    """The services whose prefixes stop being announced, when none of before's stays."""
    kept = {s.prefix for s in after.services.values()} & {
        s.prefix for s in before.services.values()
    }
    if kept:
        return []
    return sorted(before.services)


def _judge_scopes(
    after: DesiredState,
    was: Mapping[str, Tally],
    will: Mapping[str, Tally],
    budget: Budget,
    service: str | None,
) -> dict[str, list[BudgetBreach]]:
    """Per node-level scope (FLEET, "site <name>"), the breaches found there (of `service`'s
    scopes, when given)."""
    prefix = "" if service is None else f"service {service} "
    found: dict[str, list[BudgetBreach]] = {}
    for site in sorted(set(will) - {FLEET}):
        if site_out_as_a_whole(after, site, service):
            continue
        scope = f"site {site}"
        found[scope] = list(
            _breaches_of(prefix + scope, was.get(site, Tally()), will[site], budget.site)
        )
    fleet_scope = FLEET if service is None else f"service {service}"
    found[FLEET] = list(_breaches_of(fleet_scope, was[FLEET], will[FLEET], budget.fleet))
    return found


def judge(
    before: DesiredState,
    after: DesiredState,
    alive: Mapping[str, NodeState],
    budget: Budget,
    services: Mapping[str, Mapping[str, ServiceState]] | None = None,
) -> list[BudgetBreach]:
    """Every bound the change from `before` to `after` would break; empty: allowed.
    `services`: per node, the states of the services it reports (`alive_services`)."""
    was, will = tallies(before, alive), tallies(after, alive)
    node_level = _judge_scopes(after, was, will, budget, None)
    breaches = [b for found in node_level.values() for b in found]
    for service in sorted(set(before.services) | set(after.services)):
        service_was = tallies(before, alive, service, services)
        service_will = tallies(after, alive, service, services)
        found = _judge_scopes(after, service_was, service_will, budget, service)
        for scope, scope_breaches in found.items():
            already = {b.bound for b in node_level.get(scope, [])}
            breaches += [b for b in scope_breaches if b.bound not in already]
    fleet_after = will[FLEET]
    for service in _withdrawn_services(before, after):
        if was[FLEET].in_service_mbps > 0:
            breaches.append(
                _breach(
                    f"service {service}", BudgetBound.SERVICE, was[FLEET], fleet_after, budget.fleet
                )
            )
    return breaches


def describe(breach: BudgetBreach) -> str:
    """One line: what is in service, what the change would leave, what is allowed."""
    if breach.bound == BudgetBound.MAX_OUT:
        return (
            f"{breach.scope}: {breach.out} of its healthy nodes out now, this would make it "
            f"{breach.would_be_out}; at most {breach.max_out} allowed"
        )
    if breach.bound == BudgetBound.SERVICE:
        return (
            f"{breach.scope}: withdrawn from {breach.in_service_mbps} Mbit/s in service; "
            "withdrawing every served prefix needs an override"
        )
    return (
        f"{breach.scope}: {breach.in_service_mbps} of {breach.healthy_mbps} Mbit/s healthy "
        f"capacity in service, this would leave {breach.would_leave_mbps}; at least "
        f"{breach.min_in_service_mbps:g} ({breach.min_share:.0%}) must stay"
    )
