"""The node's `bgp:` section: pydantic v2 models, validated once at load time.

The edge agent's node.yaml embeds `BgpConfig` as its optional `bgp:` field. Checks that
need the running host (are these addresses on a local interface?) live apart, in
`check_addresses_are_local`, so the edge config loader calls them explicitly and unit
tests of the models never touch the network.
"""

from __future__ import annotations

import enum
import re
import sys
import types
from collections.abc import Iterable, Mapping, Sequence
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    ip_interface,
)
from pathlib import Path
from typing import Annotated, Any, Self, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

# 0 is reserved, 23456 is AS_TRANS, 65535 and 4294967295 are reserved (RFC 7300).
RESERVED_ASNS = frozenset({0, 23456, 65535, 4294967295})
# The kernel's TCP_MD5SIG_MAXKEYLEN.
MD5_PASSWORD_MAX_BYTES = 80
# Printable ASCII without whitespace, quotes or ';': ExaBGP's and FRR's config parsers
# both take such a token verbatim, so what we render is what the kernel gets.
_MD5_PASSWORD_RE = re.compile(r"^[!#-&(-:<-~]+$")
_COMMUNITY_RE = re.compile(r"^(\d{1,5}):(\d{1,5})$")
_LARGE_COMMUNITY_RE = re.compile(r"^(\d{1,10}):(\d{1,10}):(\d{1,10})$")

# Both families, end to end (peers, prefixes, next-hops).
IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
IPInterface = IPv4Interface | IPv6Interface


def by_family(value: IPAddress | IPNetwork) -> tuple[int, IPAddress | IPNetwork]:
    """A sort key for mixed families (IPv4 first): addresses of two families do not
    compare."""
    return value.version, value


def _check_asn(value: int) -> int:
    if not 1 <= value <= 4294967294 or value in RESERVED_ASNS:
        raise ValueError(
            f"{value} is not a usable AS number (expected 1..4294967294, "
            "not 23456 (AS_TRANS) or 65535)"
        )
    return value


def _check_community(value: str) -> str:
    match = _COMMUNITY_RE.match(value)
    if not match or int(match[1]) > 65535 or int(match[2]) > 65535:
        raise ValueError(f"{value!r} is not a standard community (expected 'ASN:VALUE', 0..65535)")
    return value


def _check_large_community(value: str) -> str:
    match = _LARGE_COMMUNITY_RE.match(value)
    if not match or any(int(part) > 4294967295 for part in match.groups()):
        raise ValueError(
            f"{value!r} is not a large community (expected 'ASN:VALUE:VALUE', each "
            "0..4294967295, RFC 8092)"
        )
    return value


Asn = Annotated[int, AfterValidator(_check_asn)]
Community = Annotated[str, AfterValidator(_check_community)]
LargeCommunity = Annotated[str, AfterValidator(_check_large_community)]


class LinkBandwidth(enum.StrEnum):
    """How the link-bandwidth extended community goes to a neighbor. Some routers re-mark
    or drop one of the two types, so it is chosen per neighbor."""

    # Type 0x00 subtype 0x04: FRR passes it on over eBGP (the default).
    TRANSITIVE = "transitive"
    # Type 0x40 subtype 0x04, as the draft first defined it (ExaBGP's `bandwidth:`).
    NON_TRANSITIVE = "non-transitive"
    OFF = "off"


class Family(enum.StrEnum):
    """An address family a session carries (unicast NLRI; ExaBGP's `family` block)."""

    IPV4 = "ipv4"
    IPV6 = "ipv6"

    @classmethod
    def of(cls, value: IPAddress | IPNetwork) -> Family:
        return cls.IPV4 if value.version == 4 else cls.IPV6


def _scalar_kind(annotation: object) -> type | None:
    """bool, int or float when a field holds only that (or None), else None."""
    if annotation in (bool, int, float):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        kinds = {_scalar_kind(a) for a in get_args(annotation) if a is not type(None)}
        return kinds.pop() if len(kinds) == 1 else None
    return None


def _strict_scalar(kind: type, value: object) -> bool:
    if value is None or kind is bool:
        return value is None or isinstance(value, bool)
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind is int else isinstance(value, int | float)


class StrictScalars(BaseModel):
    """Numbers and booleans as they are written: `port: true` or `port: "80"` is an error,
    not port 1 or 80 (pydantic's lax mode would coerce both). Every config model of the
    agent (this module's and edge.config's) derives from it."""

    @model_validator(mode="before")
    @classmethod
    def _strict_scalars(cls, data: object) -> object:
        if isinstance(data, dict):
            for name, info in cls.model_fields.items():
                kind = _scalar_kind(info.annotation)
                key = info.alias or name
                if kind is not None and key in data and not _strict_scalar(kind, data[key]):
                    what = {bool: "true or false", int: "an integer", float: "a number"}[kind]
                    raise ValueError(f"{key}: expected {what}, got {data[key]!r}")
        return data


class _Strict(StrictScalars):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BfdSettings(_Strict):
    """Single-hop BFD run by bfdd beside ExaBGP; the router's `bfd profile` must match."""

    enabled: bool = False
    transmit_interval_ms: int = Field(default=100, ge=10, le=60000)
    receive_interval_ms: int = Field(default=100, ge=10, le=60000)
    detect_multiplier: int = Field(default=3, ge=2, le=255)


class DeadmanSettings(_Strict):
    """The dead-man switch outside the agent: the API relay (ExaBGP's helper process)
    withdraws every route when the agent's event loop has not beaten for `timeout_ms`."""

    enabled: bool = True
    beat_interval_ms: int = Field(default=150, ge=100, le=200)
    # 800 ms: a loop on a loaded host (2 cores, many processes) stalls a few hundred ms
    # now and then; a host-wide stall must not take every node's route at once.
    timeout_ms: int = Field(default=800, ge=300, le=10_000)

    @model_validator(mode="after")
    def _timeout_covers_beats(self) -> Self:
        if self.timeout_ms < 2 * self.beat_interval_ms:
            raise ValueError("timeout_ms must be at least twice beat_interval_ms")
        return self


class FlapBudget(_Strict):
    """At most `max_changes_per_minute` re-announces; beyond that, exponential hold-down."""

    max_changes_per_minute: int = Field(default=6, ge=1, le=600)
    initial_backoff_s: float = Field(default=2.0, gt=0, le=3600)
    max_backoff_s: float = Field(default=60.0, gt=0, le=86400)

    @model_validator(mode="after")
    def _backoff_order(self) -> Self:
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("max_backoff_s must be >= initial_backoff_s")
        return self


class Neighbor(_Strict):
    peer_address: IPAddress
    peer_asn: Asn
    md5_password: SecretStr | None = None
    # ExaBGP's default is 180 s; 3 s bounds a dead edge's route lifetime without BFD.
    hold_time_s: int = Field(default=3, ge=3, le=65535)
    description: str = Field(default="", max_length=80, pattern=r"^[\w .:/-]*$")
    # eBGP multihop: the peer is not on a connected subnet; `ttl` is the IP TTL we send.
    multihop: bool = False
    ttl: int | None = Field(default=None, ge=1, le=255)
    # Wait for the router to connect (never connect out).
    passive: bool = False
    port: int = Field(default=179, ge=1, le=65535)
    # Per-neighbor attributes: MED replaces the node's; communities and large communities
    # are added to the node's; prepends are added always (a backup path, say).
    med: int | None = Field(default=None, ge=0, le=4294967295)
    communities: list[Community] = Field(default_factory=list, max_length=32)
    large_communities: list[LargeCommunity] = Field(default_factory=list, max_length=32)
    prepends: int = Field(default=0, ge=0, le=10)
    link_bandwidth: LinkBandwidth = LinkBandwidth.TRANSITIVE
    # iBGP only (peer_asn == local_asn): LOCAL_PREF, and the one a drain announces with.
    local_pref: int = Field(default=100, ge=0, le=4294967295)
    drain_local_pref: int = Field(default=0, ge=0, le=4294967295)
    # Capabilities offered. Route refresh lets the router re-filter without a session
    # reset. Graceful restart is off unless asked for: a helper router keeps a dead
    # agent's routes as stale for this long (and ExaBGP then closes without a Cease).
    route_refresh: bool = True
    graceful_restart_s: int | None = Field(default=None, ge=1, le=4095)
    # The families this session carries; by default the peer address's own. An IPv4
    # session may carry IPv6 NLRI too (`[ipv4, ipv6]`; next-hop: local_address_v6).
    families: list[Family] | None = Field(default=None, min_length=1, max_length=2)

    @property
    def carried(self) -> frozenset[Family]:
        if self.families is None:
            return frozenset({Family.of(self.peer_address)})
        return frozenset(self.families)

    @field_validator("md5_password")
    @classmethod
    def _md5_password_shape(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        raw = value.get_secret_value()
        # Never echo the password in the error: describe it.
        if not raw:
            raise ValueError("the TCP-MD5 password is empty")
        if len(raw.encode()) > MD5_PASSWORD_MAX_BYTES:
            raise ValueError(f"the TCP-MD5 password is longer than {MD5_PASSWORD_MAX_BYTES} bytes")
        if not _MD5_PASSWORD_RE.match(raw):
            raise ValueError(
                "the TCP-MD5 password must be printable ASCII without spaces, quotes or ';'"
            )
        return value

    @model_validator(mode="after")
    def _multihop_needs_ttl(self) -> Self:
        if self.multihop and self.ttl is None:
            raise _field_error(("ttl",), "a multihop neighbor needs a TTL (2..255)")
        if self.multihop and self.ttl == 1:
            raise _field_error(("ttl",), "a multihop neighbor needs a TTL of at least 2")
        if not self.multihop and self.ttl not in (None, 1):
            raise _field_error(("ttl",), "a TTL above 1 needs multihop: true")
        return self


def _field_error(location: tuple[str | int, ...], message: str) -> ValidationError:
    """A validation error that names `location` (a model-wide rule about one field)."""
    error = PydanticCustomError("value_error", message)
    return ValidationError.from_exception_data(
        "BgpConfig", [InitErrorDetails(type=error, loc=location, input=None)]
    )


class BgpConfig(_Strict):
    local_asn: Asn
    router_id: IPv4Address
    # The address ExaBGP binds to and announces as next-hop; must be on a local interface.
    local_address: IPv4Address
    # The IPv6 source of IPv6 sessions and next-hop of IPv6 routes (needed with either).
    local_address_v6: IPv6Address | None = None
    anycast_range: IPv4Network = IPv4Network("198.51.100.0/24")
    anycast_range_v6: IPv6Network = IPv6Network("2001:db8::/32")
    # The node's prefixes when node.yaml has no `services:` (then each service has its own).
    prefixes: list[IPNetwork] = Field(default_factory=list, max_length=64)
    neighbors: list[Neighbor] = Field(min_length=1, max_length=16)
    # The link-bandwidth (Mbit/s) announced while no GSLB share is in force (no control
    # plane, or none heard from yet); with one, the GSLB's share is announced instead.
    capacity_mbps: float = Field(default=1000.0, gt=0, le=10_000_000)
    # While the node is degraded it announces this fraction of its bandwidth (decided here,
    # on the edge, so it holds with the control plane down).
    degraded_bandwidth_factor: float = Field(default=0.5, gt=0, le=1)
    med: int = Field(default=0, ge=0, le=4294967295)
    drain_prepends: int = Field(default=3, ge=0, le=10)
    communities: list[Community] = Field(default_factory=list, max_length=32)
    large_communities: list[LargeCommunity] = Field(default_factory=list, max_length=32)
    bfd: BfdSettings = BfdSettings()
    flap: FlapBudget = FlapBudget()
    drain_deadline_s: float = Field(default=30.0, gt=0, le=3600)
    # A drain waits until fewer than this many new connections/s arrive over the window.
    drain_quiet_rate_per_s: float = Field(default=1.0, ge=0)
    drain_quiet_window_s: float = Field(default=2.0, gt=0, le=600)
    deadman: DeadmanSettings = DeadmanSettings()
    # A thread kills ExaBGP (its routes go) when the agent's event loop stalls this long;
    # 0 disables the watchdog.
    loop_stall_deadline_s: float = Field(default=2.0, ge=0, le=600)
    # ExaBGP's config and API socket, bfdd's sockets. A unix socket path must stay under
    # 108 bytes, so this stays short.
    runtime_dir: Path = Field(default=Path("/run/anycast-edge"))

    @field_validator("runtime_dir")
    @classmethod
    def _short_absolute(cls, value: Path) -> Path:
        if not value.is_absolute() or len(str(value)) > 60:
            raise ValueError("expected an absolute path of at most 60 characters")
        return value

    # Field validators (not model validators) so the error names the field; the fields
    # they compare with are declared above them, hence present in `info.data`.
    @field_validator("prefixes")
    @classmethod
    def _prefixes_unique_and_inside_range(
        cls, value: list[IPNetwork], info: ValidationInfo
    ) -> list[IPNetwork]:
        if len(set(value)) != len(value):
            raise ValueError("prefixes are listed twice")
        for prefix in value:
            if problem := outside_range(prefix, info.data):
                raise ValueError(problem)
        return value

    @field_validator("neighbors")
    @classmethod
    def _neighbors_unique_and_not_self(
        cls, value: list[Neighbor], info: ValidationInfo
    ) -> list[Neighbor]:
        peers = [n.peer_address for n in value]
        if len(set(peers)) != len(peers):
            raise ValueError("a neighbor peer_address is listed twice")
        if {info.data.get("local_address"), info.data.get("local_address_v6")} & set(peers):
            raise ValueError("a neighbor peer_address is our own local address")
        return value

    @model_validator(mode="after")
    def _ipv6_has_an_address(self) -> Self:
        """IPv6 sessions bind local_address_v6; IPv6 routes take it as next-hop."""
        if self.local_address_v6 is not None:
            return self
        for index, neighbor in enumerate(self.neighbors):
            if neighbor.peer_address.version == 6 or Family.IPV6 in neighbor.carried:
                raise _field_error(
                    ("local_address_v6",),
                    f"neighbor {neighbor.peer_address} (neighbors.{index}) carries IPv6: "
                    "expected an IPv6 local_address_v6 on a local interface",
                )
        if any(prefix.version == 6 for prefix in self.prefixes):
            raise _field_error(
                ("local_address_v6",), "IPv6 prefixes need an IPv6 next-hop: local_address_v6"
            )
        return self

    def local_address_for(self, family: Family) -> IPAddress:
        """The session source / next-hop for `family` (validated to exist when used)."""
        if family is Family.IPV6:
            assert self.local_address_v6 is not None, "validated: IPv6 needs local_address_v6"
            return self.local_address_v6
        return self.local_address

    def anycast_range_for(self, prefix: IPNetwork) -> IPNetwork:
        return self.anycast_range if prefix.version == 4 else self.anycast_range_v6

    @model_validator(mode="after")
    def _ibgp_done_right(self) -> Self:
        """iBGP (peer_asn == local_asn) has no AS path of ours to prepend: a drain
        signals with GRACEFUL_SHUTDOWN and a lower LOCAL_PREF instead."""
        for index, neighbor in enumerate(self.neighbors):
            if neighbor.peer_asn != self.local_asn:
                continue
            where = ("neighbors", index)
            if neighbor.prepends:
                raise _field_error(
                    (*where, "prepends"),
                    "an iBGP neighbor takes no AS-path prepends (the peer would see its "
                    "own AS as a loop); drains lower drain_local_pref instead",
                )
            if neighbor.drain_local_pref >= neighbor.local_pref:
                raise _field_error(
                    (*where, "drain_local_pref"),
                    "an iBGP neighbor's drain_local_pref must be below its local_pref, "
                    "or a drain would not move traffic",
                )
        return self


def outside_range(prefix: IPNetwork, ranges: Mapping[str, Any]) -> str | None:
    """Why `prefix` is not inside its family's anycast range (`anycast_range`,
    `anycast_range_v6` in `ranges`), or None."""
    key = "anycast_range" if prefix.version == 4 else "anycast_range_v6"
    anycast_range = ranges.get(key)
    if anycast_range is None or prefix.subnet_of(anycast_range):
        return None
    return f"prefix {prefix} is outside the anycast range {anycast_range}"


def describe_validation_error(exc: ValidationError, prefix: str = "bgp") -> str:
    """One line naming the first bad field and what was expected (never the input value,
    which could be a password)."""
    first = exc.errors(include_input=False, include_url=False)[0]
    location = ".".join(str(part) for part in (prefix, *first["loc"]) if part != "")
    message = first["msg"].removeprefix("Value error, ")
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more)" if more else ""
    return f"{location}: {message}{suffix}"


def local_interface_addresses(netns: str | None = None) -> list[IPInterface]:
    """IPv4 and IPv6 addresses (with their prefix length) on this host's interfaces."""
    from pyroute2 import IPRoute, NetNS

    ipr: Any = NetNS(netns) if netns else IPRoute()
    try:
        return [
            ip_interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
            for msg in ipr.get_addr()
            if msg["family"] in (2, 10)
        ]
    finally:
        ipr.close()


def check_addresses_are_local(
    config: BgpConfig, interfaces: Iterable[IPInterface] | None = None
) -> list[str]:
    """Errors (one line each) for addresses that do not fit this host's interfaces:
    local_address must be assigned here, every single-hop neighbor must be on a connected
    subnet (single-hop eBGP and BFD). Empty when all is well."""
    local = list(interfaces) if interfaces is not None else local_interface_addresses()
    errors: list[str] = []
    if all(iface.ip != config.local_address for iface in local):
        errors.append(f"bgp.local_address: {config.local_address} is not on a local interface")
    v6 = config.local_address_v6
    if v6 is not None and all(iface.ip != v6 for iface in local):
        errors.append(f"bgp.local_address_v6: {v6} is not on a local interface")
    for index, neighbor in enumerate(config.neighbors):
        if neighbor.multihop or neighbor.peer_asn == config.local_asn:
            continue  # reached through routing, not a connected subnet
        if not any(
            neighbor.peer_address in iface.network
            and iface.network.prefixlen < iface.network.max_prefixlen
            for iface in local
        ):
            errors.append(
                f"bgp.neighbors.{index}.peer_address: {neighbor.peer_address} "
                "is not on a subnet of any local interface"
            )
    return errors


def load_bgp_config(path: Path, *, check_local: bool = True) -> BgpConfig:
    """Load a YAML file holding a `bgp:` mapping (or the section alone). Raises
    ConfigError with one line."""
    import yaml

    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}".splitlines()[0]) from None
    section = document.get("bgp", document) if isinstance(document, dict) else document
    try:
        config = BgpConfig.model_validate(section)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None
    if check_local:
        errors = check_addresses_are_local(config)
        if errors:
            raise ConfigError(errors[0])
    return config


class ConfigError(Exception):
    """A config problem, already phrased as one line for the operator."""


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m bgp.config FILE`: validate; one line and exit 2 on error."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m bgp.config NODE_YAML", file=sys.stderr)
        return 2
    try:
        load_bgp_config(Path(args[0]))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print("ok")
    return 0


__all__ = [
    "BfdSettings",
    "BgpConfig",
    "ConfigError",
    "DeadmanSettings",
    "Family",
    "FlapBudget",
    "IPAddress",
    "IPInterface",
    "IPNetwork",
    "LinkBandwidth",
    "Neighbor",
    "by_family",
    "check_addresses_are_local",
    "describe_validation_error",
    "load_bgp_config",
    "local_interface_addresses",
    "outside_range",
]

if __name__ == "__main__":
    sys.exit(main())
