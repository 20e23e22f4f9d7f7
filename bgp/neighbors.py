"""What each neighbor gets: one node-wide `Advertisement` + one neighbor's config -> the
route as that neighbor should see it on the wire.

Pure: no I/O. The policy (`bgp.policy`) decides *whether* and with which node-wide
attributes; this module only shapes them per session:
- eBGP: AS_PATH is our ASN once, plus the policy's drain prepends, plus the neighbor's own
  prepends; MED is the neighbor's when it has one; communities and large communities are
  the node's plus the neighbor's; link-bandwidth in the encoding the neighbor wants.
- iBGP (peer_asn == local_asn): AS_PATH empty (the peer adds nothing either; our ASN in
  it would look like a loop), no prepends; LOCAL_PREF carries preference, and a drain
  (GRACEFUL_SHUTDOWN in the communities) lowers it to `drain_local_pref`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from bgp.config import BgpConfig, Family, IPAddress, IPNetwork, LinkBandwidth, Neighbor
from bgp.policy import AS_TRANS, GRACEFUL_SHUTDOWN, Advertisement

_LINK_BANDWIDTH_TYPE = {LinkBandwidth.TRANSITIVE: 0x00, LinkBandwidth.NON_TRANSITIVE: 0x40}


@dataclass(frozen=True, slots=True)
class NeighborRoute:
    """One prefix as one neighbor gets it. Hashable: the driver diffs sets of them."""

    prefix: IPNetwork
    next_hop: IPAddress
    med: int
    as_path: tuple[int, ...]
    communities: tuple[str, ...]
    large_communities: tuple[str, ...]
    extended_communities: tuple[str, ...]
    # Only for iBGP; None on eBGP sessions (LOCAL_PREF is not sent there).
    local_pref: int | None


def is_ibgp(config: BgpConfig, neighbor: Neighbor) -> bool:
    return neighbor.peer_asn == config.local_asn


def link_bandwidth_community(mode: LinkBandwidth, asn: int, bytes_per_s: float) -> str | None:
    """The link-bandwidth extended community as ExaBGP's raw 8 bytes: type (0x00
    transitive or 0x40 non-transitive), subtype 0x04, the AS in 2 bytes (AS_TRANS for a
    4-byte ASN) and an IEEE 754 float of bytes/s. None when the neighbor wants none."""
    if mode is LinkBandwidth.OFF:
        return None
    asn16 = asn if asn <= 0xFFFF else AS_TRANS
    value = struct.pack(">BBHf", _LINK_BANDWIDTH_TYPE[mode], 0x04, asn16, bytes_per_s)
    return "0x" + value.hex().upper()


def route_for(adv: Advertisement, neighbor: Neighbor, config: BgpConfig) -> NeighborRoute:
    draining = GRACEFUL_SHUTDOWN in adv.communities
    ibgp = is_ibgp(config, neighbor)
    if ibgp:
        as_path: tuple[int, ...] = ()
        local_pref: int | None = neighbor.drain_local_pref if draining else neighbor.local_pref
    else:
        as_path = (adv.local_asn,) * (1 + adv.as_path_prepends + neighbor.prepends)
        local_pref = None
    bandwidth = link_bandwidth_community(
        neighbor.link_bandwidth, adv.local_asn, adv.link_bandwidth_bytes_per_s
    )
    return NeighborRoute(
        prefix=adv.prefix,
        next_hop=adv.next_hop,
        med=adv.med if neighbor.med is None else neighbor.med,
        as_path=as_path,
        communities=tuple(sorted({*adv.communities, *neighbor.communities})),
        large_communities=tuple(
            sorted({*config.large_communities, *adv.large_communities, *neighbor.large_communities})
        ),
        extended_communities=() if bandwidth is None else (bandwidth,),
        local_pref=local_pref,
    )


def routes_for(
    advertisements: Iterable[Advertisement], neighbor: Neighbor, config: BgpConfig
) -> frozenset[NeighborRoute]:
    """The routes `neighbor` gets: those of the families its session carries."""
    carried = neighbor.carried
    return frozenset(
        route_for(adv, neighbor, config)
        for adv in advertisements
        if Family.of(adv.prefix) in carried
    )


__all__ = [
    "NeighborRoute",
    "is_ibgp",
    "link_bandwidth_community",
    "route_for",
    "routes_for",
]
