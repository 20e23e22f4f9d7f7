"""The announcement policy: (node condition, weight, drain, config) -> advertisements + reason.

Pure: no I/O, no clock, no asyncio. In the manner of MetalLB's `should_announce`, every
decision carries a reason code so the agent can say *why* a prefix is or is not announced.
Fail closed: nothing is announced until the node's health has risen.
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from bgp.config import BgpConfig

GRACEFUL_SHUTDOWN = "65535:0"  # RFC 8326
AS_TRANS = 23456  # stands in for a 4-byte ASN in 2-byte fields (RFC 6793)


class NodeCondition(enum.StrEnum):
    """The edge node's state, by the same names as the edge's state machine."""

    STARTING = "starting"
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    DRAINING = "draining"
    DOWN = "down"


class Reason(enum.StrEnum):
    ANNOUNCE_HEALTHY = "announce: node healthy"
    ANNOUNCE_DEGRADED = "announce: node degraded but serving"
    ANNOUNCE_DRAINING = "announce: draining, with GRACEFUL_SHUTDOWN and prepends"
    WITHDRAW_STARTING = "withdraw: health has not risen yet"
    WITHDRAW_DOWN = "withdraw: node down"
    WITHDRAW_ZERO_WEIGHT = "withdraw: desired weight is 0"
    WITHDRAW_INVALID_WEIGHT = "withdraw: desired weight is not a finite number >= 0"
    WITHDRAW_DRAINED = "withdraw: drain finished, traffic has moved"

    @property
    def announces(self) -> bool:
        return self.name.startswith("ANNOUNCE")


@dataclass(frozen=True, slots=True)
class Advertisement:
    """One prefix as it should appear on the wire. Hashable: the driver diffs sets of them."""

    prefix: IPv4Network
    next_hop: IPv4Address
    med: int
    # How many extra copies of the local ASN go in front of the AS path.
    as_path_prepends: int
    local_asn: int
    communities: tuple[str, ...]
    # Link bandwidth in bytes per second (the unit of RFC draft-ietf-idr-link-bandwidth).
    link_bandwidth_bytes_per_s: float

    @property
    def extended_communities(self) -> tuple[str, ...]:
        return (transitive_link_bandwidth(self.local_asn, self.link_bandwidth_bytes_per_s),)


@dataclass(frozen=True, slots=True)
class PolicyInputs:
    condition: NodeCondition
    config: BgpConfig
    # Desired weight from the GSLB: 0 withdraws, 1.0 is the node's full capacity.
    weight: float = 1.0
    # The operator asked to drain this node (admin state, kept apart from health).
    operator_drain: bool = False
    # The drain choreography saw traffic leave: the draining announcement can go.
    drain_complete: bool = False


def transitive_link_bandwidth(local_asn: int, bytes_per_s: float) -> str:
    """The link-bandwidth extended community in its *transitive* form, as a raw 8-byte
    ExaBGP extended community: type 0x00 (transitive two-octet AS), subtype 0x04, the AS
    in 2 bytes and an IEEE 754 float of bytes/s. ExaBGP's `bandwidth:` keyword sends the
    non-transitive type 0x40, which FRR does not pass on over eBGP."""
    asn16 = local_asn if local_asn <= 0xFFFF else AS_TRANS
    value = struct.pack(">BBHf", 0x00, 0x04, asn16, bytes_per_s)
    return "0x" + value.hex().upper()


def link_bandwidth_bytes_per_s(weight: float, capacity_mbps: float) -> float:
    return weight * capacity_mbps * 1_000_000 / 8


def should_announce(inputs: PolicyInputs) -> tuple[bool, Reason]:
    """Whether this node's prefixes should be announced, and why."""
    weight_ok = math.isfinite(inputs.weight) and inputs.weight >= 0
    condition = inputs.condition
    if condition is NodeCondition.STARTING:
        return False, Reason.WITHDRAW_STARTING
    if condition is NodeCondition.DOWN:
        return False, Reason.WITHDRAW_DOWN
    if not weight_ok:
        return False, Reason.WITHDRAW_INVALID_WEIGHT
    draining = condition is NodeCondition.DRAINING or inputs.operator_drain
    if draining and inputs.drain_complete:
        return False, Reason.WITHDRAW_DRAINED
    if inputs.weight == 0:
        return False, Reason.WITHDRAW_ZERO_WEIGHT
    if draining:
        return True, Reason.ANNOUNCE_DRAINING
    if condition is NodeCondition.DEGRADED:
        return True, Reason.ANNOUNCE_DEGRADED
    return True, Reason.ANNOUNCE_HEALTHY


def advertisements(inputs: PolicyInputs) -> tuple[frozenset[Advertisement], Reason]:
    """The full desired set for this node (empty = withdraw everything) and the reason."""
    announce, reason = should_announce(inputs)
    if not announce:
        return frozenset(), reason
    config = inputs.config
    draining = reason is Reason.ANNOUNCE_DRAINING
    communities = list(dict.fromkeys(config.communities))
    if draining and GRACEFUL_SHUTDOWN not in communities:
        communities.append(GRACEFUL_SHUTDOWN)
    bandwidth = link_bandwidth_bytes_per_s(inputs.weight, config.capacity_mbps)
    return (
        frozenset(
            Advertisement(
                prefix=prefix,
                next_hop=config.local_address,
                med=config.med,
                as_path_prepends=config.drain_prepends if draining else 0,
                local_asn=config.local_asn,
                communities=tuple(sorted(communities)),
                link_bandwidth_bytes_per_s=bandwidth,
            )
            for prefix in config.prefixes
        ),
        reason,
    )


__all__ = [
    "GRACEFUL_SHUTDOWN",
    "Advertisement",
    "NodeCondition",
    "PolicyInputs",
    "Reason",
    "advertisements",
    "link_bandwidth_bytes_per_s",
    "should_announce",
    "transitive_link_bandwidth",
]
