"""Observed BGP state, as the peers hold it: pure rules, no I/O.

The driver records what ExaBGP reports (session state, OPENs, NOTIFICATIONs, the UPDATEs
it sent to each peer); these functions turn that record into what `/status` says and
what the node's state machine hears:
- per prefix: withdrawn, "no session", "desired, not yet sent", "sent to N of M peers";
- the node is degraded when it wants to announce and, for some address family, no
  session carries any of that family's prefixes (a wrong TCP-MD5 password at the
  router, a router that is down, the IPv6 session lost beside the IPv4 one) for longer
  than a grace period (a session takes a second or two to come up);
- NOTIFICATION codes decoded by RFC 4271 §4.5 / RFC 4486 names.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping

from bgp.config import IPAddress, IPNetwork, by_family

# How long "wants to announce, no session carries it" may last before it is a fault.
NO_SESSION_GRACE_S = 5.0

_ERRORS = {
    1: "Message Header Error",
    2: "OPEN Message Error",
    3: "UPDATE Message Error",
    4: "Hold Timer Expired",
    5: "Finite State Machine Error",
    6: "Cease",
    7: "ROUTE-REFRESH Message Error",
}
_SUBCODES = {
    (1, 1): "Connection Not Synchronized",
    (1, 2): "Bad Message Length",
    (1, 3): "Bad Message Type",
    (2, 1): "Unsupported Version Number",
    (2, 2): "Bad Peer AS",
    (2, 3): "Bad BGP Identifier",
    (2, 4): "Unsupported Optional Parameter",
    (2, 6): "Unacceptable Hold Time",
    (2, 7): "Unsupported Capability",
    (3, 1): "Malformed Attribute List",
    (3, 2): "Unrecognized Well-known Attribute",
    (3, 3): "Missing Well-known Attribute",
    (3, 4): "Attribute Flags Error",
    (3, 5): "Attribute Length Error",
    (3, 6): "Invalid ORIGIN Attribute",
    (3, 8): "Invalid NEXT_HOP Attribute",
    (3, 9): "Optional Attribute Error",
    (3, 10): "Invalid Network Field",
    (3, 11): "Malformed AS_PATH",
    (6, 1): "Maximum Number of Prefixes Reached",
    (6, 2): "Administrative Shutdown",
    (6, 3): "Peer De-configured",
    (6, 4): "Administrative Reset",
    (6, 5): "Connection Rejected",
    (6, 6): "Other Configuration Change",
    (6, 7): "Connection Collision Resolution",
    (6, 8): "Out of Resources",
    (6, 9): "Hard Reset",
    (6, 10): "BFD Down",
}


def notification_reason(code: int, subcode: int) -> str:
    """'Cease/Administrative Shutdown', the way FRR and BIRD name them."""
    error = _ERRORS.get(code, f"Error {code}")
    if subcode == 0:
        return error
    return f"{error}/{_SUBCODES.get((code, subcode), f'Subcode {subcode}')}"


class Carriage(enum.StrEnum):
    """Where one prefix stands, from the peers' side."""

    WITHDRAWN = "withdrawn"
    NO_SESSION = "no session"
    NOT_YET_SENT = "desired, not yet sent"
    SENT = "sent"


def carriage(
    desired: bool, established: Collection[IPAddress], sent_to: Collection[IPAddress]
) -> Carriage:
    """One prefix: `sent_to` are the established peers last sent it as announced."""
    if not desired:
        return Carriage.WITHDRAWN
    if not established:
        return Carriage.NO_SESSION
    if not sent_to:
        return Carriage.NOT_YET_SENT
    return Carriage.SENT


def describe_carriage(state: Carriage, sent_to: int, neighbors: int) -> str:
    """The line /status shows for a prefix: "sent to 1 of 2 peers", "no session", ..."""
    if state is Carriage.SENT:
        return f"sent to {sent_to} of {neighbors} peers"
    return str(state)


def no_session_reason(
    desired: Collection[IPNetwork],
    sent_to: Mapping[IPNetwork, Collection[IPAddress]],
    established: int,
    neighbors: int,
) -> str | None:
    """Why the node cannot carry traffic although it wants to, or None: for some address
    family, it wants to announce prefixes of that family and no session carries any of
    them (an IPv6 session lost beside a working IPv4 one leaves the IPv6 clients with no
    route to this node: a fault of its own, not hidden by the IPv4 routes)."""
    missing: list[IPNetwork] = []
    for version in (4, 6):
        wanted = [prefix for prefix in desired if prefix.version == version]
        if wanted and not any(sent_to.get(prefix) for prefix in wanted):
            missing += sorted(wanted, key=by_family)
    if not missing:
        return None
    names = ", ".join(str(prefix) for prefix in missing)
    sessions = f"{established} of {neighbors} sessions established"
    lost = {prefix.version for prefix in missing}
    carried = {prefix.version for prefix in desired} - lost
    if carried:  # one family lost, the other carried
        (version,), (other,) = lost, carried
        return f"no BGP session carries IPv{version}: {names} (IPv{other} carried; {sessions})"
    return f"no BGP session carries {names} ({sessions})"


def degraded_for_want_of_session(
    reason: str | None, since: float | None, now: float, grace_s: float = NO_SESSION_GRACE_S
) -> bool:
    """`reason` (from `no_session_reason`) has held since `since` for longer than the
    grace period."""
    return reason is not None and since is not None and now - since > grace_s


__all__ = [
    "NO_SESSION_GRACE_S",
    "Carriage",
    "carriage",
    "degraded_for_want_of_session",
    "describe_carriage",
    "no_session_reason",
    "notification_reason",
]
