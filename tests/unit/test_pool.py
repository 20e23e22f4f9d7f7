"""Balancing algorithms and reconfiguration of the pool."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from edge.config import Algorithm, BackendConfig
from edge.health import BackendHealth, OutlierPolicy
from edge.pool import MAX_AFFINITY_KEY, Pool, affinity_key
from edge.vip.sessions import SessionTable


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


# -- session affinity (pool.sticky) ----------------------------------------------------
def _sticky(algorithm: Algorithm, table: SessionTable, scope: str = "web") -> Pool:
    pool = make_pool(algorithm)
    pool.affinity, pool.affinity_scope = table, scope
    return pool


@given(
    algorithm=st.sampled_from(list(Algorithm)),
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("pick"), st.integers(0, 7)),
            st.tuples(st.just("down"), st.sampled_from(["b1", "b2", "b3"])),
            st.tuples(st.just("up"), st.sampled_from(["b1", "b2", "b3"])),
        ),
        max_size=60,
    ),
)
def test_a_sticky_key_keeps_its_backend_while_that_one_is_eligible(
    algorithm: Algorithm, steps: list[tuple[str, object]]
) -> None:
    """Whatever the algorithm and the health changes: a key gets its recorded backend as
    long as that one is eligible; otherwise an eligible one, which it then keeps."""
    table = SessionTable()
    pool = _sticky(algorithm, table)
    last: dict[bytes, str] = {}
    for op, arg in steps:
        if op == "pick":
            key = f"client-{arg}".encode()
            backend = pool.pick(key)
            if not pool.eligible:
                assert backend is None
                continue
            assert backend is not None and backend.eligible
            previous = last.get(key)
            if previous is not None and pool.backends[previous].eligible:
                assert backend.name == previous
            last[key] = backend.name
            assert table.lookup(affinity_key("web", key)) == backend.name
        else:
            rise_fall = pool.backends[str(arg)].rise_fall
            rise_fall.check_failed("test") if op == "down" else rise_fall.check_passed()
            pool.refresh()


def test_round_robin_turns_give_way_to_the_table_and_a_retry_moves_the_key() -> None:
    table = SessionTable()
    pool = _sticky(Algorithm.ROUND_ROBIN, table)
    first = {k: pool.pick(k) for k in (b"a", b"b", b"c")}
    assert len({b.name for b in first.values() if b}) == 3
    for _ in range(5):
        assert all(pool.pick(k) is b for k, b in first.items())
    moved = pool.pick(b"a", exclude=first[b"a"])
    assert moved is not None and moved is not first[b"a"]
    assert pool.pick(b"a") is moved  # the retry's backend is the key's from now on
    # services sharing the node's table never see each other's keys
    other = _sticky(Algorithm.ROUND_ROBIN, table, scope="dns")
    other.pick(b"a")
    assert table.lookup("web/a") == moved.name
    assert table.lookup("dns/a") is not None
    assert make_pool(Algorithm.ROUND_ROBIN).pick(b"a") is not None  # no table: no record


def test_the_table_sees_what_it_can_carry() -> None:
    assert affinity_key("web", b"198.18.2.50") == "web/198.18.2.50"
    long = affinity_key("web", b"x" * 300)
    assert long.startswith("web/#") and len(long) <= MAX_AFFINITY_KEY
    assert affinity_key("web", b"a\r\nb").startswith("web/#")  # never raw control bytes


def test_pending_changes_stay_bounded_when_no_heartbeat_takes_them() -> None:
    table = SessionTable(max_entries=10)
    for i in range(100):
        table.record(f"k{i}", "b1")
    assert len(table.entries) == 10 and len(table.pending) == 10
