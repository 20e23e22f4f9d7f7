"""The backend pool: who is eligible, and which one a new connection goes to. Pure.

Balancing algorithms:
- round_robin: each eligible backend in turn.
- least_connections: fewest active connections, ties in turn.
- weighted: smooth weighted round robin (as nginx does), proportional to weight
  without bursts.
- maglev: consistent hash of a key (client address, header or cookie) over the
  healthy backends, so every node picks the same backend for the same key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from edge.config import Algorithm, BackendConfig
from edge.health import (
    BackendHealth,
    HealthChange,
    Outlier,
    OutlierPolicy,
    PassiveVerdict,
    RiseFall,
)
from edge.maglev import MaglevTable, stable_hash

#: The longest key an affinity table holds as it is (the heartbeat's session key bound);
#: a longer one is kept as a digest.
MAX_AFFINITY_KEY = 128


class Affinity(Protocol):
    """Sticky mappings, client key -> backend name (edge.vip.sessions.SessionTable: in
    active-passive mode the active's table travels to the standby in the heartbeats)."""

    def lookup(self, key: str) -> str | None: ...

    def record(self, key: str, backend: str) -> None: ...


def affinity_key(scope: str, key: bytes) -> str:
    """The table's key for a client key of one service (`scope`): printable, bounded."""
    text = f"{scope}/{key.decode('latin-1')}"
    if len(text) <= MAX_AFFINITY_KEY and text.isprintable():
        return text
    return f"{scope}/#{hashlib.sha256(key).hexdigest()[:40]}"


@dataclass(slots=True)
class Backend:
    name: str
    address: str
    port: int
    weight: int
    rise_fall: RiseFall
    active_connections: int = 0
    connections_total: int = 0
    requests_total: int = 0
    failures_total: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    # Smooth weighted round robin state.
    current_weight: int = 0
    # Backends removed by a reload finish their connections, then go.
    retired: bool = False
    outlier: Outlier = field(default_factory=Outlier)

    @property
    def health(self) -> BackendHealth:
        health = self.rise_fall.health
        if health is BackendHealth.UP and self.outlier.ejected_until:
            return BackendHealth.EJECTED
        return health

    @property
    def eligible(self) -> bool:
        return self.health is BackendHealth.UP and not self.retired

    def snapshot(self) -> dict[str, object]:
        return {
            "name": self.name,
            "address": f"{self.address}:{self.port}",
            "weight": self.weight,
            "health": str(self.health),
            "last_check": self.rise_fall.last_detail,
            "active_connections": self.active_connections,
            "connections_total": self.connections_total,
            "requests_total": self.requests_total,
            "failures_total": self.failures_total,
            "consecutive_failures": self.outlier.consecutive,
            "ejections": self.outlier.ejections,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }


@dataclass(slots=True)
class Pool:
    algorithm: Algorithm
    rise: int
    fall: int
    maglev_table_size: int = 65537
    backends: dict[str, Backend] = field(default_factory=dict)
    _eligible: list[Backend] = field(default_factory=list)
    _rr_index: int = 0
    _maglev: MaglevTable | None = None
    # Sticky: a key keeps the backend it first got while that one is eligible (any
    # algorithm); `affinity_scope` keeps services apart in a table shared by the node.
    affinity: Affinity | None = None
    affinity_scope: str = ""

    @classmethod
    def from_config(
        cls,
        backends: Iterable[BackendConfig],
        algorithm: Algorithm,
        rise: int,
        fall: int,
        maglev_table_size: int = 65537,
    ) -> Pool:
        pool = cls(algorithm, rise, fall, maglev_table_size)
        pool.reconfigure(backends, algorithm, rise, fall, maglev_table_size)
        return pool

    def reconfigure(
        self,
        backends: Iterable[BackendConfig],
        algorithm: Algorithm,
        rise: int,
        fall: int,
        maglev_table_size: int,
    ) -> None:
        """Apply a new backend list, keeping the health and counters of the ones that stay."""
        self.algorithm = algorithm
        self.rise, self.fall = rise, fall
        self.maglev_table_size = maglev_table_size
        wanted = {b.name: b for b in backends}
        for name, backend in list(self.backends.items()):
            if name not in wanted:
                backend.retired = True
                if backend.active_connections == 0:
                    del self.backends[name]
        for name, cfg in wanted.items():
            old = self.backends.get(name)
            same_target = old and (old.address, old.port) == (cfg.address, cfg.port)
            if old is not None and same_target and not old.retired:
                old.weight = cfg.weight
                old.rise_fall.rise, old.rise_fall.fall = rise, fall
                continue
            self.backends[name] = Backend(
                name, cfg.address, cfg.port, cfg.weight, RiseFall(name, rise, fall)
            )
        self.refresh()

    def forget_retired(self) -> None:
        for name, backend in list(self.backends.items()):
            if backend.retired and backend.active_connections == 0:
                del self.backends[name]

    def refresh(self) -> None:
        """Recompute the eligible set (after any health or config change)."""
        self._eligible = sorted(
            (b for b in self.backends.values() if b.eligible), key=lambda b: b.name
        )
        if self.algorithm is Algorithm.MAGLEV:
            weights = {b.name: b.weight for b in self._eligible}
            self._maglev = MaglevTable(weights, self.maglev_table_size) if weights else None
        else:
            self._maglev = None

    def apply(self, change: HealthChange | None) -> HealthChange | None:
        if change is not None:
            self.refresh()
        return change

    @property
    def active_backends(self) -> list[Backend]:
        return [b for b in self.backends.values() if not b.retired]

    @property
    def eligible(self) -> list[Backend]:
        return self._eligible

    def pick(
        self, key: bytes = b"", exclude: Backend | None = None, sticky: bool = True
    ) -> Backend | None:
        """The backend for a new connection or request, or None if none is eligible. With
        an affinity table and a key: the key's recorded backend while it is eligible (and
        not the one a retry excludes), else the algorithm's choice, recorded."""
        affinity = self.affinity
        if affinity is not None and sticky and key:
            sticky_key = affinity_key(self.affinity_scope, key)
            name = affinity.lookup(sticky_key)
            if name is not None:
                backend = self.backends.get(name)
                if backend is not None and backend.eligible and backend is not exclude:
                    affinity.record(sticky_key, name)
                    return backend
            chosen = self.pick(key, exclude, sticky=False)
            if chosen is not None:
                affinity.record(sticky_key, chosen.name)
            return chosen
        candidates = self._eligible
        if exclude is not None:
            candidates = [b for b in candidates if b is not exclude]
        if not candidates:
            return None
        algorithm = self.algorithm
        if algorithm is Algorithm.MAGLEV:
            if exclude is None and self._maglev is not None:
                name = self._maglev.lookup(key)
                if name is not None:
                    return self.backends[name]
            # Retry path: the next backend in a stable order after the excluded one.
            return candidates[stable_index(key, len(candidates))]
        if algorithm is Algorithm.LEAST_CONNECTIONS:
            self._rr_index += 1
            start = self._rr_index % len(candidates)
            rotated = candidates[start:] + candidates[:start]
            return min(rotated, key=lambda b: b.active_connections)
        if algorithm is Algorithm.WEIGHTED:
            total = 0
            best: Backend | None = None
            for b in candidates:
                b.current_weight += b.weight
                total += b.weight
                if best is None or b.current_weight > best.current_weight:
                    best = b
            assert best is not None
            best.current_weight -= total
            return best
        self._rr_index += 1
        return candidates[self._rr_index % len(candidates)]

    # -- passive evidence (outlier ejection; the rule is `Outlier.failed`) ------------
    def passive_failure(
        self, backend: Backend, detail: str, now: float, policy: OutlierPolicy
    ) -> HealthChange | None:
        """One failed request on `backend`; a change when it got ejected."""
        if backend.retired:
            return None
        in_rotation = [b for b in self.active_backends if b.rise_fall.health is BackendHealth.UP]
        ejected = sum(1 for b in in_rotation if b.outlier.ejected_until)
        verdict = backend.outlier.failed(policy, now, in_rotation=len(in_rotation), ejected=ejected)
        if (
            verdict is not PassiveVerdict.EJECTED
            or backend.rise_fall.health is not BackendHealth.UP
        ):
            return None
        self.refresh()
        seconds = backend.outlier.ejected_until - now
        return HealthChange(
            backend.name,
            BackendHealth.UP,
            BackendHealth.EJECTED,
            f"backend {backend.name} ejected by live traffic for {seconds:.0f} s after "
            f"{policy.consecutive_failures} failed requests in a row: {detail}",
        )

    @staticmethod
    def passive_success(backend: Backend) -> None:
        backend.outlier.consecutive = 0

    def expire_ejections(self, now: float) -> list[HealthChange]:
        """Backends whose ejection time is over go back into rotation."""
        changes = [
            HealthChange(
                b.name,
                BackendHealth.EJECTED,
                b.health,
                f"backend {b.name} back from its ejection",
            )
            for b in self.backends.values()
            if b.outlier.expired(now)
        ]
        if changes:
            self.refresh()
        return changes

    def counts(self) -> tuple[int, int, bool]:
        """(total, healthy, settled) over the backends that are not retired."""
        active = self.active_backends
        healthy = sum(1 for b in active if b.health is BackendHealth.UP)
        settled = all(b.health is not BackendHealth.UNKNOWN for b in active)
        return len(active), healthy, settled


def stable_index(key: bytes, n: int) -> int:
    return stable_hash(key, b"retry") % n
