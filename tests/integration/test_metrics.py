"""GET /metrics on both stores: what the issue asks to see, parsed as Prometheus parses it."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from contract.client import ApiClient, BudgetRefused
from contract.schemas import DrainKind, Heartbeat, NodeSpec, NodeState, SiteSpec
from tests.integration.conftest import DEFAULT_BUDGET, OPERATOR, VIEWER, ApiUnderTest

pytestmark = pytest.mark.timeout(120)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_show_requests_store_calls_heartbeats_liveness_and_refusals(
    api_factory: Any,
) -> None:
    api: ApiUnderTest = api_factory(budget=DEFAULT_BUDGET)
    async with ApiClient([api.url], OPERATOR) as client:
        state = await client.put_site("a", SiteSpec(), revision=0)
        state = await client.put_node("a1", NodeSpec(site="a"), revision=state.revision)
        await client.heartbeat("a1", Heartbeat(state=NodeState.HEALTHY))
        with pytest.raises(BudgetRefused):  # the only node of the fleet
            await client.drain(DrainKind.NODE, "a1", "x", revision=state.revision)
        await client.watch_state(state.revision, timeout_s=0.1)
        await client.node_desired("a1")  # a snapshot is published
    async with httpx.AsyncClient(base_url=api.url) as http:
        assert (await http.get("/metrics")).status_code == 401
        response = await http.get("/metrics", headers={"Authorization": f"Bearer {VIEWER}"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    got = samples(response.text)

    def value(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted(labels.items())))]

    assert value("gslb_api_requests_total", route="/v1/sites/{name}", method="PUT", status="200")
    assert value("gslb_api_requests_total", route="/v1/drains", method="POST", status="409")
    assert value("gslb_api_request_seconds_count", route="/v1/watch", method="GET") == 1
    assert value("gslb_api_long_polls_open", route="/v1/watch") == 0
    assert value("gslb_api_store_call_seconds_count", operation="write_desired") == 2
    assert value("gslb_api_store_call_errors_total", operation="write_desired") == 0
    assert value("gslb_api_heartbeats_total") == 1
    assert value("gslb_api_budget_refusals_total") == 1
    assert value("gslb_api_nodes", liveness="alive") == 1
    assert value("gslb_api_nodes", liveness="dead") == 0
    if api.kind == "etcd":
        assert value("gslb_api_etcd_watch_streams") == 2
        # The first heartbeat of a node has no known last write: written through.
        assert value("gslb_api_heartbeat_writes_total", how="through") == 1
        assert value("gslb_api_heartbeat_writes_total", how="behind") == 0
        assert value("gslb_api_heartbeat_writes_total", how="skip") == 0


async def test_metrics_show_nodes_behind_the_revision_and_the_budget_headroom(
    api_factory: Any,
) -> None:
    """Three live nodes of one site, one drained: two thirds of the healthy capacity is in
    service (the floor is gslb.yaml's 0.5); the nodes that have not reported the current
    revision are counted as lagging, and one that reports it stops being counted."""
    api: ApiUnderTest = api_factory(budget=DEFAULT_BUDGET)
    async with ApiClient([api.url], OPERATOR) as client:
        state = await client.put_site("a", SiteSpec(), revision=0)
        for name in ("a1", "a2", "a3"):
            state = await client.put_node(name, NodeSpec(site="a"), revision=state.revision)
        for name in ("a1", "a2", "a3"):
            await client.heartbeat(name, Heartbeat(state=NodeState.HEALTHY))
        state = await client.drain(DrainKind.NODE, "a3", "maintenance", revision=state.revision)
        await client.heartbeat(
            "a1", Heartbeat(state=NodeState.HEALTHY, applied_revision=state.revision)
        )
        await client.node_desired("a1")  # a snapshot is published
    async with httpx.AsyncClient(base_url=api.url) as http:
        response = await http.get("/metrics", headers={"Authorization": f"Bearer {VIEWER}"})
    got = samples(response.text)

    def value(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted(labels.items())))]

    assert value("gslb_api_nodes_lagging") == 2  # a2 and a3 run an older revision
    assert value("gslb_api_budget_in_service_share", scope="a") == pytest.approx(2 / 3)
    assert value("gslb_api_budget_in_service_share", scope="fleet") == pytest.approx(2 / 3)
    assert value("gslb_api_budget_min_share", scope="a") == 0.5
    assert value("gslb_api_budget_min_share", scope="fleet") == 0.5
