"""What a reload (SIGHUP) does to a node's services: pure, no I/O.

`plan_reload` compares the services running with the new node.yaml's and decides, for
every service of either, one step with its reason:

- keep: the same service, unchanged;
- reconfigure: the same name, something of it changed (backends, listeners, prefixes ...):
  applied in place, as a reload always did;
- start: new in the new config (a rename is a remove and a start): its runtime starts,
  its prefixes are announced once its health has risen;
- remove: gone from the new config: drained as a planned change (GRACEFUL_SHUTDOWN,
  stop accepting, open connections up to the drain deadline), then withdrawn and closed.

Or it refuses the reload as a whole (`refused`, one line naming the field), and the agent
then changes nothing. It refuses what cannot be done in one step without two owners of one
thing: a started service that takes a prefix or a listener address a running service still
holds (the one removed drains first: remove it in one reload, add the other in the next),
a service drained by an earlier reload added back before it is gone, a move between
today's single-service shape and `services:`, and a new prefix the running BGP session
cannot carry (`bgp` changes take a restart).

The agent (`edge.agent.Agent.apply_config`) is the driver: it binds the started services'
listeners first (a bind that fails refuses the reload too), then applies the plan.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Sequence, Set
from dataclasses import dataclass

from edge.config import NodeConfig, ServiceConfig, service_prefix_problem


class Action(enum.StrEnum):
    KEEP = "keep"
    RECONFIGURE = "reconfigure"
    START = "start"
    REMOVE = "remove"


@dataclass(frozen=True, slots=True)
class ServiceStep:
    service: str
    action: Action
    reason: str


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """Every service of the running config and of the new one, each in exactly one step.
    `refused`: why the reload changes nothing (then the steps are what it would have done)."""

    steps: tuple[ServiceStep, ...]
    refused: str | None = None

    def names(self, action: Action) -> tuple[str, ...]:
        return tuple(step.service for step in self.steps if step.action is action)

    @property
    def keep(self) -> tuple[str, ...]:
        return self.names(Action.KEEP)

    @property
    def reconfigure(self) -> tuple[str, ...]:
        return self.names(Action.RECONFIGURE)

    @property
    def start(self) -> tuple[str, ...]:
        return self.names(Action.START)

    @property
    def remove(self) -> tuple[str, ...]:
        return self.names(Action.REMOVE)

    @property
    def changes_services(self) -> bool:
        return bool(self.start or self.remove)

    def summary(self) -> str:
        """One line for the log and the event log: what the reload does to the services."""
        parts = [
            f"{action} {', '.join(names)}"
            for action in (Action.START, Action.REMOVE, Action.RECONFIGURE)
            if (names := self.names(action))
        ]
        return "; ".join(parts) or "services unchanged"


_BindKey = tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address, int]


def _binds(service: ServiceConfig) -> dict[_BindKey, int]:
    return {
        (service.vrf or "", ipaddress.ip_address(listener.address), listener.port): number
        for number, listener in enumerate(service.listeners)
    }


def _changed_fields(old: ServiceConfig, new: ServiceConfig) -> list[str]:
    before, after = old.model_dump(mode="json"), new.model_dump(mode="json")
    return [name for name in after if before.get(name) != after.get(name)]


def plan_reload(
    old: NodeConfig,
    new: NodeConfig,
    running: Sequence[ServiceConfig] | None = None,
    draining: Set[str] = frozenset(),
) -> ReloadPlan:
    """The steps from `old` (the running config) to `new`. `running`: the services that
    hold listeners and prefixes now (by default `old`'s; with those an earlier reload
    removed and that are still `draining`)."""
    held = tuple(old.service_list() if running is None else running)
    current = {s.name: s for s in held if s.name not in draining}
    wanted = {s.name: s for s in new.service_list()}
    steps: list[ServiceStep] = []
    for name, service in current.items():
        if name not in wanted:
            steps.append(ServiceStep(name, Action.REMOVE, "not in the new config: drained"))
        elif (fields := _changed_fields(service, wanted[name])) != []:
            steps.append(ServiceStep(name, Action.RECONFIGURE, f"changed: {', '.join(fields)}"))
        else:
            steps.append(ServiceStep(name, Action.KEEP, "unchanged"))
    steps.extend(
        ServiceStep(name, Action.START, "new in the config: announced once healthy")
        for name in wanted
        if name not in current
    )
    plan = ReloadPlan(tuple(steps))
    return ReloadPlan(plan.steps, _refusal(old, new, held, draining, plan))


def _refusal(
    old: NodeConfig,
    new: NodeConfig,
    held: Sequence[ServiceConfig],
    draining: Set[str],
    plan: ReloadPlan,
) -> str | None:
    if old.implicit_service != new.implicit_service:
        return (
            "services: moving between the single-service shape and services: takes a "
            "restart (the running config stays)"
        )
    removed = set(plan.remove)
    prefixes = {prefix: s.name for s in held for prefix in s.prefixes}
    binds = {key: s.name for s in held for key in _binds(s)}
    for index, service in enumerate(new.services):
        where = f"services.{index}"
        if service.name in draining:
            return (
                f"{where}.name: service {service.name} is still draining after an earlier "
                "reload; add it again once it is gone"
            )
        for prefix in service.prefixes:
            owner = prefixes.get(prefix)
            if owner is not None and owner != service.name:
                return f"{where}.prefixes: {prefix} {_still_held(owner, removed, draining)}"
            problem = None if owner or old.bgp is None else service_prefix_problem(prefix, old.bgp)
            if problem:
                return f"{where}.prefixes: {problem} (bgp changes take a restart)"
        for key, number in _binds(service).items():
            if (owner := binds.get(key)) is not None and owner != service.name:
                _, address, port = key
                return (
                    f"{where}.listeners.{number}: {address} port {port} "
                    f"{_still_held(owner, removed, draining)}"
                )
    return None


def _still_held(owner: str, removed: Set[str], draining: Set[str]) -> str:
    if owner in removed or owner in draining:
        return (
            f"is still service {owner}'s, which drains first: remove it in one reload, "
            "add the new service in the next"
        )
    return f"is still service {owner}'s: release it in one reload, take it in the next"


__all__ = ["Action", "ReloadPlan", "ServiceStep", "plan_reload"]
