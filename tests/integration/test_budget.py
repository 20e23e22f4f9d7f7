"""The disruption budget over real HTTP, on SQLite and on the real etcd cluster: a drain that
would break it is refused with the numbers, racing drains cannot both pass, and an override
needs a reason and leaves an event with its author."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from contract.client import ApiClient, BudgetRefused
from contract.schemas import DrainKind, Heartbeat, NodeSpec, NodeState, SiteSpec
from tests.integration.conftest import DEFAULT_BUDGET, OPERATOR, ApiUnderTest

pytestmark = pytest.mark.timeout(120)
AUTH = {"Authorization": f"Bearer {OPERATOR}"}


@pytest.fixture
def api(api_factory: Any) -> ApiUnderTest:
    """With gslb.yaml's default budget: half of each site's and the fleet's healthy
    capacity stays in service."""
    started: ApiUnderTest = api_factory(budget=DEFAULT_BUDGET)
    return started


async def live_fleet(api: ApiUnderTest) -> int:
    """Site a: a1, a2; site b: b1 (1000 Mbit/s each), all three heartbeating healthy."""
    async with ApiClient([api.url], OPERATOR) as client:
        state = await client.put_site("a", SiteSpec(), revision=0)
        state = await client.put_site("b", SiteSpec(), revision=state.revision)
        for name, site in (("a1", "a"), ("a2", "a"), ("b1", "b")):
            state = await client.put_node(name, NodeSpec(site=site), revision=state.revision)
        for name in ("a1", "a2", "b1"):
            await client.heartbeat(name, Heartbeat(state=NodeState.HEALTHY))
        return state.revision


def drain_body(name: str) -> dict[str, str]:
    return {"kind": "node", "name": name, "reason": "kernel upgrade"}


async def test_a_drain_that_breaks_the_budget_is_refused_with_the_numbers(
    api: ApiUnderTest,
) -> None:
    revision = await live_fleet(api)
    async with httpx.AsyncClient(base_url=api.url, headers=AUTH) as http:
        first = await http.post(
            "/v1/drains", json=drain_body("a1"), headers={"If-Match": f'"{revision}"'}
        )
        assert first.status_code == 200, first.text
        revision = first.json()["revision"]
        second = await http.post(
            "/v1/drains", json=drain_body("a2"), headers={"If-Match": f'"{revision}"'}
        )
        assert second.status_code == 409, second.text
        body = second.json()
        assert body["field"] == "budget"
        site = next(b for b in body["budget"] if b["scope"] == "site a")
        assert (site["in_service_mbps"], site["would_leave_mbps"], site["healthy_mbps"]) == (
            1000,
            0,
            2000,
        )
        assert site["min_in_service_mbps"] == 1000
        assert "this would leave 0" in body["detail"]
        state = (await http.get("/v1/state")).json()
        assert state["revision"] == revision  # nothing written
        # Undrain always passes, and a weight that takes a2 out is judged the same way.
        weights = await http.put(
            "/v1/weights", json={"nodes": {"a2": 0}}, headers={"If-Match": f'"{revision}"'}
        )
        assert weights.status_code == 409
        undrain = await http.delete("/v1/drains/node/a1", headers={"If-Match": f'"{revision}"'})
        assert undrain.status_code == 200


async def test_racing_drains_exactly_one_passes(api: ApiUnderTest) -> None:
    """Each drain alone is allowed, both together would empty site a. Sent at once on the
    same revision: one passes; the other, retried on the new revision, is refused."""
    revision = await live_fleet(api)
    async with ApiClient([api.url], OPERATOR) as one, ApiClient([api.url], OPERATOR) as two:
        results = await asyncio.gather(
            one.drain(DrainKind.NODE, "a1", "race", revision=revision),
            two.drain(DrainKind.NODE, "a2", "race", revision=revision),
            return_exceptions=True,
        )
        passed = [r for r in results if not isinstance(r, BaseException)]
        assert len(passed) == 1, results
        loser = "a2" if results[0] is passed[0] else "a1"
        with pytest.raises(BudgetRefused) as refused:
            await one.drain(DrainKind.NODE, loser, "race", revision=passed[0].revision)
        assert any(b.scope == "site a" for b in refused.value.breaches)
        drained = {d.name for d in (await one.state()).drains}
        assert len(drained) == 1


async def test_an_override_needs_a_reason_and_is_an_event_with_its_author(
    api: ApiUnderTest,
) -> None:
    revision = await live_fleet(api)
    async with ApiClient([api.url], OPERATOR) as client:
        state = await client.drain(DrainKind.NODE, "a1", "first", revision=revision)
        async with httpx.AsyncClient(base_url=api.url, headers=AUTH) as http:
            blank = await http.post(
                "/v1/drains",
                json=drain_body("a2"),
                headers={"If-Match": f'"{state.revision}"', "Budget-Override": ""},
            )
        assert blank.status_code == 422 and blank.json()["field"] == "Budget-Override"
        state = await client.drain(
            DrainKind.NODE, "a2", "rack move", revision=state.revision, override="rack move ok'd"
        )
        assert {d.name for d in state.drains} == {"a1", "a2"}
        [event] = [e for e in await client.events() if e.kind == "budget-override"]
        assert event.author == "alice"
        assert "rack move ok'd" in event.cause and "site a" in event.cause
