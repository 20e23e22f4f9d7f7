"""bgp.drain (quiet detection, ordering) and bgp.bfd pure parts."""

from __future__ import annotations

import json
import time
from ipaddress import IPv4Address

from hypothesis import given
from hypothesis import strategies as st

from bgp.bfd import degraded_peers, parse_bfd_peers, render_bfdd_config
from bgp.config import BgpConfig
from bgp.drain import DrainOutcome, QuietDetector, drain, wait_quiet

CONFIG = BgpConfig.model_validate(
    {
        "local_asn": 65101,
        "router_id": "198.18.0.6",
        "local_address": "198.18.0.6",
        "prefixes": ["198.51.100.10/32"],
        "neighbors": [{"peer_address": "198.18.0.5", "peer_asn": 65000}],
        "bfd": {"enabled": True, "transmit_interval_ms": 50, "detect_multiplier": 4},
    }
)
PEER = IPv4Address("198.18.0.5")


def test_quiet_detector_needs_a_full_quiet_window() -> None:
    detector = QuietDetector(quiet_rate_per_s=1.0, quiet_window_s=2.0)
    assert not detector.add(0.0, 0)
    assert not detector.add(1.0, 50)  # window not yet covered
    assert not detector.add(2.0, 100)  # 50/s
    assert not detector.add(3.0, 101)  # window 1..3: 25/s
    assert detector.add(4.0, 101)  # window 2..4: 1 connection in 2 s = 0.5/s
    assert detector.last_rate_per_s == 0.5


@given(st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=50))
def test_quiet_never_declared_while_busy(increments: list[int]) -> None:
    """Quiet only when the observed rate over the window is below the threshold."""
    detector = QuietDetector(quiet_rate_per_s=1.0, quiet_window_s=1.0)
    total, history = 0, [(0.0, 0)]
    detector.add(0.0, 0)
    for step, increment in enumerate(increments, start=1):
        now = step * 0.25
        total += increment
        history.append((now, total))
        if detector.add(now, total):
            # Samples fall on exact quarters, so one sits exactly a window ago.
            window_start_total = next(t for (when, t) in history if when == now - 1.0)
            assert total - window_start_total < 1.0


async def test_drain_order_and_traffic_moved() -> None:
    calls: list[str] = []
    counts = [0]

    def total() -> int:
        # Busy for the first few polls, then quiet.
        if len(calls) == 1 and counts[0] < 100:
            counts[0] += 20
        return counts[0]

    async def announce_draining() -> None:
        calls.append("gshut")

    async def withdraw() -> None:
        calls.append("withdraw")

    report = await drain(
        announce_draining,
        total,
        withdraw,
        quiet_rate_per_s=1.0,
        quiet_window_s=0.2,
        deadline_s=5.0,
        poll_interval_s=0.01,
    )
    assert calls == ["gshut", "withdraw"]
    assert report.outcome is DrainOutcome.TRAFFIC_MOVED


async def test_drain_deadline_bounds_a_busy_node() -> None:
    counts = [0]

    def busy() -> int:
        counts[0] += 100
        return counts[0]

    async def nothing() -> None:
        return None

    report = await drain(
        nothing,
        busy,
        nothing,
        quiet_rate_per_s=1.0,
        quiet_window_s=0.05,
        deadline_s=0.3,
        poll_interval_s=0.01,
    )
    assert report.outcome is DrainOutcome.DEADLINE


async def test_wait_quiet_counts_its_deadline_from_the_given_start() -> None:
    """The agent's drain starts the clock before the draining announcement was sent."""
    started = time.monotonic() - 10  # the deadline is already gone
    report = await wait_quiet(
        lambda: 0, quiet_rate_per_s=1.0, quiet_window_s=5, deadline_s=1, started=started
    )
    assert report.outcome is DrainOutcome.DEADLINE and report.waited_s >= 10


def test_bfdd_config() -> None:
    text = render_bfdd_config(CONFIG)
    assert " peer 198.18.0.5 local-address 198.18.0.6" in text
    assert "transmit-interval 50" in text and "detect-multiplier 4" in text
    assert "receive-interval 100" in text


def test_parse_bfd_peers_and_degraded() -> None:
    text = json.dumps([{"peer": "198.18.0.5", "status": "up"}, {"peer": "bad"}])
    assert parse_bfd_peers(text) == {PEER: "up"}
    assert parse_bfd_peers("not json") == {}
    assert degraded_peers({PEER: "up"}, {PEER}) == []
    assert degraded_peers({PEER: "down"}, {PEER}) == [PEER]
    assert degraded_peers({}, {PEER}) == [PEER]  # bfdd gone: no session at all
    assert degraded_peers({PEER: "down"}, set()) == []  # BGP down too: not this alarm
