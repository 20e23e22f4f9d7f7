"""The kernel state of forwarding, as pure functions of the config: the nft table, the
ip rules and routes, the sysctls. The drivers apply exactly this and remove exactly this.

Data path on every edge (IPv4):
- nft, prerouting at raw priority (before conntrack and routing): a TCP packet to a
  shared VIP that arrived on the peers' interface was forwarded by a peer: it is never
  forwarded again; if our map names an owner for it (stale maps pointing at each other)
  it is dropped and counted as a loop, otherwise delivered here. Other SYNs are left
  alone. A non-SYN packet whose (client, client port, VIP, VIP port) is in the map gets
  the owner's mark and is not tracked (conntrack would see half a flow here).
- ip rules: `fwmark M lookup T` per peer, before the `local` rule (moved from pref 0 to
  after them: otherwise a marked packet to the VIP is delivered locally and reset);
  table T holds `VIP/32 via PEER dev peer_interface`.
- sysctls: ip_forward on, early demux off (it would attach a moved packet to a leftover
  local socket), rp_filter loose on the peers' interface (the owner receives the
  client's packets there while its route to the client is elsewhere).
- across sites, the peers' interface is a VXLAN device the agent builds (`overlay`):
  the edges share no L2, their routed (underlay) addresses carry the segment.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from edge.config import FlowShareConfig, NodeConfig
from edge.flowshare.wire import FlowKey

TABLE = "anycast_edge_flows"
MAP4 = "owners4"
LOCAL_TABLE = 255
ELEMENTS_PER_COMMAND = 20_000

Vip = tuple[str, int]  # address, port


def shared_vips(config: NodeConfig) -> dict[str, Vip]:
    """Listener name -> (VIP, port) for listeners bound to one IPv4 address (a wildcard
    listener's flows have no VIP to share; IPv6 flows are shared but not forwarded), of
    every service of the node (`services:`, or the one implicit service)."""
    vips: dict[str, Vip] = {}
    for listener in config.all_listeners():
        address = ipaddress.ip_address(listener.address)
        if not address.is_unspecified:
            vips[listener.name] = (str(address), listener.port)
    return vips


def peer_marks(config: FlowShareConfig) -> dict[str, int]:
    return {peer.name: config.mark_base + i for i, peer in enumerate(config.peers, 1)}


def peer_tables(config: FlowShareConfig) -> dict[str, int]:
    return {peer.name: config.table_base + i for i, peer in enumerate(config.peers, 1)}


def local_rule_pref(config: FlowShareConfig) -> int:
    """Where the `local` rule goes: right after the fwmark rules."""
    return config.rule_pref + len(config.peers) + 1


def _vip_set(vips: Iterable[Vip]) -> str:
    v4 = sorted({(a, p) for a, p in vips if ipaddress.ip_address(a).version == 4})
    return "{ " + ", ".join(f"{a} . {p}" for a, p in v4) + " }"


#: The table's chains (counters are read from these, never from a listing of the table).
CHAINS = ("classify", "forwarded")


def ruleset(config: FlowShareConfig, vips: Iterable[Vip]) -> str:
    """The whole table, replacing any previous one in one transaction (`nft -f`)."""
    vip_set = _vip_set(vips)
    marks = peer_marks(config)
    key = "ip saddr . tcp sport . ip daddr . tcp dport"
    forwarded = "\n".join(
        f'\t\tmeta mark {mark:#x} counter comment "to {name}"' for name, mark in marks.items()
    )
    return f"""add table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
\tset vips4 {{
\t\ttype ipv4_addr . inet_service
\t\telements = {vip_set}
\t}}
\tmap {MAP4} {{
\t\ttype ipv4_addr . inet_service . ipv4_addr . inet_service : mark
\t}}
\tchain classify {{
\t\ttype filter hook prerouting priority raw; policy accept;
\t\tmeta nfproto != ipv4 return
\t\tmeta l4proto != tcp return
\t\tip daddr . tcp dport != @vips4 return
\t\tiifname "{config.peer_interface}" {key} @{MAP4} counter drop comment "loop"
\t\tiifname "{config.peer_interface}" counter return comment "from peers"
\t\ttcp flags & syn == syn return
\t\tmeta mark set {key} map @{MAP4} notrack counter comment "moved"
\t}}
\tchain forwarded {{
\t\ttype filter hook forward priority filter; policy accept;
{forwarded}
\t}}
}}
"""


def _element(key: FlowKey) -> str:
    return f"{key.client} . {key.client_port} . {key.vip} . {key.vip_port}"


def element_commands(deletes: Sequence[FlowKey], adds: Mapping[FlowKey, int]) -> str:
    """nft commands applying a map change (one `nft -f` = one transaction)."""
    lines = []
    dels = [k for k in deletes if k.family == 4]
    for i in range(0, len(dels), ELEMENTS_PER_COMMAND):
        chunk = ", ".join(_element(k) for k in dels[i : i + ELEMENTS_PER_COMMAND])
        lines.append(f"delete element inet {TABLE} {MAP4} {{ {chunk} }}")
    items = [(k, m) for k, m in adds.items() if k.family == 4]
    for i in range(0, len(items), ELEMENTS_PER_COMMAND):
        chunk = ", ".join(f"{_element(k)} : {m:#x}" for k, m in items[i : i + ELEMENTS_PER_COMMAND])
        lines.append(f"add element inet {TABLE} {MAP4} {{ {chunk} }}")
    return "\n".join(lines) + ("\n" if lines else "")


@dataclass(frozen=True, slots=True)
class Rule:
    pref: int
    table: int
    fwmark: int | None = None  # None: every packet (the `local` rule)


@dataclass(frozen=True, slots=True)
class Route:
    table: int
    destination: str  # "VIP/32"
    gateway: str
    device: str


@dataclass(frozen=True, slots=True)
class RoutingPlan:
    rules: tuple[Rule, ...]  # to add (the fwmark rules and the moved `local` rule)
    routes: tuple[Route, ...]
    remove_rules: tuple[Rule, ...]  # to delete once the others are in (`local` at pref 0)


@dataclass(frozen=True, slots=True)
class OverlayPlan:
    """The VXLAN device among the edges: head-end replication to every peer's underlay
    address (an all-zero FDB entry each), no learning, `local_address` on it."""

    device: str
    vni: int
    port: int
    local: str  # underlay source
    address: str  # on the device
    prefix_len: int
    remotes: tuple[str, ...]


def overlay(config: FlowShareConfig) -> OverlayPlan | None:
    if config.overlay is None:
        return None
    return OverlayPlan(
        device=config.peer_interface,
        vni=config.overlay.vni,
        port=config.overlay.port,
        local=config.overlay.underlay_address,
        address=config.local_address,
        prefix_len=config.overlay.prefix_len,
        remotes=tuple(sorted({p.underlay for p in config.peers if p.underlay is not None})),
    )


def routing(config: FlowShareConfig, vips: Iterable[Vip]) -> RoutingPlan:
    marks, tables = peer_marks(config), peer_tables(config)
    addresses = sorted({a for a, _ in vips if ipaddress.ip_address(a).version == 4})
    rules = [
        Rule(config.rule_pref + i, tables[peer.name], marks[peer.name])
        for i, peer in enumerate(config.peers, 1)
    ]
    rules.append(Rule(local_rule_pref(config), LOCAL_TABLE))
    routes = [
        Route(tables[peer.name], f"{vip}/32", peer.address, config.peer_interface)
        for peer in config.peers
        for vip in addresses
    ]
    return RoutingPlan(tuple(rules), tuple(routes), (Rule(0, LOCAL_TABLE),))


ALL_RP_FILTER = "net/ipv4/conf/all/rp_filter"


def sysctl_writes(wanted: Mapping[str, str], current: Mapping[str, str]) -> dict[str, str]:
    """The writes `wanted` needs, given the `current` values (with `ALL_RP_FILTER`): none
    where the value is already there, and none for a device's rp_filter when conf.all's
    is already loose (the kernel uses the larger of the two). A container's /proc/sys is
    read-only: its sysctls come from the runtime, and nothing needs writing."""
    loose_everywhere = current.get(ALL_RP_FILTER) == "2"
    return {
        name: value
        for name, value in wanted.items()
        if current.get(name) != value
        and not (loose_everywhere and name.endswith("/rp_filter") and value == "2")
    }


def sysctls(config: FlowShareConfig) -> dict[str, str]:
    return {
        "net/ipv4/ip_forward": "1",
        "net/ipv4/ip_early_demux": "0",
        f"net/ipv4/conf/{config.peer_interface}/rp_filter": "2",
    }
