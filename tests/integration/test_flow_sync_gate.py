"""The GSLB's flow-sync gate over real HTTP (uvicorn on loopback), on SQLite and on a real
3-member etcd cluster: a weight change waits until the flow-sharing nodes' heartbeats say
their flow tables are in sync, proceeds after `flow_sync_bound_s` when they never do, and
says which it was in a `flow-sync` event; a node of an older contract (no report) holds
it no longer than the bound; a fleet without flow sharing never waits."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from contract.client import ApiClient
from contract.schemas import (
    DesiredState,
    Event,
    ServiceSpec,
    ServiceWeightsUpdate,
    WeightsUpdate,
)
from tests.integration.conftest import NODE_A1, NODE_B1, OPERATOR, ApiUnderTest
from tests.integration.test_api import auth, poll_until, seed

pytestmark = pytest.mark.timeout(120)
TOKENS = {"a1": NODE_A1, "b1": NODE_B1}


def report(peers: dict[str, bool], lag_ms: float = 0.0) -> dict[str, Any]:
    return {
        "forwarding": "on",
        "peers": [
            {"peer": p, "synced": s, "lag_ms": 0.0 if s else lag_ms} for p, s in peers.items()
        ],
    }


class Fleet:
    """a1 and b1 heartbeating every 0.3 s (their TTL is 2 s) with whatever `reports` says:
    a flow-sharing report (contract 3), None (contract 3 without one) or "contract 2"."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.reports: dict[str, dict[str, Any] | str | None] = {"a1": None, "b1": None}
        self.sent: dict[str, int] = {"a1": 0, "b1": 0}

    async def beat(self) -> None:
        async with httpx.AsyncClient(base_url=self.url) as http:
            while True:
                for node, token in TOKENS.items():
                    wanted = self.reports[node]
                    body: dict[str, Any] = {"state": "healthy"}
                    contract = 3
                    if wanted == "contract 2":
                        contract = 2
                    elif isinstance(wanted, dict):
                        body["flowshare"] = wanted
                    answer = await http.post(
                        f"/v1/nodes/{node}/heartbeat",
                        params={"contract": contract},
                        json=body,
                        headers=auth(token),
                    )
                    assert answer.status_code == 200, answer.text
                    self.sent[node] += 1
                await asyncio.sleep(0.3)

    async def settle(self) -> None:
        """Until both nodes were heard with what `reports` says now."""
        seen = dict(self.sent)
        await poll_until(lambda: all(self.sent[n] > seen[n] + 1 for n in self.sent))


@contextlib.asynccontextmanager
async def fleet(api: ApiUnderTest) -> AsyncIterator[Fleet]:
    beating = Fleet(api.url)
    task = asyncio.create_task(beating.beat())
    try:
        await beating.settle()
        yield beating
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def flow_sync_events(client: ApiClient) -> list[Event]:
    return [e for e in await client.events(limit=500) if e.kind == "flow-sync"]


async def set_site_a(client: ApiClient, weight: int) -> DesiredState:
    revision = (await client.state()).revision
    return await client.set_weights(WeightsUpdate(sites={"a": weight}), revision=revision)


async def test_a_weight_change_waits_for_the_flow_tables_then_proceeds(
    api_factory: Callable[..., ApiUnderTest],
) -> None:
    api = api_factory(flow_sync_bound_s=30.0)
    await seed(api)
    async with fleet(api) as nodes, ApiClient([api.url], OPERATOR) as client:
        nodes.reports = {"a1": report({"b1": False}, lag_ms=120.0), "b1": report({"a1": True})}
        await nodes.settle()
        before = (await client.state()).revision
        write = asyncio.create_task(set_site_a(client, 200))
        await asyncio.sleep(1.0)  # the write is held: a1 says b1 lacks its flows
        assert not write.done()
        assert (await client.state()).revision == before
        assert await flow_sync_events(client) == []

        nodes.reports["a1"] = report({"b1": True})
        state = await asyncio.wait_for(write, 20)
        assert state.sites["a"].weight == 200 and state.revision > before
        (event,) = await flow_sync_events(client)
        assert event.subject == "fleet" and event.author == "control-plane"
        assert event.cause.startswith("flow tables in sync on 2 node(s) after ")
        assert event.revision == state.revision  # stored with the write it gated


async def test_out_of_sync_and_an_old_agent_hold_a_change_no_longer_than_the_bound(
    api_factory: Callable[..., ApiUnderTest],
) -> None:
    api = api_factory(flow_sync_bound_s=1.0)
    await seed(api)
    async with fleet(api) as nodes, ApiClient([api.url], OPERATOR) as client:
        # a1 never gets in sync; b1 is an agent of node contract 2 (no report): unknown.
        nodes.reports = {"a1": report({"b1": False}, lag_ms=900.0), "b1": "contract 2"}
        await nodes.settle()
        state = await asyncio.wait_for(set_site_a(client, 250), 20)
        assert state.sites["a"].weight == 250
        (event,) = await flow_sync_events(client)
        assert event.cause.startswith("flow tables not in sync after ")
        assert "(bound 1 s), applied after the bound" in event.cause
        assert "out of sync: a1 (peers b1; lag 900 ms)" in event.cause
        assert "no flow-sharing report from b1" in event.cause


async def test_per_service_weights_are_gated_and_a_fleet_without_sharing_is_not(
    api_factory: Callable[..., ApiUnderTest],
) -> None:
    api = api_factory(flow_sync_bound_s=30.0)
    revision = await seed(api)
    async with fleet(api) as nodes, ApiClient([api.url], OPERATOR) as client:
        state = await client.put_service(
            "web", ServiceSpec(prefix="198.51.100.10/32", ports=[80]), revision=revision
        )
        # Nobody reports flow sharing: applied at once (no wait could end before the
        # 30 s bound otherwise), no event.
        state = await asyncio.wait_for(set_site_a(client, 150), 20)
        assert await flow_sync_events(client) == []

        nodes.reports = {"a1": report({"b1": True}), "b1": report({"a1": True})}
        await nodes.settle()
        update = WeightsUpdate(services={"web": ServiceWeightsUpdate(sites={"b": 300})})
        state = await asyncio.wait_for(client.set_weights(update, revision=state.revision), 20)
        assert state.service_weights["web"].sites == {"b": 300}
        (event,) = await flow_sync_events(client)
        assert event.cause.startswith("flow tables in sync on 2 node(s)")
        # A change that moves no share (a service's ports) is not gated either.
        nodes.reports["a1"] = report({"b1": False})
        await nodes.settle()
        spec = ServiceSpec(prefix="198.51.100.10/32", ports=[80, 443])
        await asyncio.wait_for(client.put_service("web", spec, revision=state.revision), 20)
        assert len(await flow_sync_events(client)) == 1
