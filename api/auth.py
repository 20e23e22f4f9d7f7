"""Bearer tokens with roles: viewer (read), operator (write desired state), node (heartbeat
for its own node only, and read its own desired view).

Tokens are compared by SHA-256 digest in constant time; the secret itself is never stored
on the request, logged or echoed. Identities are the token's configured `name`, which is
what events record as the author.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from api.settings import ConfigError, Settings
from contract.schemas import Role


@dataclass(frozen=True, slots=True)
class Identity:
    name: str
    role: Role
    node: str | None = None

    def can_read(self) -> bool:
        return self.role in (Role.VIEWER, Role.OPERATOR)

    def can_write(self) -> bool:
        return self.role is Role.OPERATOR

    def may_act_for_node(self, node: str) -> bool:
        return self.role is Role.OPERATOR or (self.role is Role.NODE and self.node == node)


ANONYMOUS_VIEWER = Identity(name="anonymous", role=Role.VIEWER)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class TokenTable:
    def __init__(self, entries: dict[bytes, Identity], allow_anonymous_read: bool) -> None:
        self._entries = entries
        self.allow_anonymous_read = allow_anonymous_read

    @classmethod
    def from_settings(cls, settings: Settings, source: str = "config") -> TokenTable:
        """Resolve every secret now; two tokens with one secret are a config error (which
        role would it be?)."""
        entries: dict[bytes, Identity] = {}
        for t in settings.tokens:
            try:
                digest = _digest(t.secret())
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None
            other = entries.get(digest)
            if other is not None:
                raise ConfigError(
                    f"{source}: tokens[{t.name}]: same secret as tokens[{other.name}]"
                )
            entries[digest] = Identity(name=t.name, role=t.role, node=t.node)
        return cls(entries, settings.allow_anonymous_read)

    def identify(self, authorization: str | None) -> Identity | None:
        if not authorization:
            return ANONYMOUS_VIEWER if self.allow_anonymous_read else None
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret:
            return None
        # A lookup by the secret's SHA-256, not a scan: one dict probe whatever the number
        # of tokens (a fleet has one per node; the scan was a compare per token per
        # request). What its timing can reveal is about the digest, never the secret: a
        # near miss of the digest is no nearer the secret (preimage resistance).
        return self._entries.get(_digest(secret.strip()))
