"""bgp.speaker.Announcer: policy through the flap budget into a driver's desired set."""

from __future__ import annotations

import asyncio
from collections.abc import Set

from bgp.config import BgpConfig
from bgp.policy import GRACEFUL_SHUTDOWN, Advertisement, Reason, Serving
from bgp.speaker import Announcer

CONFIG = BgpConfig.model_validate(
    {
        "local_asn": 65101,
        "router_id": "198.18.0.2",
        "local_address": "198.18.0.2",
        "prefixes": ["198.51.100.10/32"],
        "neighbors": [{"peer_address": "198.18.0.1", "peer_asn": 65000}],
        "flap": {"max_changes_per_minute": 4, "initial_backoff_s": 0.2, "max_backoff_s": 1},
    }
)


class FakeDriver:
    def __init__(self) -> None:
        self.desired: frozenset[Advertisement] = frozenset()
        self.history: list[frozenset[Advertisement]] = []

    def set_desired(self, advertisements: Set[Advertisement]) -> None:
        self.desired = frozenset(advertisements)
        self.history.append(self.desired)


async def test_fail_closed_then_announce_and_drain() -> None:
    driver = FakeDriver()
    announcer = Announcer(CONFIG, driver)
    assert announcer.update(link_bandwidth_mbps=250.0) is Reason.WITHDRAW_STARTING
    assert driver.desired == frozenset()
    assert announcer.update(serving=Serving.FULL) is Reason.ANNOUNCE_HEALTHY
    (adv,) = driver.desired
    assert adv.link_bandwidth_bytes_per_s == 250e6 / 8
    assert announcer.update(serving=Serving.LEAVING) is Reason.ANNOUNCE_DRAINING
    (adv,) = driver.desired
    assert GRACEFUL_SHUTDOWN in adv.communities
    assert adv.link_bandwidth_bytes_per_s == 250e6 / 8  # the drain keeps the bandwidth
    assert announcer.update(serving=Serving.LEFT) is Reason.WITHDRAW_DRAINED
    assert driver.desired == frozenset()
    announcer.close()


async def test_flapping_is_held_down_but_withdraws_are_not() -> None:
    """Every change counts against the budget (withdraws too); only announces wait."""
    driver = FakeDriver()
    announcer = Announcer(CONFIG, driver)
    for _ in range(2):
        announcer.update(serving=Serving.FULL)
        assert driver.desired
        announcer.update(serving=Serving.STOPPED)
        assert driver.desired == frozenset()  # withdraw: at once, always
    announcer.update(serving=Serving.FULL)  # 5th change in a minute: over budget
    assert driver.desired == frozenset() and announcer.held_until > 0
    announcer.update(serving=Serving.STOPPED)
    announcer.update(serving=Serving.FULL)
    assert driver.desired == frozenset()  # still held
    await asyncio.sleep(0.35)  # the hold-down expires: the latest wish goes out
    assert driver.desired and announcer.held_until == 0.0
    announcer.close()
