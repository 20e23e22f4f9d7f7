"""node.yaml: the edge node's configuration, validated once at start and on SIGHUP.

Every error is reported as one line naming the field and what was expected; the
caller exits 2 and starts nothing. An unreachable backend is not a config error:
it is a health verdict.
"""

from __future__ import annotations

import enum
import ipaddress
import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from bgp.config import (
    BgpConfig,
    Community,
    IPNetwork,
    LargeCommunity,
    StrictScalars,
    check_addresses_are_local,
    describe_validation_error,
    outside_range,
)
from edge.vip.election import MIN_LEASE_MARGIN_S, QUORUM_MARGIN_S
from edge.vip.heartbeat import MIN_KEY_BYTES


class ConfigError(Exception):
    """A configuration problem, already phrased as one line for the operator."""


class _Model(StrictScalars):
    model_config = ConfigDict(extra="forbid", frozen=True)


Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0, le=86400)]


def _check_ip(value: str) -> str:
    ipaddress.ip_address(value)
    return value


class ListenerKind(enum.StrEnum):
    TCP = "tcp"
    HTTP = "http"


class ListenerConfig(_Model):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    kind: ListenerKind
    address: str
    port: Port
    backlog: Annotated[int, Field(ge=1, le=65535)] = 1024

    _address = field_validator("address")(classmethod(lambda cls, v: _check_ip(v)))


class BackendConfig(_Model):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    address: str
    port: Port
    weight: Annotated[int, Field(ge=1, le=1000)] = 1

    _address = field_validator("address")(classmethod(lambda cls, v: _check_ip(v)))


class Algorithm(enum.StrEnum):
    ROUND_ROBIN = "round_robin"
    LEAST_CONNECTIONS = "least_connections"
    WEIGHTED = "weighted"
    MAGLEV = "maglev"


class HashKeyKind(enum.StrEnum):
    CLIENT_ADDRESS = "client_address"
    HEADER = "header"
    COOKIE = "cookie"


class HashKeyConfig(_Model):
    kind: HashKeyKind = HashKeyKind.CLIENT_ADDRESS
    # Header or cookie name when kind is header or cookie.
    name: str | None = None

    @model_validator(mode="after")
    def _name_when_needed(self) -> HashKeyConfig:
        if self.kind is not HashKeyKind.CLIENT_ADDRESS and not self.name:
            raise ValueError(f"a {self.kind} hash key needs a name")
        return self


class PoolConfig(_Model):
    algorithm: Algorithm = Algorithm.ROUND_ROBIN
    hash_key: HashKeyConfig = HashKeyConfig()
    # Maglev lookup table size; must be prime and well above the backend count.
    maglev_table_size: Annotated[int, Field(ge=7, le=1_000_003)] = 65537
    # Session affinity: a client key (hash_key) keeps the backend it first got while that
    # one is eligible, whatever the algorithm; in active-passive mode the table travels to
    # the standby in the heartbeats, so a failover keeps every sticky client's backend.
    sticky: bool = False

    @field_validator("maglev_table_size")
    @classmethod
    def _prime(cls, value: int) -> int:
        if value < 2 or any(value % d == 0 for d in range(2, int(value**0.5) + 1)):
            raise ValueError("must be a prime number")
        return value


class CheckKind(enum.StrEnum):
    TCP = "tcp"
    HTTP = "http"


class ActiveCheckConfig(_Model):
    kind: CheckKind = CheckKind.TCP
    path: Annotated[str, Field(pattern=r"^/")] = "/"
    expect_status: Annotated[int, Field(ge=100, le=599)] = 200
    host: str | None = None
    interval: Seconds = 1.0
    timeout: Seconds = 0.5
    rise: Annotated[int, Field(ge=1, le=100)] = 2
    fall: Annotated[int, Field(ge=1, le=100)] = 3

    @model_validator(mode="after")
    def _timeout_within_interval(self) -> ActiveCheckConfig:
        if self.timeout > self.interval:
            raise ValueError("timeout must not exceed interval")
        return self


class PassiveCheckConfig(_Model):
    """Outlier ejection from live traffic (as Envoy's outlier detection): sustained
    evidence only, never the last healthy backends, ejection time backing off."""

    enabled: bool = True
    # 502/503/504 answers count as evidence (failed connects and first-byte timeouts always do).
    eject_on_gateway_errors: bool = True
    # Consecutive failed requests (one per request, retries not counted) before an ejection.
    consecutive_failures: Annotated[int, Field(ge=1, le=1000)] = 5
    # At most this share of the backends is ejected at once: the rest keep serving.
    max_ejected_share: Annotated[float, Field(gt=0, le=1)] = 0.5
    # First ejection time; each further ejection doubles it, up to max_ejection_time.
    ejection_time: Seconds = 10.0
    max_ejection_time: Seconds = 300.0

    @model_validator(mode="after")
    def _ordered(self) -> PassiveCheckConfig:
        if self.max_ejection_time < self.ejection_time:
            raise ValueError("max_ejection_time must not be below ejection_time")
        return self


class HealthConfig(_Model):
    active: ActiveCheckConfig = ActiveCheckConfig()
    passive: PassiveCheckConfig = PassiveCheckConfig()


class StateConfig(_Model):
    # Share of healthy backends below which the node is degraded (1.0: any loss degrades).
    degraded_below: Annotated[float, Field(gt=0, le=1)] = 1.0
    # Share of healthy backends below which the node is down and must not take traffic.
    down_below: Annotated[float, Field(gt=0, le=1)] = 0.5

    @model_validator(mode="after")
    def _ordered(self) -> StateConfig:
        if self.down_below > self.degraded_below:
            raise ValueError("down_below must not exceed degraded_below")
        return self


class DrainConfig(_Model):
    # How long listeners keep accepting after a drain starts, so routers can move
    # traffic first (replaced by the BGP choreography when BGP is configured).
    accept_grace: Annotated[float, Field(ge=0, le=3600)] = 0.0
    # Deadline for open connections to finish once listeners stop accepting.
    deadline: Seconds = 30.0


class TimeoutConfig(_Model):
    """One meaning each (README: Timeouts). None of the client timers counts against a
    backend, and a slow client never makes a backend look slow."""

    # A client's request head must be complete within this (from its first byte).
    client_header: Seconds = 10.0
    # A request body must make progress at least this often (each read resets it).
    client_body_idle: Seconds = 30.0
    # An idle keep-alive client connection is closed after this.
    keep_alive_idle: Seconds = 60.0
    # A new backend connection must be established within this.
    upstream_connect: Seconds = 2.0
    # The backend's first response byte must arrive within this of the request having
    # been sent in full (a slow upload does not eat into it).
    upstream_first_byte: Seconds = 30.0
    # After the first byte, the backend must send something at least this often (not
    # counted while the client is the one not reading).
    upstream_read_idle: Seconds = 60.0
    # An idle pooled backend connection is closed after this.
    upstream_idle: Seconds = 30.0
    # An L4 flow with no byte either way for this long is closed.
    l4_idle: Seconds = 300.0


class LimitsConfig(_Model):
    # Request and response heads: total bytes, header lines, request line length.
    max_header_bytes: Annotated[int, Field(ge=1024, le=1 << 20)] = 65536
    max_headers: Annotated[int, Field(ge=1, le=10000)] = 100
    max_request_line: Annotated[int, Field(ge=256, le=1 << 20)] = 8192
    # Idle keep-alive connections kept per backend.
    upstream_pool_size: Annotated[int, Field(ge=0, le=10000)] = 64
    # Bytes buffered toward a slow peer before reading from the other side pauses.
    buffer_high_water: Annotated[int, Field(ge=4096, le=64 << 20)] = 256 * 1024


class AdminConfig(_Model):
    address: str = "127.0.0.1"
    port: Port = 9901

    @field_validator("address")
    @classmethod
    def _loopback(cls, value: str) -> str:
        if not ipaddress.ip_address(value).is_loopback:
            raise ValueError("must be a loopback address (the admin endpoint is local)")
        return value


class MetricsConfig(_Model):
    """A read-only listener that serves only GET /metrics, on any address: for a Prometheus
    on another host. The admin endpoint (which can drain the node) stays on loopback."""

    address: str
    port: Port = 9902

    _address = field_validator("address")(classmethod(lambda cls, v: _check_ip(v)))


class NodeIdentity(_Model):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    site: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


ApiUrl = Annotated[str, Field(pattern=r"^https?://[^\s/]+")]


class ControlPlaneConfig(_Model):
    """The GSLB API this node syncs with (optional: without it the node runs on its own)."""

    endpoints: Annotated[
        list[Annotated[str, Field(pattern=r"^https?://[^\s/]+")]], Field(min_length=1)
    ]
    # The node's bearer token, given directly or named by an environment variable.
    token: SecretStr | None = None
    token_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    # The last known good desired state, so a restart without any API still serves.
    state_file: Path = Path("/var/lib/anycast-edge/desired.json")
    heartbeat_interval: Annotated[float, Field(ge=0.1, le=60)] = 1.0
    request_timeout: Annotated[float, Field(gt=0, le=60)] = 2.0
    # CA bundle for an API served over TLS with a private CA.
    ca_file: Path | None = None

    @model_validator(mode="after")
    def _one_token(self) -> ControlPlaneConfig:
        if (self.token is None) == (self.token_env is None):
            raise ValueError("give exactly one of token and token_env")
        if self.token_env is not None and not os.environ.get(self.token_env):
            raise ValueError(f"token_env: environment variable {self.token_env} is not set")
        return self

    def bearer_token(self) -> str:
        if self.token is not None:
            return self.token.get_secret_value()
        assert self.token_env is not None
        return os.environ[self.token_env]


# -- active-passive mode (edge/vip): one VIP on one L2 segment, one owner at a time --------
_VipName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class VipMember(_Model):
    id: _VipName
    # Where this member's heartbeats come from and go to (unicast UDP).
    address: str
    # A witness only votes (`anycast-edge witness`): with one in the list, a node holds
    # the VIP only while a majority of the members grants it (edge/vip/quorum.py).
    witness: bool = False

    _address = field_validator("address")(classmethod(lambda cls, v: _check_ip(v)))


def _distinct_members(members: list[VipMember]) -> list[VipMember]:
    seen: set[str] = set()
    for member in members:
        if member.id in seen:
            raise ValueError(f"duplicate node id {member.id!r}")
        seen.add(member.id)
    addresses = [ipaddress.ip_address(m.address) for m in members]
    if len(set(addresses)) != len(addresses):
        raise ValueError("two members have the same address")
    return members


class VipFencingConfig(_Model):
    """An etcd cluster (the GSLB's, or its own) holding the group's ownership key."""

    endpoints: Annotated[list[ApiUrl], Field(min_length=1)]
    prefix: Annotated[str, Field(pattern=r"^/[^\s]*/$")] = "/anycast-edge/vip/"
    lease_ttl: Annotated[int, Field(ge=2, le=60)] = 2
    # Release the VIP when less than this is left on the lease (>= 1.35 s: the address
    # keeps a kernel lifetime of >= 1 s that still ends before the lease can).
    lease_margin: Annotated[float, Field(ge=MIN_LEASE_MARGIN_S, le=59)] = 1.4
    request_timeout: Annotated[float, Field(gt=0, le=5)] = 0.3

    @model_validator(mode="after")
    def _room_to_renew(self) -> VipFencingConfig:
        if self.lease_ttl - self.lease_margin < 0.4:
            raise ValueError("lease_margin must leave at least 0.4 s of lease_ttl to renew in")
        return self


class VipArpMonitorConfig(_Model):
    """ARP targets on the segment (its gateway or router), probed every `interval`: a node
    that hears neither them nor any peer for `missed` rounds is cut off and steps down."""

    targets: Annotated[list[str], Field(min_length=1, max_length=8)]
    interval: Annotated[float, Field(ge=0.01, le=5)] = 0.03
    missed: Annotated[int, Field(ge=2, le=100)] = 4

    @field_validator("targets")
    @classmethod
    def _ipv4(cls, targets: list[str]) -> list[str]:
        for target in targets:
            if not isinstance(ipaddress.ip_address(target), ipaddress.IPv4Address):
                raise ValueError(f"{target!r} is not an IPv4 address (ARP)")
        return targets


class VipGroupConfig(_Model):
    name: _VipName
    interface: Annotated[str, Field(min_length=1, max_length=15, pattern=r"^[^\s/]+$")]
    # address/prefix, in a subnet the interface is on (checked against the kernel at start)
    vip: str
    node_id: _VipName | None = None  # defaults to node.name
    priority: Annotated[int, Field(ge=1, le=254)]
    # Every node of the group, this one included (the same list on every node).
    members: Annotated[list[VipMember], Field(min_length=1, max_length=16)]
    port: Port = 5405
    # Send heartbeats to this IPv4 multicast group on `interface` (TTL 1, e.g. 224.0.0.18,
    # link-local: never routed) instead of unicast to every member; receivers still accept
    # only members' ids from members' addresses.
    multicast: str | None = None
    advert_interval: Annotated[float, Field(ge=0.02, le=10)] = 0.1
    dead_after: Annotated[int, Field(ge=2, le=100)] = 3
    # The VIP guard (edge.vip.guard, a process beside the agent) removes the VIP and
    # revokes the fencing lease when the agent's loop has not beaten for this long (s).
    guard_bound: Annotated[float, Field(ge=0.05, le=10)] = 0.3
    # Read by the active, which yields to a higher-ranked peer (live and eligible for
    # preempt_delay seconds): give every member the same values.
    preempt: bool = True
    preempt_delay: Annotated[float, Field(ge=0, le=3600)] = 0.0
    garp_count: Annotated[int, Field(ge=1, le=100)] = 3
    garp_interval: Annotated[float, Field(ge=0.001, le=10)] = 0.05
    reannounce_min_interval: Annotated[float, Field(ge=0, le=3600)] = 1.0
    replay_window: Annotated[float, Field(ge=0.1, le=60)] = 2.0
    # The shared HMAC key (>= 32 bytes): exactly one of key, key_env, key_file.
    key: SecretStr | None = None
    key_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    key_file: Path | None = None
    fencing: VipFencingConfig | None = None
    arp_monitor: VipArpMonitorConfig | None = None
    # How the owner attracts the traffic: "arp" (it adds the VIP on `interface` and sends
    # gratuitous ARP) or "bgp" (every member announces the VIP's host prefix through its
    # bgp: section, the VIP on its loopback; a standby adds `standby_med_penalty` to its
    # MED, so routers prefer the active and fall back to the standby's route at once).
    announce: Literal["arp", "bgp"] = "arp"
    standby_med_penalty: Annotated[int, Field(ge=1, le=2**31)] = 100
    # With a witness: how long a vote grants (s), counted from the candidate's heartbeat
    # it answers. A voter moves its vote only this long after the last grant, so a dead
    # owner's VIP moves after about this; it must leave the kernel lifetime's 1.35 s
    # margin and 0.4 s to renew in. The same value on every member and witness.
    quorum_hold: Annotated[float, Field(ge=QUORUM_MARGIN_S + 0.4, le=60)] = 2.0

    @property
    def quorum(self) -> bool:
        return any(m.witness for m in self.members)

    @field_validator("vip")
    @classmethod
    def _vip(cls, value: str) -> str:
        if "/" not in value:
            raise ValueError("must be address/prefix, e.g. 198.18.2.100/24")
        ipaddress.ip_interface(value)
        return value

    @field_validator("multicast")
    @classmethod
    def _multicast(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            group = ipaddress.ip_address(value)
        except ValueError:
            group = None
        if not isinstance(group, ipaddress.IPv4Address) or not group.is_multicast:
            raise ValueError("must be an IPv4 multicast address (224.0.0.0/4), e.g. 224.0.0.18")
        return value

    _distinct = field_validator("members")(classmethod(lambda cls, v: _distinct_members(v)))

    @model_validator(mode="after")
    def _consistent(self) -> VipGroupConfig:
        if ipaddress.ip_interface(self.vip).ip in {
            ipaddress.ip_address(m.address) for m in self.members
        }:
            raise ValueError("vip must not be a member's own address")
        if self.multicast is not None and not all(
            isinstance(ipaddress.ip_address(m.address), ipaddress.IPv4Address) for m in self.members
        ):
            raise ValueError("multicast heartbeats need IPv4 member addresses")
        if self.quorum:
            if self.fencing is not None:
                raise ValueError("a witness and fencing do not go together: the store decides")
            if len(self.members) < 3:
                raise ValueError("a group with a witness needs at least 3 members")
            if self.multicast is not None:
                raise ValueError("a group with a witness needs unicast heartbeats: no multicast")
        _check_key(self.key, self.key_env, self.key_file)
        return self

    def shared_key(self) -> bytes:
        return _read_key(self.key, self.key_env, self.key_file)


def _check_key(key: SecretStr | None, key_env: str | None, key_file: Path | None) -> None:
    if sum(x is not None for x in (key, key_env, key_file)) != 1:
        raise ValueError("give exactly one of key, key_env and key_file")
    if len(_read_key(key, key_env, key_file)) < MIN_KEY_BYTES:
        raise ValueError(f"the shared key must be at least {MIN_KEY_BYTES} bytes")


def _read_key(key: SecretStr | None, key_env: str | None, key_file: Path | None) -> bytes:
    if key is not None:
        return key.get_secret_value().encode()
    if key_env is not None:
        return os.environ.get(key_env, "").encode()
    assert key_file is not None
    try:
        return key_file.read_bytes().strip()
    except OSError as error:
        raise ValueError(f"key_file: cannot read: {error.strerror}") from None


class WitnessConfig(_Model):
    """`anycast-edge witness -c witness.yaml`: a member of an active-passive group that
    never owns the VIP and only votes (see VipMember.witness). Give it the group's values."""

    group: _VipName
    node_id: _VipName
    members: Annotated[list[VipMember], Field(min_length=3, max_length=16)]
    port: Port = 5405
    advert_interval: Annotated[float, Field(ge=0.02, le=10)] = 0.1
    dead_after: Annotated[int, Field(ge=2, le=100)] = 3
    preempt: bool = True
    preempt_delay: Annotated[float, Field(ge=0, le=3600)] = 0.0
    quorum_hold: Annotated[float, Field(ge=QUORUM_MARGIN_S + 0.4, le=60)] = 2.0
    replay_window: Annotated[float, Field(ge=0.1, le=60)] = 2.0
    key: SecretStr | None = None
    key_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    key_file: Path | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    _distinct = field_validator("members")(classmethod(lambda cls, v: _distinct_members(v)))

    @model_validator(mode="after")
    def _consistent(self) -> WitnessConfig:
        me = next((m for m in self.members if m.id == self.node_id), None)
        if me is None or not me.witness:
            raise ValueError(f"members: {self.node_id!r} must be listed with witness: true")
        _check_key(self.key, self.key_env, self.key_file)
        return self

    def shared_key(self) -> bytes:
        return _read_key(self.key, self.key_env, self.key_file)


def parse_witness_config(data: object) -> WitnessConfig:
    if not isinstance(data, dict) or not isinstance(data.get("witness"), dict):
        raise ConfigError("config: expected a mapping with a `witness:` section")
    try:
        return WitnessConfig.model_validate(data["witness"])
    except ValidationError as error:
        raise ConfigError("witness." + format_validation_error(error)) from None


class FlowSharePeerConfig(_Model):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    address: str  # where its flow stream listens, and where its moved packets are sent
    # With an overlay: its routed address, where the VXLAN packets for it go.
    underlay: str | None = None

    _address = field_validator("address")(classmethod(lambda cls, v: _check_ip(v)))

    @field_validator("underlay")
    @classmethod
    def _underlay(cls, value: str | None) -> str | None:
        return None if value is None else _check_ip(value)


class FlowShareOverlayConfig(_Model):
    """A VXLAN segment among the edges (across sites: they share no L2), built and torn
    down by the agent as `flowshare.peer_interface`, with `local_address` on it."""

    vni: Annotated[int, Field(ge=1, le=16_777_215)]
    underlay_address: str  # this node's routed address: the VXLAN packets leave from it
    port: Port = 4789
    prefix_len: Annotated[int, Field(ge=8, le=30)] = 24

    _address = field_validator("underlay_address")(classmethod(lambda cls, v: _check_ip(v)))


class FlowShareConfig(_Model):
    """Flow sharing among the site's edges (edge/flowshare): peers hold each other's flows
    and packets of a flow a peer owns are forwarded to it (planned changes break none)."""

    local_address: str  # this node's address on the peers' segment (the stream binds it)
    port: Port = 4790
    peers: Annotated[list[FlowSharePeerConfig], Field(min_length=1, max_length=64)]
    # Packets arriving here were forwarded by a peer: never forwarded again (no loops).
    peer_interface: Annotated[str, Field(min_length=1, max_length=15)]
    # The shared HMAC key (at least 16 bytes), given directly or named by an env variable.
    key: SecretStr | None = None
    key_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    forwarding: bool = True  # False: share flows but install nothing in the kernel
    mark_base: Annotated[int, Field(ge=1, le=0x7FFF0000)] = 0x4E00
    table_base: Annotated[int, Field(ge=1, le=0x7FFF0000)] = 4900
    rule_pref: Annotated[int, Field(ge=1, le=30000)] = 50  # fwmark rules; `local` moves after
    snapshot_interval: Seconds = 10.0
    heartbeat_interval: Annotated[float, Field(ge=0.05, le=60)] = 0.5
    peer_timeout: Seconds = 3.0  # a peer silent this long owns nothing
    replay_window: Seconds = 30.0
    barrier_timeout: Seconds = 2.0  # a planned change waits this long for peers' acks
    runtime_dir: Path = Path("/run/anycast-edge")
    overlay: FlowShareOverlayConfig | None = None

    _address = field_validator("local_address")(classmethod(lambda cls, v: _check_ip(v)))

    @model_validator(mode="after")
    def _checks(self) -> FlowShareConfig:
        if (self.key is None) == (self.key_env is None):
            raise ValueError("give exactly one of key and key_env")
        if self.key_env is not None and len(os.environ.get(self.key_env, "")) < 16:
            raise ValueError(f"key_env: environment variable {self.key_env} must hold 16+ bytes")
        if self.key is not None and len(self.key.get_secret_value()) < 16:
            raise ValueError("key: at least 16 bytes")
        names = [peer.name for peer in self.peers]
        if len(set(names)) != len(names):
            raise ValueError("peers: duplicate name")
        if self.local_address in {peer.address for peer in self.peers}:
            raise ValueError("peers: a peer has this node's own local_address")
        if self.overlay is not None:
            if ipaddress.ip_address(self.local_address).version != 4:
                raise ValueError("overlay: local_address must be IPv4")
            if missing := [peer.name for peer in self.peers if peer.underlay is None]:
                raise ValueError(f"overlay: peers {', '.join(missing)} have no underlay address")
        return self

    def secret(self) -> bytes:
        if self.key is not None:
            return self.key.get_secret_value().encode()
        assert self.key_env is not None
        return os.environ[self.key_env].encode()


# -- services: several on one node, each with its prefixes, listeners, backends, health ----
_Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
#: The one service of a node.yaml without `services:` (today's shape).
IMPLICIT_SERVICE = "default"


class ServiceBgpConfig(_Model):
    """A service's own BGP attributes: MED replaces the node's, communities add to them."""

    med: Annotated[int, Field(ge=0, le=4294967295)] | None = None
    communities: Annotated[list[Community], Field(max_length=32)] = []
    large_communities: Annotated[list[LargeCommunity], Field(max_length=32)] = []


class ServiceConfig(_Model):
    name: _Name
    # Announced while this service is healthy (IPv4 /32s, IPv6 /128s, or wider).
    prefixes: Annotated[list[IPNetwork], Field(max_length=64)] = []
    listeners: Annotated[list[ListenerConfig], Field(min_length=1)]
    backends: Annotated[list[BackendConfig], Field(min_length=1)]
    # Unset: the node's top-level pool, health and state sections.
    pool: PoolConfig | None = None
    health: HealthConfig | None = None
    state: StateConfig | None = None
    bgp: ServiceBgpConfig = ServiceBgpConfig()
    # A VRF device: listeners, health checks and backend connections bind to it
    # (SO_BINDTODEVICE), for prefixes kept in the operator's own routing table.
    vrf: Annotated[str, Field(min_length=1, max_length=15, pattern=r"^[^\s/]+$")] | None = None

    @model_validator(mode="after")
    def _unique(self) -> ServiceConfig:
        _unique_names("backends", [b.name for b in self.backends])
        if len(set(self.prefixes)) != len(self.prefixes):
            raise ValueError("prefixes: a prefix is listed twice")
        return self


class NodeConfig(_Model):
    node: NodeIdentity
    # Today's single-service shape (one implicit service); or `services:` instead.
    listeners: list[ListenerConfig] = []
    backends: list[BackendConfig] = []
    services: Annotated[list[ServiceConfig], Field(max_length=64)] = []
    pool: PoolConfig = PoolConfig()
    health: HealthConfig = HealthConfig()
    state: StateConfig = StateConfig()
    drain: DrainConfig = DrainConfig()
    timeouts: TimeoutConfig = TimeoutConfig()
    limits: LimitsConfig = LimitsConfig()
    admin: AdminConfig = AdminConfig()
    metrics: MetricsConfig | None = None
    retry_idempotent: bool = True
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # text: for a terminal; json: one object per line (contract.logs) for a log shipper.
    # `anycast-edge run --log-format` overrides it.
    log_format: Literal["text", "json"] = "text"
    bgp: BgpConfig | None = None
    control_plane: ControlPlaneConfig | None = None
    vip_group: VipGroupConfig | None = None
    flowshare: FlowShareConfig | None = None

    _services: tuple[ServiceConfig, ...] = PrivateAttr(default=())

    @model_validator(mode="after")
    def _unique(self) -> NodeConfig:
        if self.services:
            self._services = _check_services(self)
        else:
            for field, given in (("listeners", self.listeners), ("backends", self.backends)):
                if not given:  # the messages pydantic gave before services existed
                    missing = field not in self.model_fields_set
                    message = "Field required" if missing else "List should have at least 1 item"
                    raise ValueError(f"{field}: {message}")
            _unique_names("backends", [b.name for b in self.backends])
            _unique_names("listeners", [listener.name for listener in self.listeners])
            binds = [(listener.address, listener.port) for listener in self.listeners]
            if len(set(binds)) != len(binds):
                raise ValueError("listeners: two listeners bind the same address and port")
            if self.bgp is not None and not self.bgp.prefixes:
                raise ValueError("bgp.prefixes: expected at least 1 prefix (or give services:)")
            self._services = (
                ServiceConfig(
                    name=IMPLICIT_SERVICE,
                    prefixes=list(self.bgp.prefixes) if self.bgp is not None else [],
                    listeners=self.listeners,
                    backends=self.backends,
                ),
            )
        if self.vip_group is not None:
            me = self.vip_group.node_id or self.node.name
            if me not in {m.id for m in self.vip_group.members}:
                raise ValueError(f"vip_group.members: this node ({me!r}) is not a member")
            if any(m.id == me and m.witness for m in self.vip_group.members):
                raise ValueError(
                    f"vip_group.members: this node ({me!r}) is a witness: a witness runs "
                    "`anycast-edge witness`, not the agent"
                )
            if self.vip_group.announce == "bgp":
                if self.bgp is None:
                    raise ValueError("vip_group.announce: bgp needs a bgp: section")
                address = ipaddress.ip_interface(self.vip_group.vip).ip
                announced = [p for s in self.service_list() for p in s.prefixes] + list(
                    self.bgp.prefixes
                )
                if not any(p.prefixlen == p.max_prefixlen and address in p for p in announced):
                    raise ValueError(
                        f"vip_group.vip: with announce: bgp, {address} must be one of the "
                        "announced host prefixes (bgp.prefixes or a service's prefixes)"
                    )
        return self

    @property
    def implicit_service(self) -> bool:
        """True for today's shape: no `services:`, one service of the top-level sections."""
        return not self.services

    def service_list(self) -> tuple[ServiceConfig, ...]:
        """Every service of the node, each with its pool, health and state resolved."""
        return tuple(
            service.model_copy(
                update={
                    "pool": service.pool or self.pool,
                    "health": service.health or self.health,
                    "state": service.state or self.state,
                }
            )
            for service in self._services
        )

    def for_service(self, service: ServiceConfig) -> NodeConfig:
        """The node as one service's proxy sees it (its listeners, backends, pool, health)."""
        return self.model_copy(
            update={
                "listeners": service.listeners,
                "backends": service.backends,
                "pool": service.pool or self.pool,
                "health": service.health or self.health,
                "state": service.state or self.state,
            }
        )

    def all_listeners(self) -> list[ListenerConfig]:
        return [listener for service in self._services for listener in service.listeners]


def _check_services(config: NodeConfig) -> tuple[ServiceConfig, ...]:
    """The rules between services (each one's own are its model's). Messages name the
    field, as `services.N.field`."""
    for field in ("listeners", "backends"):
        if getattr(config, field):
            raise ValueError(f"{field}: give {field} inside each service when services: is used")
    bgp = config.bgp
    if bgp is not None and bgp.prefixes:
        raise ValueError("bgp.prefixes: give prefixes inside each service when services: is used")
    ranges = _anycast_ranges(bgp)
    names: set[str] = set()
    listener_names: dict[str, str] = {}
    binds: dict[tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address, int], str] = {}
    prefix_owner: dict[IPNetwork, str] = {}
    for index, service in enumerate(config.services):
        where = f"services.{index}"
        if service.name in names:
            raise ValueError(f"{where}.name: duplicate service name {service.name!r}")
        names.add(service.name)
        for prefix in service.prefixes:
            if problem := outside_range(prefix, ranges):
                raise ValueError(f"{where}.prefixes: {problem}")
            if (owner := prefix_owner.setdefault(prefix, service.name)) != service.name:
                raise ValueError(f"{where}.prefixes: {prefix} is already service {owner}'s")
            if bgp is not None and service_prefix_problem(prefix, bgp):
                raise ValueError(
                    f"bgp.local_address_v6: service {service.name} announces {prefix}: "
                    "IPv6 prefixes need an IPv6 next-hop"
                )
        for number, listener in enumerate(service.listeners):
            at = f"{where}.listeners.{number}"
            if (other := listener_names.get(listener.name)) is not None:
                raise ValueError(
                    f"{at}.name: duplicate listener name {listener.name!r} (service {other})"
                )
            listener_names[listener.name] = service.name
            address = ipaddress.ip_address(listener.address)
            key = (service.vrf or "", address, listener.port)
            if key in binds:
                raise ValueError(
                    f"{at}: {address} port {listener.port} is already a listener of "
                    f"service {binds[key]}"
                )
            binds[key] = service.name
            if problem := _listener_outside(address, service, ranges):
                raise ValueError(f"{at}.address: {problem}")
    return tuple(config.services)


def service_prefix_problem(prefix: IPNetwork, bgp: BgpConfig) -> str | None:
    """Why `bgp` (a node's BGP section) cannot announce a service's `prefix`, or None:
    outside its anycast ranges, or IPv6 without an IPv6 next-hop (a reload checks a new
    service's prefixes against the running section: bgp changes take a restart)."""
    if problem := outside_range(prefix, _anycast_ranges(bgp)):
        return problem
    if prefix.version == 6 and bgp.local_address_v6 is None:
        return f"{prefix} is IPv6 and bgp.local_address_v6 is not set (IPv6 needs a next-hop)"
    return None


def _anycast_ranges(bgp: BgpConfig | None) -> dict[str, IPNetwork]:
    fields = BgpConfig.model_fields
    if bgp is None:
        return {
            "anycast_range": fields["anycast_range"].default,
            "anycast_range_v6": fields["anycast_range_v6"].default,
        }
    return {"anycast_range": bgp.anycast_range, "anycast_range_v6": bgp.anycast_range_v6}


def _listener_outside(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    service: ServiceConfig,
    ranges: dict[str, IPNetwork],
) -> str | None:
    """Why a listener cannot serve its service's VIPs: an address of a family the service
    announces no prefix of, or an anycast address outside the service's own prefixes.
    Wildcard and loopback listeners are the operator's choice."""
    if address.is_unspecified or address.is_loopback or not service.prefixes:
        return None
    family = f"IPv{address.version}"
    own = [prefix for prefix in service.prefixes if prefix.version == address.version]
    if not own:
        vips = ", ".join(str(prefix) for prefix in service.prefixes)
        return (
            f"{address} is {family} but service {service.name} announces no {family} "
            f"prefix (its VIPs: {vips})"
        )
    anycast = ranges["anycast_range" if address.version == 4 else "anycast_range_v6"]
    if address in anycast and not any(address in prefix for prefix in own):
        return f"{address} is not one of service {service.name}'s prefixes"
    return None


def _unique_names(field: str, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{field}: duplicate name {name!r}")
        seen.add(name)


def format_validation_error(error: ValidationError) -> str:
    """The first problem as one line: `field.path: what was expected (got X)`."""
    first = error.errors()[0]
    if first["loc"][:1] == ("bgp",):  # never echoes the input: it may be a password
        return describe_validation_error(error, prefix="")
    location = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    if not location:  # a whole-model rule: its message names the fields
        return message
    # may hold a token or a key: never echoed
    secret = first["loc"][:1] in (("control_plane",), ("flowshare",)) or first["loc"][:2] == (
        "vip_group",
        "key",
    )
    if secret or first["type"] in ("missing",) or isinstance(got, dict | list):
        return f"{location}: {message}"
    more = len(error.errors()) - 1
    suffix = f" (and {more} more)" if more else ""
    return f"{location}: {message} (got {got!r}){suffix}"


def parse_config(data: object) -> NodeConfig:
    if not isinstance(data, dict):
        raise ConfigError("config: expected a mapping at the top level")
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None


def load_config(path: Path) -> NodeConfig:
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} not valid YAML") from None
    config = parse_config(data)
    if config.bgp is not None and (errors := check_addresses_are_local(config.bgp)):
        raise ConfigError(errors[0])
    return config
