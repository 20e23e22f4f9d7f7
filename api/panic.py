"""Fail open toward the data plane: when the GSLB cannot trust its own view of liveness, it
keeps nodes at what they last reported instead of turning them off (Envoy's panic
threshold).

Pure: no I/O, no clock (the caller passes how long the API has been up). `decide` says,
per site and for the fleet, whether the view is trusted; `hold` rewrites the observed
liveness of nodes in untrusted scopes to ALIVE with their last heartbeat, so the weight
math (api/gslb.py, unchanged) computes the weights they had when they were last heard.

Two reasons to distrust the view:
- STARTING: the API has been up for less than one heartbeat TTL. Leases that expired while
  it was down say nothing about the nodes: it has not had the chance to hear them yet.
- PANIC: fewer than `threshold` of a site's (or the fleet's) nodes that ever reported look
  alive (among at least MIN_REPORTED of them). Losing most of a site at once is more
  likely a fault between the nodes and the API (a partition, a store problem) than most
  of a site dying; the nodes' own health still decides their own announcement at the
  edge either way.

Nodes never heard from are never held (there is nothing to keep). A node that reports
`down` or `draining` is alive, and is judged by what it reports.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from contract.schemas import DesiredState, Liveness, NodeObserved

FLEET = "fleet"
#: A scope with fewer reporting nodes never panics: one node's death is seen directly (its
#: lease expired), it is not evidence that the GSLB's view of many nodes is wrong.
MIN_REPORTED = 2


class Trust(enum.StrEnum):
    TRUSTED = "trusted"
    STARTING = "starting"  # up for less than one heartbeat TTL
    PANIC = "panic"  # too few nodes alive


@dataclass(frozen=True, slots=True)
class ScopeView:
    scope: str  # FLEET or a site name
    trust: Trust
    alive: int
    reported: int  # nodes that ever sent a heartbeat

    def describe(self) -> str:
        if self.trust is Trust.STARTING:
            return f"{self.scope}: API starting, liveness not judged for one heartbeat TTL"
        return (
            f"{self.scope}: only {self.alive} of {self.reported} nodes alive, below the panic "
            "threshold: keeping their last weights"
        )


@dataclass(frozen=True, slots=True)
class PanicDecision:
    scopes: tuple[ScopeView, ...]  # every scope not TRUSTED

    @property
    def held_sites(self) -> frozenset[str]:
        return frozenset(v.scope for v in self.scopes)

    def holds(self, site: str) -> bool:
        return bool(self.scopes) and (site in self.held_sites or FLEET in self.held_sites)


def _count(observed: Mapping[str, NodeObserved], names: list[str]) -> tuple[int, int]:
    reported = [observed[n] for n in names if n in observed and observed[n].heartbeat]
    alive = sum(o.liveness is Liveness.ALIVE for o in reported)
    return alive, len(reported)


def decide(
    desired: DesiredState,
    observed: Mapping[str, NodeObserved],
    *,
    threshold: float,
    up_s: float,
    heartbeat_ttl_s: float,
) -> PanicDecision:
    """Which scopes' liveness the GSLB should not act on. `threshold` in 0..1 (0: never
    panic); `up_s`: how long this API has been serving."""
    if up_s < heartbeat_ttl_s:
        alive, reported = _count(observed, list(desired.nodes))
        return PanicDecision((ScopeView(FLEET, Trust.STARTING, alive, reported),))
    scopes: list[ScopeView] = []
    by_site: dict[str, list[str]] = {FLEET: list(desired.nodes)}
    for name, spec in desired.nodes.items():
        by_site.setdefault(spec.site, []).append(name)
    for scope, names in sorted(by_site.items()):
        alive, reported = _count(observed, names)
        if reported >= MIN_REPORTED and alive < threshold * reported:
            scopes.append(ScopeView(scope, Trust.PANIC, alive, reported))
    return PanicDecision(tuple(scopes))


def hold(
    desired: DesiredState, observed: Mapping[str, NodeObserved], decision: PanicDecision
) -> dict[str, NodeObserved]:
    """The observed view the weights are computed from: nodes in held scopes that have a
    last heartbeat count as alive with it."""
    result = dict(observed)
    if not decision.scopes:
        return result
    for name, spec in desired.nodes.items():
        o = observed.get(name)
        held = o is not None and o.heartbeat is not None and decision.holds(spec.site)
        if held and o is not None and o.liveness is not Liveness.ALIVE:
            result[name] = o.model_copy(update={"liveness": Liveness.ALIVE})
    return result
