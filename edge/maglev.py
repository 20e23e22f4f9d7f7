"""Maglev consistent hashing (Eisenbud et al., NSDI 2016), with weights. Pure.

Every node of every site builds the same table from the same backend names, so
they all pick the same backend for the same key without talking. Removing one
of n backends moves about 1/n of the keys: the survivors keep their slots.

Hashes come from blake2b, never Python's `hash()`, which is salted per process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence


def stable_hash(data: bytes, salt: bytes = b"") -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, salt=salt).digest(), "little")


def _permutation(name: str, size: int) -> tuple[int, int]:
    raw = name.encode()
    offset = stable_hash(raw, b"offset") % size
    skip = stable_hash(raw, b"skip") % (size - 1) + 1
    return offset, skip


def build_table(weights: Mapping[str, int], size: int = 65537) -> list[str]:
    """The lookup table: `size` slots (a prime), each naming a backend.

    Backends take turns claiming their next preferred free slot; a backend of
    weight w takes a turn in proportion to w (relative to the heaviest), so
    its share of slots is proportional to its weight.
    """
    names = sorted(name for name, weight in weights.items() if weight > 0)
    if not names:
        return []
    if size <= len(names):
        raise ValueError("table size must exceed the number of backends")
    max_weight = max(weights[name] for name in names)
    perms = [_permutation(name, size) for name in names]
    next_index = [0] * len(names)
    credit = [0.0] * len(names)
    table: list[int] = [-1] * size
    filled = 0
    while True:
        for i, name in enumerate(names):
            credit[i] += weights[name] / max_weight
            if credit[i] < 1.0:
                continue
            credit[i] -= 1.0
            offset, skip = perms[i]
            j = next_index[i]
            slot = (offset + j * skip) % size
            while table[slot] >= 0:
                j += 1
                slot = (offset + j * skip) % size
            next_index[i] = j + 1
            table[slot] = i
            filled += 1
            if filled == size:
                return [names[k] for k in table]


class MaglevTable:
    """A built table and the lookup of keys in it."""

    __slots__ = ("_table", "size")

    def __init__(self, weights: Mapping[str, int], size: int = 65537) -> None:
        self.size = size
        self._table = build_table(weights, size)

    def __bool__(self) -> bool:
        return bool(self._table)

    def lookup(self, key: bytes) -> str | None:
        if not self._table:
            return None
        return self._table[stable_hash(key) % self.size]

    def slots(self) -> Sequence[str]:
        return self._table
