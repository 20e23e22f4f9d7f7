"""edge.announcer: a planned route change waits for the wired hold (flow sharing: peers
hold this node's flows), in order, the latest wanted state winning; the withdraw of a
node that is down never waits. The speaker is replaced by a recorder of what it is
handed (ExaBGP itself is the integration tests' part)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bgp.policy import Reason, Serving
from edge.announcer import BgpAnnouncer, is_held
from edge.state import Drain, DrainPhase, DrainSource, NodeState, Transition
from tests.unit.test_bgp_announcer import CONFIG


class RecordingSpeaker:
    def __init__(self) -> None:
        self.updates: list[tuple[Serving | None, float | None]] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def update(
        self,
        *,
        serving: Serving | None = None,
        link_bandwidth_mbps: float | None = None,
        group_serving: object = None,
        group_link_bandwidth_mbps: object = None,
    ) -> Reason:
        assert group_serving is None  # no services: the node's own prefixes
        assert not group_link_bandwidth_mbps
        self.updates.append((serving, link_bandwidth_mbps))
        return Reason.ANNOUNCE_HEALTHY


class Hold:
    """A hold that returns only when the test lets it (records what it was asked)."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.release = asyncio.Event()

    async def __call__(self, change: str) -> None:
        self.asked.append(change)
        await self.release.wait()
        self.release.clear()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_only_the_withdraw_of_a_down_node_skips_the_hold() -> None:
    assert [s for s in Serving if not is_held(s)] == [Serving.STOPPED]


@pytest.mark.timeout(10)
async def test_planned_changes_wait_for_the_hold_and_a_failure_does_not(tmp_path: Path) -> None:
    hold = Hold()
    announcer = BgpAnnouncer(CONFIG, tmp_path, before_change=hold)
    speaker = RecordingSpeaker()
    announcer.speaker = speaker  # type: ignore[assignment]
    node: Any = SimpleNamespace(state=NodeState.HEALTHY, drain=Drain())
    await announcer.start(node)
    await settle()
    assert speaker.updates == [] and len(hold.asked) == 1  # the join waits
    hold.release.set()
    await settle()
    assert speaker.updates == [(Serving.FULL, None)]

    announcer.set_link_bandwidth(300.0)  # a weight change waits too
    await settle()
    assert speaker.updates == [(Serving.FULL, None)]
    hold.release.set()
    await settle()
    assert speaker.updates[-1] == (Serving.FULL, 300.0)

    draining = Drain(DrainPhase.MOVING_TRAFFIC, DrainSource.GSLB, "maintenance")
    announcer.on_transition(Transition(NodeState.HEALTHY, NodeState.DRAINING, "drain", draining))
    await settle()
    assert speaker.updates[-1] == (Serving.FULL, 300.0)  # GSHUT is held back
    assert "leaving" in hold.asked[-1]
    moved = asyncio.get_running_loop().create_task(announcer.before_stop_accepting())
    await settle()
    assert not moved.done()  # the drain's wait starts once the held change went out
    moved.cancel()

    # The node fails while the drain's change is held: the withdraw goes at once, and the
    # held change, once released, hands over the latest state (still the withdraw).
    announcer.on_transition(Transition(NodeState.DRAINING, NodeState.DOWN, "failed", draining))
    assert speaker.updates[-1] == (Serving.STOPPED, None)
    hold.release.set()
    await settle()
    assert speaker.updates[-1] == (Serving.STOPPED, None)
    await announcer.stop()


@pytest.mark.timeout(10)
async def test_without_a_hold_changes_go_at_once(tmp_path: Path) -> None:
    announcer = BgpAnnouncer(CONFIG, tmp_path)
    speaker = RecordingSpeaker()
    announcer.speaker = speaker  # type: ignore[assignment]
    node: Any = SimpleNamespace(state=NodeState.HEALTHY, drain=Drain())
    await announcer.start(node)
    announcer.set_link_bandwidth(300.0)
    assert speaker.updates == [(Serving.FULL, None), (Serving.FULL, 300.0)]
    await announcer.stop()
