"""edge.announcer on a reload that starts or removes services (`set_services`): a started
service's prefixes join withdrawn and are announced once it has risen; a removed one is
announced leaving (GRACEFUL_SHUTDOWN and prepends) while it drains, then withdrawn; the
others' advertisements stay exactly as they were. Through the real policy and flap budget
(`bgp.speaker.Announcer`) into a recording driver."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from ipaddress import ip_network
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bgp.config import BgpConfig
from bgp.policy import GRACEFUL_SHUTDOWN, Advertisement, PrefixGroup, Reason
from bgp.speaker import Announcer
from edge.announcer import BgpAnnouncer
from edge.config import parse_config
from edge.services import ServiceState
from edge.state import Drain, NodeState, Transition
from tests.unit.test_announcer_hold import Hold, settle
from tests.unit.test_bgp_announcer import FakeDriver
from tests.unit.test_dual_stack import BGP, TWO

CONFIG = BgpConfig.model_validate(BGP)
WEB4, WEB6 = parse_config(TWO).service_list()


class PolicySpeaker:
    """The speaker's policy half (no ExaBGP): what it would put on the wire."""

    def __init__(self, groups: Sequence[PrefixGroup]) -> None:
        self.driver = FakeDriver()
        self.announcer = Announcer(CONFIG, self.driver, groups)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.announcer.close()

    def set_groups(self, groups: Sequence[PrefixGroup]) -> None:
        self.announcer.set_groups(groups)

    def update(self, **changes: Any) -> Reason:
        return self.announcer.update(**changes)

    def wire(self) -> dict[str, Advertisement]:
        return {str(adv.prefix.network_address): adv for adv in self.driver.desired}


def _node(states: Mapping[str, ServiceState]) -> Any:
    return SimpleNamespace(
        state=NodeState.HEALTHY, drain=Drain(), service_states=lambda: dict(states)
    )


def _tick(announcer: BgpAnnouncer) -> None:
    state = NodeState.HEALTHY
    announcer.on_transition(Transition(state, state, "service changed", Drain()))


async def _announcer(
    tmp_path: Path, states: dict[str, ServiceState], hold: Hold | None = None
) -> tuple[BgpAnnouncer, PolicySpeaker]:
    announcer = BgpAnnouncer(CONFIG, tmp_path, [WEB4], before_change=hold)
    speaker = PolicySpeaker(announcer.groups)
    announcer.speaker = speaker  # type: ignore[assignment]
    await announcer.start(_node(states))
    return announcer, speaker


@pytest.mark.timeout(10)
async def test_a_started_service_waits_for_its_health_and_a_removed_one_leaves(
    tmp_path: Path,
) -> None:
    states = {"web4": ServiceState.HEALTHY}
    announcer, speaker = await _announcer(tmp_path, states)
    web4 = speaker.wire()["198.51.100.10"]
    assert GRACEFUL_SHUTDOWN not in web4.communities

    # web6 starts: it has a runtime (starting) and joins the groups, withdrawn.
    states["web6"] = ServiceState.STARTING
    announcer.set_services([WEB4, WEB6], set())
    assert set(speaker.wire()) == {"198.51.100.10"}
    assert speaker.wire()["198.51.100.10"] == web4
    states["web6"] = ServiceState.HEALTHY  # risen
    _tick(announcer)
    assert set(speaker.wire()) == {"198.51.100.10", "2001:db8:100::10"}
    assert speaker.wire()["198.51.100.10"] == web4
    web6 = speaker.wire()["2001:db8:100::10"]

    # web4 is removed: leaving while it drains (as the GSLB's per-service drain), web6 as it was.
    announcer.set_services([WEB4, WEB6], {"web4"})
    leaving = speaker.wire()["198.51.100.10"]
    assert GRACEFUL_SHUTDOWN in leaving.communities and leaving.as_path_prepends > 0
    assert speaker.wire()["2001:db8:100::10"] == web6
    # A removed service that fails while it drains is withdrawn at once.
    states["web4"] = ServiceState.DOWN
    _tick(announcer)
    assert set(speaker.wire()) == {"2001:db8:100::10"}
    states["web4"] = ServiceState.HEALTHY
    _tick(announcer)
    assert GRACEFUL_SHUTDOWN in speaker.wire()["198.51.100.10"].communities
    # Drained: gone from the groups, withdrawn.
    del states["web4"]
    announcer.set_services([WEB6], set())
    assert speaker.wire() == {"2001:db8:100::10": web6}
    assert [g.name for g in speaker.announcer.inputs.groups] == ["web6"]
    await announcer.stop()


@pytest.mark.timeout(10)
async def test_a_reload_goes_through_the_planned_change_hold(tmp_path: Path) -> None:
    hold = Hold()
    states = {"web4": ServiceState.HEALTHY}
    announcer, speaker = await _announcer(tmp_path, states, hold)
    hold.release.set()
    await settle()
    assert set(speaker.wire()) == {"198.51.100.10"}
    # Only the groups change (web4 reconfigured with another prefix; no service's serving
    # changes): still handed over, once the hold returns.
    moved = WEB4.model_copy(update={"prefixes": [ip_network("198.51.100.11/32")]})
    announcer.set_services([moved], set())
    await settle()
    assert set(speaker.wire()) == {"198.51.100.10"}
    hold.release.set()
    await settle()
    assert set(speaker.wire()) == {"198.51.100.11"}
    await announcer.stop()
    await asyncio.sleep(0)
