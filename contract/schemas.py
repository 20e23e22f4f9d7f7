"""Wire schemas of the GSLB API, shared by the server, its typed client, edgectl and the agent.

Every model forbids unknown fields and range-checks its numbers, so a typo in a request is
a 422 naming the field instead of a silently ignored key. Numbers and booleans are strict:
`true` or `"7"` is not a weight (JSON has distinct types; a client that sends the wrong one
has a bug worth hearing about). This module imports only pydantic
and the standard library: the edge agent and edgectl import it.
"""

from __future__ import annotations

import enum
from datetime import datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Annotated, Final, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

#: Names of sites, nodes and services: DNS-label-like, so they are safe in URLs, keys and logs.
Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", min_length=1, max_length=63)]
#: Operator weight: a relative share; 0 means "take no traffic" without draining.
Weight = Annotated[int, Field(strict=True, ge=0, le=1000)]
#: Capacity in Mbit/s; 0 is allowed (a node that exists but must not be given traffic).
CapacityMbps = Annotated[int, Field(strict=True, ge=0, le=10_000_000)]
Revision = Annotated[int, Field(strict=True, ge=0, le=2**63 - 1)]
#: A count in a heartbeat (backends, connections).
Count = Annotated[int, Field(strict=True, ge=0, le=10**9)]
Port = Annotated[int, Field(strict=True, ge=1, le=65535)]
Reason = Annotated[str, Field(min_length=1, max_length=500)]

#: The link-bandwidth (Mbit/s) the fleet's serving nodes announce between them when every one
#: of them is healthy: the GSLB publishes each node's share on this scale.
FLEET_LINK_BANDWIDTH_MBPS = 1000.0

#: The version of the node contract (NodeDesired and the heartbeat exchange). Version 1
#: published one folded `effective_weight`; version 2 publishes the admin state and the share
#: apart; version 3 adds each service's admin state and share (`NodeDesired.service_desired`).
#: An agent sends it as the `contract` query parameter. The API answers the versions in
#: NODE_CONTRACT_VERSIONS, each in its own shape (a version-2 agent gets no per-service
#: fields, which its strict schema would refuse); anything else is a clear error (426 from
#: the API, ContractMismatch in the client), never a misread number.
NODE_CONTRACT_VERSION: Final = 3
NODE_CONTRACT_VERSIONS: Final = frozenset({2, 3})


def _text_not_number(value: object) -> object:
    # pydantic reads an integer (and so `false`) as an address: 0 would become 0.0.0.0.
    if isinstance(value, bool | int | float):
        raise ValueError("expected an address as a string")
    return value


Address = Annotated[IPv4Address | IPv6Address, BeforeValidator(_text_not_number)]
Prefix = Annotated[IPv4Network | IPv6Network, BeforeValidator(_text_not_number)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeState(enum.StrEnum):
    """The edge node's state: the states of the agent's state machine (`edge.state` uses this
    very enum) and what a node reports in its heartbeats. Defined once, here, because the wire
    is where both sides meet."""

    STARTING = "starting"
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    DRAINING = "draining"
    DOWN = "down"


class ServiceState(enum.StrEnum):
    """One service's own state on a node of several (`edge.services` uses this very enum):
    its prefixes are announced while it serves (healthy or degraded) and the node does."""

    STARTING = "starting"
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    DOWN = "down"

    @property
    def serving(self) -> bool:
        return self in (ServiceState.HEALTHY, ServiceState.DEGRADED)


class Liveness(enum.StrEnum):
    """What the control plane concludes from the heartbeat lease."""

    UNKNOWN = "unknown"  # never heard from
    ALIVE = "alive"
    DEAD = "dead"  # lease expired


class Role(enum.StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    NODE = "node"


class DrainKind(enum.StrEnum):
    NODE = "node"
    SITE = "site"


class DrainPhase(enum.StrEnum):
    """A node's drain, as its state machine (`edge.state`) runs it; reported in heartbeats."""

    NONE = "none"
    # Still accepting; the routers are being told to move new flows away.
    MOVING_TRAFFIC = "moving traffic"
    # Not accepting any more; open connections finish up to the deadline.
    CLOSING_CONNECTIONS = "closing connections"
    DONE = "done"


class DrainSource(enum.StrEnum):
    """Who asked the node to drain."""

    LOCAL = "local API"
    GSLB = "GSLB"
    SIGTERM = "SIGTERM"


class AdminState(enum.StrEnum):
    """Whether the operator wants a node to serve (kept apart from its health and its share).

    DRAINING: a drain is in force and the node still reports a serving or draining state;
    DRAINED: a drain is in force and the node reports it is down (its drain finished). The
    node treats both alike: it runs its drain."""

    ACTIVE = "active"
    DRAINING = "draining"
    DRAINED = "drained"


# --- desired state (operator-owned, revisioned) ------------------------------------------


class SiteSpec(Strict):
    capacity_mbps: CapacityMbps = 1000
    weight: Weight = 100


class NodeSpec(Strict):
    site: Name
    addresses: list[Address] = Field(default_factory=list, max_length=16)
    capacity_mbps: CapacityMbps = 1000
    weight: Weight = 100


class ServiceSpec(Strict):
    prefix: Prefix
    ports: list[Port] = Field(default_factory=list, max_length=64)


class Drain(Strict):
    """A node or a site out of traffic; with `service`, only that service on it (its other
    services keep serving)."""

    kind: DrainKind
    name: Name
    reason: Reason
    author: str
    since: datetime
    service: Name | None = None


class ServiceWeights(Strict):
    """One service's own operator weights, where they differ from the site's and node's
    (a site or node not named here weighs for the service what it weighs for all)."""

    sites: dict[Name, Weight] = Field(default_factory=dict)
    nodes: dict[Name, Weight] = Field(default_factory=dict)


class DesiredState(Strict):
    """The whole operator-owned state; one revision covers all of it.

    `write_id` identifies the write that produced this revision, so a client that retries
    a write whose answer it lost can tell its own write from someone else's.
    """

    revision: Revision = 0
    sites: dict[Name, SiteSpec] = Field(default_factory=dict)
    nodes: dict[Name, NodeSpec] = Field(default_factory=dict)
    services: dict[Name, ServiceSpec] = Field(default_factory=dict)
    drains: list[Drain] = Field(default_factory=list)
    #: Per service, its own weights (changed through /v1/weights, like drains: kept by a
    #: PUT /v1/state for the service, sites and nodes that still exist).
    service_weights: dict[Name, ServiceWeights] = Field(default_factory=dict)
    write_id: str = ""


# --- request bodies -------------------------------------------------------------------


class ServiceWeightsUpdate(Strict):
    """One service's weights to set; null clears the service's own weight (the site's or
    node's applies again)."""

    sites: dict[Name, Weight | None] = Field(default_factory=dict, max_length=1000)
    nodes: dict[Name, Weight | None] = Field(default_factory=dict, max_length=10000)


class WeightsUpdate(Strict):
    """Set several operator weights in one revision (e.g. `site-a=3 site-b=1`), for all
    services or (`services`) for one service only."""

    sites: dict[Name, Weight] = Field(default_factory=dict, max_length=1000)
    nodes: dict[Name, Weight] = Field(default_factory=dict, max_length=10000)
    services: dict[Name, ServiceWeightsUpdate] = Field(default_factory=dict, max_length=1000)


class DesiredSpec(Strict):
    """Sites, nodes and services in one document (PUT /v1/state): a declarative apply.
    Drains are kept (those whose target still exists); they change through /v1/drains."""

    sites: dict[Name, SiteSpec] = Field(default_factory=dict, max_length=1000)
    nodes: dict[Name, NodeSpec] = Field(default_factory=dict, max_length=10000)
    services: dict[Name, ServiceSpec] = Field(default_factory=dict, max_length=1000)


class DrainRequest(Strict):
    kind: DrainKind
    name: Name
    reason: Reason
    #: Drain only this service on the node or site.
    service: Name | None = None


class BgpSession(Strict):
    peer: Annotated[str, Field(min_length=1, max_length=64)]
    state: Annotated[str, Field(min_length=1, max_length=32)]


class HealthSummary(Strict):
    backends_total: Annotated[Count, Field(le=100_000)] = 0
    backends_healthy: Annotated[Count, Field(le=100_000)] = 0
    detail: Annotated[str, Field(max_length=500)] = ""


class BgpReport(Strict):
    """The node's announcement as its BGP side decided it, for the event log: `reason` is
    the policy's reason (e.g. "withdraw: node down"); the counters are cumulative since the
    agent started, so the API sees an increase even across a lost heartbeat."""

    reason: Annotated[str, Field(max_length=200)] = ""
    #: Announcement changes the flap budget held back.
    flap_holddowns: Count = 0
    #: Times the dead-man switch (outside the agent) withdrew every route.
    deadman_firings: Count = 0


class VipRole(enum.StrEnum):
    ACTIVE = "active"
    STANDBY = "standby"


class VipGroupReport(Strict):
    """A node's view of its active-passive group (`vip_group:`): whether it owns the VIP,
    under which election term and fencing token, and why (its last transition)."""

    group: Name
    vip: Annotated[str, Field(min_length=1, max_length=64)]
    role: VipRole
    term: Count = 0
    #: The etcd revision of the ownership key it holds (None without fencing, or not held).
    fencing_token: Revision | None = None
    reason: Annotated[str, Field(max_length=200)] = ""
    last_transition: Annotated[str, Field(max_length=300)] = ""
    last_transition_at: datetime | None = None


class DrainReport(Strict):
    """The node's own drain (its phase is the node's fact; the GSLB's drain is only a wish)."""

    phase: DrainPhase
    source: DrainSource | None = None
    reason: Annotated[str, Field(max_length=500)] = ""


class ServiceReport(Strict):
    """One service of the node, as its own state machine sees it (the heartbeat's
    `services`; a node of today's single-service shape reports one, "default")."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    state: ServiceState
    cause: Annotated[str, Field(max_length=500)] = ""
    prefixes: list[Annotated[str, Field(max_length=43)]] = Field(
        default_factory=list, max_length=64
    )
    backends_total: Annotated[Count, Field(le=100_000)] = 0
    backends_healthy: Annotated[Count, Field(le=100_000)] = 0


class FlowSharePeerReport(Strict):
    """One flow-sharing peer as the reporting node sees it: `synced` when the peer
    acknowledged everything this node sent it (its kernel map holds this node's flows) and
    this node holds the peer's flows; `lag_ms`, how long the oldest batch of this node's
    flows has waited for the peer's acknowledgement (0 when none waits)."""

    peer: Annotated[str, Field(min_length=1, max_length=64)]
    synced: Annotated[bool, Field(strict=True)]
    lag_ms: Annotated[float, Field(ge=0, le=86_400_000)] = 0.0


class FlowShareReport(Strict):
    """A node's flow sharing (node.yaml `flowshare:`), for the GSLB's weight-change gate:
    `forwarding` as the node's /status says it (on, off, unavailable), one entry per
    configured peer (none while the node shares nothing, e.g. without its overlay)."""

    forwarding: Annotated[str, Field(min_length=1, max_length=32)]
    peers: list[FlowSharePeerReport] = Field(default_factory=list, max_length=256)


class Heartbeat(Strict):
    """What a node reports every heartbeat interval (POST /v1/nodes/{node}/heartbeat).

    `health.detail` is the cause of the node's current state, as its state machine
    derived it (e.g. "0/2 backends healthy"); `bgp` is absent on a node without BGP."""

    state: NodeState
    health: HealthSummary = HealthSummary()
    connections: Count = 0
    bgp_sessions: list[BgpSession] = Field(default_factory=list, max_length=64)
    bgp: BgpReport | None = None
    #: Absent while the node runs no drain.
    drain: DrainReport | None = None
    #: Absent on a node in no active-passive group.
    vip_group: VipGroupReport | None = None
    applied_revision: Revision = 0
    #: Each service's own state (absent from agents older than services).
    services: list[ServiceReport] = Field(default_factory=list, max_length=64)
    #: Absent on a node without flow sharing, and from agents older than the report (the
    #: GSLB then does not know whether that node's flow table is in sync).
    flowshare: FlowShareReport | None = None


# --- responses ------------------------------------------------------------------------


class NodeObserved(Strict):
    node: str
    liveness: Liveness
    last_seen: datetime | None = None
    heartbeat: Heartbeat | None = None


class ServiceDesired(Strict):
    """One service's part of a node's desired view (contract 3): whether the service serves
    on this node and how much, by the same rules as the node's own fields. A node drain or
    site drain shows here too (it applies to every service)."""

    admin_state: AdminState
    drain_source: DrainKind | None = None
    drain_reason: str = ""
    link_bandwidth_mbps: Annotated[float, Field(ge=0)]


class NodeDesired(Strict):
    """What the control plane publishes to one node: whether to serve, and how much.

    * `admin_state` (with `drain_source` and `drain_reason` while a drain is in force): the
      operator's decision, apart from health.
    * `link_bandwidth_mbps`: the link-bandwidth the node announces when it serves at full
      health, computed as if it were active and healthy: drains and other nodes' health
      count, its own health does not (the node decides what its own DEGRADED or DOWN does,
      so that works with no API). During a drain it is the bandwidth the node keeps while
      its GRACEFUL_SHUTDOWN announcement moves traffic away.

    * `service_desired` (contract 3): per service of the GSLB, its own admin state and share.
      An agent of contract 2 is answered without it (and keeps applying the node's fields to
      all its services).

    `fingerprint` changes whenever anything in this view changes, including shares moved by
    other nodes' health, which does not bump the desired revision.
    """

    contract_version: Literal[2, 3] = NODE_CONTRACT_VERSION
    revision: Revision
    node: str
    site: str
    admin_state: AdminState
    drain_source: DrainKind | None = None
    drain_reason: str = ""
    operator_weight: Weight
    link_bandwidth_mbps: Annotated[float, Field(ge=0)]
    services: dict[str, ServiceSpec] = Field(default_factory=dict)
    service_desired: dict[str, ServiceDesired] = Field(default_factory=dict)
    fingerprint: str


class ServiceShares(Strict):
    """One service's shares, in the same unit and by the same rules as the node's."""

    nodes: dict[str, float]
    sites: dict[str, float]


class EffectiveWeights(Strict):
    """The fleet's shares as the routers see them: per serving node the link-bandwidth
    (Mbit/s) it is asked to announce (before its own DEGRADED reduction; 0 for a node that
    does not serve), per site the sum of its nodes'; per service of the GSLB, the same for
    that service's prefixes."""

    revision: Revision
    nodes: dict[str, float]
    sites: dict[str, float]
    services: dict[str, ServiceShares] = Field(default_factory=dict)


class Event(Strict):
    id: str
    time: datetime
    kind: str
    subject: str
    cause: str
    author: str
    revision: Revision = 0


class EventPage(Strict):
    events: list[Event]


class ConvergenceNode(Strict):
    node: str
    applied_revision: Revision | None
    liveness: Liveness


class Convergence(Strict):
    revision: Revision
    converged: bool
    applied: list[str]
    lagging: list[ConvergenceNode]


class HeldScope(Strict):
    """A site (or the fleet) whose liveness the GSLB does not act on right now."""

    scope: str
    trust: str  # "starting" (up for less than one heartbeat TTL) or "panic"
    alive: int
    reported: int
    detail: str


class ApiStatus(Strict):
    """GET /v1/status: the control plane's own state."""

    revision: Revision
    up_s: float
    fail_open: list[HeldScope]


class BudgetBound(enum.StrEnum):
    MIN_SHARE = "min_share"  # too little healthy capacity would stay in service
    MAX_OUT = "max_out"  # too many healthy nodes would be out at once
    SERVICE = "service"  # a service would be withdrawn from everything in service


class BudgetBreach(Strict):
    """One disruption-budget bound a refused change would break (409), in numbers: what is
    in service now, what the change would leave, and what is allowed."""

    scope: str  # "fleet", "site <name>" or "service <name>"
    bound: BudgetBound
    healthy_mbps: int
    in_service_mbps: int
    would_leave_mbps: int
    min_share: float
    min_in_service_mbps: float
    out: int
    would_be_out: int
    max_out: int | None = None


class Problem(Strict):
    """The one error body of every 4xx and 5xx answer: a message, the offending field where
    one applies; for a 412 the state someone else wrote (so the caller can show what changed
    and retry on it); for a 409 budget refusal the bounds the change would break."""

    detail: str
    field: str | None = None
    current: DesiredState | None = None
    budget: list[BudgetBreach] | None = None


REVISION_MISMATCH = "revision mismatch"
