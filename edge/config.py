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
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from bgp.config import BgpConfig, check_addresses_are_local, describe_validation_error
from edge.vip.election import MIN_LEASE_MARGIN_S
from edge.vip.heartbeat import MIN_KEY_BYTES


class ConfigError(Exception):
    """A configuration problem, already phrased as one line for the operator."""


class _Model(BaseModel):
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

    _address = field_validator("address")(classmethod(lambda cls, v: _check_ip(v)))


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

    @field_validator("vip")
    @classmethod
    def _vip(cls, value: str) -> str:
        if "/" not in value:
            raise ValueError("must be address/prefix, e.g. 198.18.2.100/24")
        ipaddress.ip_interface(value)
        return value

    @field_validator("members")
    @classmethod
    def _distinct(cls, members: list[VipMember]) -> list[VipMember]:
        seen: set[str] = set()
        for member in members:
            if member.id in seen:
                raise ValueError(f"duplicate node id {member.id!r}")
            seen.add(member.id)
        addresses = [ipaddress.ip_address(m.address) for m in members]
        if len(set(addresses)) != len(addresses):
            raise ValueError("two members have the same address")
        return members

    @model_validator(mode="after")
    def _consistent(self) -> VipGroupConfig:
        if ipaddress.ip_interface(self.vip).ip in {
            ipaddress.ip_address(m.address) for m in self.members
        }:
            raise ValueError("vip must not be a member's own address")
        if sum(x is not None for x in (self.key, self.key_env, self.key_file)) != 1:
            raise ValueError("give exactly one of key, key_env and key_file")
        if len(self.shared_key()) < MIN_KEY_BYTES:
            raise ValueError(f"the shared key must be at least {MIN_KEY_BYTES} bytes")
        return self

    def shared_key(self) -> bytes:
        if self.key is not None:
            return self.key.get_secret_value().encode()
        if self.key_env is not None:
            return os.environ.get(self.key_env, "").encode()
        assert self.key_file is not None
        try:
            return self.key_file.read_bytes().strip()
        except OSError as error:
            raise ValueError(f"key_file: cannot read: {error.strerror}") from None


class NodeConfig(_Model):
    node: NodeIdentity
    listeners: Annotated[list[ListenerConfig], Field(min_length=1)]
    backends: Annotated[list[BackendConfig], Field(min_length=1)]
    pool: PoolConfig = PoolConfig()
    health: HealthConfig = HealthConfig()
    state: StateConfig = StateConfig()
    drain: DrainConfig = DrainConfig()
    timeouts: TimeoutConfig = TimeoutConfig()
    limits: LimitsConfig = LimitsConfig()
    admin: AdminConfig = AdminConfig()
    retry_idempotent: bool = True
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    bgp: BgpConfig | None = None
    control_plane: ControlPlaneConfig | None = None
    vip_group: VipGroupConfig | None = None

    @model_validator(mode="after")
    def _unique(self) -> NodeConfig:
        _unique_names("backends", [b.name for b in self.backends])
        _unique_names("listeners", [listener.name for listener in self.listeners])
        binds = [(listener.address, listener.port) for listener in self.listeners]
        if len(set(binds)) != len(binds):
            raise ValueError("listeners: two listeners bind the same address and port")
        if self.vip_group is not None:
            me = self.vip_group.node_id or self.node.name
            if me not in {m.id for m in self.vip_group.members}:
                raise ValueError(f"vip_group.members: this node ({me!r}) is not a member")
        return self


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
    secret = first["loc"][:1] == ("control_plane",) or first["loc"][:2] == ("vip_group", "key")
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
