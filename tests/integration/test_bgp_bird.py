"""bgp against BIRD 2 as the peer router, in network namespaces, with real ExaBGP.

BIRD runs with a kernel protocol, so its choice shows in the router namespace's FIB, and
an import filter that takes only the anycast range and honours GRACEFUL_SHUTDOWN with
local-pref 0 (what deploy/bird/bird.conf ships). Every test builds its own lab and always
tears it down; nothing asserts a timing (those are in `make bench-bgp`).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.bgp_checks import (
    bird_view,
    freeze_agent_alone,
    freeze_whole_group,
    kill_agent,
    require_router,
)
from tests.support.netlab import NetLab

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]


@pytest.fixture
def lab() -> Iterator[NetLab]:
    require_router("bird")
    built = NetLab.create(1, router="bird")
    try:
        yield built
    finally:
        built.close()


def test_sigstop_of_the_agent_alone_withdraws_and_sigcont_reannounces(lab: NetLab) -> None:
    assert lab.bird
    freeze_agent_alone(lab, bird_view(lab.bird))


def test_sigstop_of_the_whole_process_group_ends_with_the_hold_timer(lab: NetLab) -> None:
    assert lab.bird
    freeze_whole_group(lab, bird_view(lab.bird))


def test_killed_agent_takes_its_route_and_exabgp_with_it(lab: NetLab) -> None:
    kill_agent(lab)
