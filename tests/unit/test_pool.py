"""Balancing algorithms and reconfiguration of the pool."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from edge.config import Algorithm, BackendConfig
from edge.health import BackendHealth, OutlierPolicy
from edge.pool import Pool


def make_pool(algorithm: Algorithm, weights: dict[str, int] | None = None) -> Pool:
    weights = weights or {"b1": 1, "b2": 1, "b3": 1}
    pool = Pool.from_config(
        [
            BackendConfig(name=n, address="127.0.0.1", port=8000 + i, weight=w)
            for i, (n, w) in enumerate(weights.items())
        ],
        algorithm,
        rise=1,
        fall=1,
        maglev_table_size=4099,
    )
    for b in pool.backends.values():
        b.rise_fall.check_passed()
    pool.refresh()
    return pool


def test_nothing_eligible_before_health_rises() -> None:
    pool = Pool.from_config(
        [BackendConfig(name="b1", address="127.0.0.1", port=1)], Algorithm.ROUND_ROBIN, 2, 2
    )
    assert pool.pick() is None
    assert pool.counts() == (1, 0, False)


def test_round_robin_is_even() -> None:
    pool = make_pool(Algorithm.ROUND_ROBIN)
    counts = Counter(pool.pick().name for _ in range(300))  # type: ignore[union-attr]
    assert set(counts.values()) == {100}


def test_least_connections_prefers_the_idle_backend() -> None:
    pool = make_pool(Algorithm.LEAST_CONNECTIONS)
    pool.backends["b1"].active_connections = 5
    pool.backends["b2"].active_connections = 1
    pool.backends["b3"].active_connections = 3
    assert pool.pick().name == "b2"  # type: ignore[union-attr]


@given(st.lists(st.integers(1, 10), min_size=1, max_size=5))
def test_smooth_weighted_is_exactly_proportional_over_a_cycle(weights: list[int]) -> None:
    pool = make_pool(Algorithm.WEIGHTED, {f"b{i}": w for i, w in enumerate(weights)})
    total = sum(weights)
    counts = Counter(pool.pick().name for _ in range(total * 3))  # type: ignore[union-attr]
    for i, w in enumerate(weights):
        assert counts[f"b{i}"] == 3 * w


def test_maglev_same_key_same_backend_and_failover_moves_only_that_backends_keys() -> None:
    pool = make_pool(Algorithm.MAGLEV)
    keys = [f"198.18.{i // 250}.{i % 250}".encode() for i in range(2000)]
    before = {k: pool.pick(k).name for k in keys}  # type: ignore[union-attr]
    assert all(pool.pick(k).name == before[k] for k in keys[:50])  # type: ignore[union-attr]
    policy = OutlierPolicy(consecutive_failures=2, max_ejected_share=0.5)
    assert pool.passive_failure(pool.backends["b2"], "refused", 0.0, policy) is None
    change = pool.passive_failure(pool.backends["b2"], "refused", 0.0, policy)
    assert change is not None and change.new is BackendHealth.EJECTED
    after = {k: pool.pick(k).name for k in keys}  # type: ignore[union-attr]
    moved = [k for k in keys if before[k] != after[k]]
    assert (
        all(before[k] == "b2" for k in moved)
        or len(moved) <= len([k for k in keys if before[k] == "b2"]) * 1.2
    )
    assert "b2" not in after.values()


def test_retry_excludes_the_failed_backend() -> None:
    for algorithm in Algorithm:
        pool = make_pool(algorithm)
        first = pool.pick(b"k")
        assert first is not None
        for _ in range(20):
            other = pool.pick(b"k", exclude=first)
            assert other is not None and other is not first


def test_reconfigure_keeps_health_of_unchanged_backends_and_retires_removed_ones() -> None:
    pool = make_pool(Algorithm.ROUND_ROBIN)
    pool.backends["b3"].active_connections = 1
    pool.reconfigure(
        [
            BackendConfig(name="b1", address="127.0.0.1", port=8000),
            BackendConfig(name="b4", address="127.0.0.1", port=9000),
        ],
        Algorithm.ROUND_ROBIN,
        1,
        1,
        4099,
    )
    assert pool.backends["b1"].eligible  # kept its verdict
    assert not pool.backends["b4"].eligible  # new: waits for its checks
    assert "b2" not in pool.backends  # idle and removed: gone
    assert (
        pool.backends["b3"].retired and not pool.backends["b3"].eligible
    )  # finishing its connection
    assert pool.counts() == (2, 1, False)
    pool.backends["b3"].active_connections = 0
    pool.forget_retired()
    assert "b3" not in pool.backends
