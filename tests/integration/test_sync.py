"""edge.sync.ControlPlaneSync against real API instances (uvicorn + etcd): it follows changes,
keeps its last known good view when every API is gone (also across a restart, from disk),
and picks changes up again when one API returns."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from api.app import create_app
from api.store import open_store
from contract.client import ApiClient
from contract.schemas import (
    AdminState,
    DrainKind,
    Heartbeat,
    NodeDesired,
    NodeSpec,
    NodeState,
    SiteSpec,
)
from edge.sync import ControlPlaneSync
from tests.integration.conftest import NODE_A1, OPERATOR, VIEWER, make_settings
from tests.support.etcd_cluster import LocalEtcdCluster
from tests.support.server import ThreadedServer

pytestmark = pytest.mark.timeout(120)


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the bound")
        await asyncio.sleep(0.05)


def make_sync(
    endpoints: list[str], state_path: Path, applied: list[NodeDesired]
) -> ControlPlaneSync:
    async def on_desired(view: NodeDesired) -> None:
        applied.append(view)

    return ControlPlaneSync(
        endpoints=endpoints,
        token=NODE_A1,
        node="a1",
        state_path=state_path,
        heartbeat=lambda: Heartbeat(state=NodeState.HEALTHY, connections=3),
        on_desired=on_desired,
        heartbeat_interval_s=0.2,
        long_poll_s=2.0,
        request_timeout_s=1.0,
    )


async def test_sync_keeps_last_known_good_without_api_and_resumes(
    etcd_cluster: LocalEtcdCluster, tmp_path: Path
) -> None:
    prefix = f"/sync-{uuid.uuid4().hex[:8]}/"
    settings = make_settings("etcd", tmp_path, etcd_cluster, prefix)
    servers = [
        ThreadedServer(lambda: create_app(open_store(settings.store), settings)) for _ in range(2)
    ]
    state_path = tmp_path / "agent" / "desired.json"
    applied: list[NodeDesired] = []
    sync = make_sync([s.url for s in servers], state_path, applied)
    try:
        for server in servers:
            server.start()
        async with ApiClient([servers[0].url], OPERATOR) as operator:
            state = await operator.put_site("a", SiteSpec(), revision=0)
            state = await operator.put_node("a1", NodeSpec(site="a"), revision=state.revision)
        sync.start()
        # a1 is the fleet: its share is the whole link bandwidth, pushed to it.
        await wait_for(lambda: bool(applied) and applied[-1].link_bandwidth_mbps == 1000)
        assert not sync.stale
        in_force = applied[-1]

        for server in servers:
            server.stop()
        await wait_for(lambda: sync.stale)
        assert sync.desired == in_force  # still serving on the last known good view
        assert NodeDesired.model_validate_json(state_path.read_bytes()) == in_force

        # An agent restarted while no API answers starts from the view on disk.
        restarted_views: list[NodeDesired] = []
        restarted = make_sync([s.url for s in servers], state_path, restarted_views)
        restarted.start()
        await wait_for(lambda: bool(restarted_views))
        assert restarted_views[0] == in_force
        assert restarted.stale
        await restarted.stop()

        # One API comes back; a change made through it reaches the node.
        servers[1].start()
        async with ApiClient([servers[1].url], OPERATOR) as operator:
            state = await operator.drain(
                DrainKind.NODE, "a1", "kernel upgrade", revision=state.revision
            )
        await wait_for(lambda: applied[-1].revision == state.revision)
        assert applied[-1].admin_state is not AdminState.ACTIVE
        assert "kernel upgrade" in applied[-1].drain_reason
        assert applied[-1].link_bandwidth_mbps == 1000  # kept for the drain's GSHUT phase
        await wait_for(lambda: not sync.stale)

        # ...and the node reports the revision it applied.
        async with ApiClient([servers[1].url], VIEWER) as viewer:
            for _ in range(100):
                if "a1" in (await viewer.convergence()).applied:
                    break
                await asyncio.sleep(0.1)
            assert (await viewer.convergence()).applied == ["a1"]
    finally:
        await sync.stop()
        for server in servers:
            server.stop()
