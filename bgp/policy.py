"""The announcement policy: (serving, link bandwidth, config) -> advertisements + reason.

A node may announce several groups of prefixes (one per service, each IPv4 and/or IPv6):
each group has its own `Serving` beside the node's, and a group is announced only when
both say so, with the worse of the two (a node drain or a node down takes every group;
a service down takes only its own prefixes).

Pure: no I/O, no clock, no asyncio. In the manner of MetalLB's `should_announce`, every
decision carries a reason code so the agent can say *why* a prefix is or is not announced.
Fail closed: nothing is announced until the node's health has risen.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from bgp.config import BgpConfig, Family, IPAddress, IPNetwork

GRACEFUL_SHUTDOWN = "65535:0"  # RFC 8326
AS_TRANS = 23456  # stands in for a 4-byte ASN in 2-byte fields (RFC 6793)


class Serving(enum.StrEnum):
    """What the node tells the routers: the policy's own input, in its own words.

    The edge maps its node state and drain phase onto it explicitly (`edge.announcer`, with
    a test pinning the mapping); `bgp` knows nothing of the edge's state machine.
    """

    # Health has not risen yet: fail closed.
    NOT_READY = "not-ready"
    FULL = "full"
    # Serving with less than it should (backends lost, BFD lost): a reduced bandwidth.
    REDUCED = "reduced"
    # A drain is moving traffic away: GRACEFUL_SHUTDOWN and prepends.
    LEAVING = "leaving"
    # A drain has moved the traffic: withdrawn.
    LEFT = "left"
    # Down for health.
    STOPPED = "stopped"


class Reason(enum.StrEnum):
    ANNOUNCE_HEALTHY = "announce: node healthy"
    ANNOUNCE_DEGRADED = "announce: node degraded, at reduced bandwidth"
    ANNOUNCE_DRAINING = "announce: draining, with GRACEFUL_SHUTDOWN and prepends"
    WITHDRAW_STARTING = "withdraw: health has not risen yet"
    WITHDRAW_DOWN = "withdraw: node down"
    WITHDRAW_ZERO_BANDWIDTH = "withdraw: desired link bandwidth is 0"
    WITHDRAW_INVALID_BANDWIDTH = "withdraw: desired link bandwidth is not a finite number >= 0"
    WITHDRAW_DRAINED = "withdraw: drained, traffic has moved"
    # A group's own verdict (the node itself would announce it).
    ANNOUNCE_SERVICE_DEGRADED = "announce: service degraded, at reduced bandwidth"
    WITHDRAW_SERVICE_STARTING = "withdraw: service health has not risen yet"
    WITHDRAW_SERVICE_DOWN = "withdraw: service down"

    @property
    def announces(self) -> bool:
        return self.name.startswith("ANNOUNCE")


MAX_MED = 4294967295


@dataclass(frozen=True, slots=True)
class Advertisement:
    """One prefix as it should appear on the wire. Hashable: the driver diffs sets of them."""

    prefix: IPNetwork
    next_hop: IPAddress
    med: int
    # How many extra copies of the local ASN go in front of the AS path.
    as_path_prepends: int
    local_asn: int
    communities: tuple[str, ...]
    # Link bandwidth in bytes per second (the unit of RFC draft-ietf-idr-link-bandwidth).
    link_bandwidth_bytes_per_s: float
    # Added to the node's (bgp.large_communities) for this prefix's group.
    large_communities: tuple[str, ...] = ()

    @property
    def extended_communities(self) -> tuple[str, ...]:
        return (transitive_link_bandwidth(self.local_asn, self.link_bandwidth_bytes_per_s),)


@dataclass(frozen=True, slots=True)
class PrefixGroup:
    """One service's prefixes and its own attributes (None/empty: the node's)."""

    name: str
    prefixes: tuple[IPNetwork, ...]
    med: int | None = None
    communities: tuple[str, ...] = ()
    large_communities: tuple[str, ...] = ()


#: The group of a node without services: `bgp.prefixes`, always serving in full.
DEFAULT_GROUP = "default"


@dataclass(frozen=True, slots=True)
class PolicyInputs:
    serving: Serving
    config: BgpConfig
    # The link bandwidth to announce at full health, in Mbit/s: the GSLB's share for this
    # node, or (no control plane, or none heard yet) the node's own capacity.
    link_bandwidth_mbps: float
    # The groups announced (none: one group of `config.prefixes`) and each one's own
    # serving (a group not named here has not risen yet: NOT_READY).
    groups: tuple[PrefixGroup, ...] = ()
    group_serving: Mapping[str, Serving] = field(default_factory=dict)
    # A group's own link bandwidth at full health, in Mbit/s (the GSLB's share of this node
    # for that service); a group not named here announces the node's.
    group_link_bandwidth_mbps: Mapping[str, float] = field(default_factory=dict)
    # Added to every prefix's MED: an active-passive group's standby announces with a worse
    # MED than its active (vip_group.announce: bgp), so routers prefer the active.
    med_penalty: int = 0

    def effective_groups(self) -> tuple[PrefixGroup, ...]:
        if self.groups:
            return self.groups
        return (PrefixGroup(DEFAULT_GROUP, tuple(self.config.prefixes)),)

    def serving_of(self, group: PrefixGroup) -> Serving:
        if not self.groups:
            return Serving.FULL
        return self.group_serving.get(group.name, Serving.NOT_READY)

    def link_bandwidth_of(self, group: PrefixGroup) -> float:
        return self.group_link_bandwidth_mbps.get(group.name, self.link_bandwidth_mbps)


def transitive_link_bandwidth(local_asn: int, bytes_per_s: float) -> str:
    """The link-bandwidth extended community in its *transitive* form, as a raw 8-byte
    ExaBGP extended community: type 0x00 (transitive two-octet AS), subtype 0x04, the AS
    in 2 bytes and an IEEE 754 float of bytes/s. ExaBGP's `bandwidth:` keyword sends the
    non-transitive type 0x40, which FRR does not pass on over eBGP."""
    asn16 = local_asn if local_asn <= 0xFFFF else AS_TRANS
    value = struct.pack(">BBHf", 0x00, 0x04, asn16, bytes_per_s)
    return "0x" + value.hex().upper()


def link_bandwidth_bytes_per_s(mbps: float) -> float:
    return mbps * 1_000_000 / 8


def should_announce(inputs: PolicyInputs) -> tuple[bool, Reason]:
    """Whether this node's prefixes should be announced, and why."""
    bandwidth = inputs.link_bandwidth_mbps
    serving = inputs.serving
    if serving is Serving.NOT_READY:
        return False, Reason.WITHDRAW_STARTING
    if serving is Serving.STOPPED:
        return False, Reason.WITHDRAW_DOWN
    if serving is Serving.LEFT:
        return False, Reason.WITHDRAW_DRAINED
    if not (math.isfinite(bandwidth) and bandwidth >= 0):
        return False, Reason.WITHDRAW_INVALID_BANDWIDTH
    if bandwidth == 0:
        return False, Reason.WITHDRAW_ZERO_BANDWIDTH
    if serving is Serving.LEAVING:
        return True, Reason.ANNOUNCE_DRAINING
    if serving is Serving.REDUCED:
        return True, Reason.ANNOUNCE_DEGRADED
    return True, Reason.ANNOUNCE_HEALTHY


def group_decision(inputs: PolicyInputs, group: PrefixGroup) -> tuple[bool, Reason]:
    """Whether one group is announced and why: the node's decision first (a node that
    withdraws withdraws every group), then the group's own serving."""
    announce, reason = should_announce(inputs)
    if not announce:
        return announce, reason
    own = inputs.serving_of(group)
    if own is Serving.LEFT:
        return False, Reason.WITHDRAW_DRAINED
    if own is Serving.STOPPED:
        return False, Reason.WITHDRAW_SERVICE_DOWN
    if own is Serving.NOT_READY:
        return False, Reason.WITHDRAW_SERVICE_STARTING
    bandwidth = inputs.link_bandwidth_of(group)
    if not (math.isfinite(bandwidth) and bandwidth >= 0):
        return False, Reason.WITHDRAW_INVALID_BANDWIDTH
    if bandwidth == 0:
        return False, Reason.WITHDRAW_ZERO_BANDWIDTH
    if own is Serving.LEAVING and reason is not Reason.ANNOUNCE_DRAINING:
        return True, Reason.ANNOUNCE_DRAINING
    if own is Serving.REDUCED and reason is Reason.ANNOUNCE_HEALTHY:
        return True, Reason.ANNOUNCE_SERVICE_DEGRADED
    return True, reason


def group_reasons(inputs: PolicyInputs) -> dict[str, Reason]:
    """Per group (service) name, the reason for its prefixes."""
    return {group.name: group_decision(inputs, group)[1] for group in inputs.effective_groups()}


def announced_mbps(
    inputs: PolicyInputs, reason: Reason | None = None, group: PrefixGroup | None = None
) -> float:
    """The bandwidth on the wire: the desired one (the group's own, given one that has its
    own), reduced while the node (or, given its reason, the group) is degraded."""
    reduced = inputs.serving is Serving.REDUCED or reason is Reason.ANNOUNCE_SERVICE_DEGRADED
    factor = inputs.config.degraded_bandwidth_factor if reduced else 1.0
    mbps = inputs.link_bandwidth_mbps if group is None else inputs.link_bandwidth_of(group)
    return mbps * factor


def advertisements(inputs: PolicyInputs) -> tuple[frozenset[Advertisement], Reason]:
    """The full desired set for this node (empty = withdraw everything) and the node's
    reason (each group's: `group_reasons`)."""
    _, node_reason = should_announce(inputs)
    config = inputs.config
    result: set[Advertisement] = set()
    for group in inputs.effective_groups():
        announce, reason = group_decision(inputs, group)
        if not announce:
            continue
        draining = reason is Reason.ANNOUNCE_DRAINING
        communities = list(dict.fromkeys((*config.communities, *group.communities)))
        if draining and GRACEFUL_SHUTDOWN not in communities:
            communities.append(GRACEFUL_SHUTDOWN)
        bandwidth = link_bandwidth_bytes_per_s(announced_mbps(inputs, reason, group))
        result.update(
            Advertisement(
                prefix=prefix,
                next_hop=config.local_address_for(Family.of(prefix)),
                med=min(
                    MAX_MED, (config.med if group.med is None else group.med) + inputs.med_penalty
                ),
                as_path_prepends=config.drain_prepends if draining else 0,
                local_asn=config.local_asn,
                communities=tuple(sorted(communities)),
                link_bandwidth_bytes_per_s=bandwidth,
                large_communities=tuple(sorted(set(group.large_communities))),
            )
            for prefix in group.prefixes
        )
    return frozenset(result), node_reason


__all__ = [
    "DEFAULT_GROUP",
    "GRACEFUL_SHUTDOWN",
    "Advertisement",
    "PolicyInputs",
    "PrefixGroup",
    "Reason",
    "Serving",
    "advertisements",
    "announced_mbps",
    "group_decision",
    "group_reasons",
    "link_bandwidth_bytes_per_s",
    "should_announce",
    "transitive_link_bandwidth",
]
