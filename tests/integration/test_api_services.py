"""Per-service weights and drains over real HTTP (uvicorn on loopback), against SQLite and
a real 3-member etcd cluster: revisions and If-Match like every other write, the per-service
shares, each node's per-service view, and an agent of node contract 2 still served."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from contract.client import ApiClient, BudgetRefused, Conflict, InvalidRequest, NotFound
from contract.schemas import (
    AdminState,
    BudgetBound,
    DesiredSpec,
    DrainKind,
    Heartbeat,
    NodeState,
    ServiceReport,
    ServiceSpec,
    ServiceState,
    ServiceWeightsUpdate,
    WeightsUpdate,
)
from tests.integration.conftest import NODE_A1, NODE_B1, OPERATOR, VIEWER, ApiUnderTest
from tests.integration.test_api import auth, poll_until, seed

pytestmark = pytest.mark.timeout(120)

BOTH = [
    ServiceReport(name="web", state=ServiceState.HEALTHY),
    ServiceReport(name="dns", state=ServiceState.HEALTHY),
]


async def seed_services(api: ApiUnderTest) -> int:
    """seed()'s a1, a2 (site a, weight 300) and b1 (site b, 100), with services web and dns;
    a1 and b1 alive with both services healthy."""
    revision = await seed(api)
    async with ApiClient([api.url], OPERATOR) as client:
        state = await client.put_service(
            "web", ServiceSpec(prefix="198.51.100.10/32", ports=[80]), revision=revision
        )
        state = await client.put_service(
            "dns", ServiceSpec(prefix="2001:db8::53/128", ports=[53]), revision=state.revision
        )
    for node, token in (("a1", NODE_A1), ("b1", NODE_B1)):
        async with ApiClient([api.url], token) as agent:
            await agent.heartbeat(node, Heartbeat(state=NodeState.HEALTHY, services=BOTH))
    return state.revision


async def test_a_service_drain_is_a_revisioned_write_that_drains_only_that_service(
    api: ApiUnderTest,
) -> None:
    revision = await seed_services(api)
    async with httpx.AsyncClient(base_url=api.url, headers=auth(OPERATOR)) as http:
        body = {"kind": "node", "name": "a1", "reason": "web release", "service": "web"}
        missing = await http.post("/v1/drains", json=body)
        assert missing.status_code == 428
        stale = await http.post("/v1/drains", json=body, headers={"If-Match": f'"{revision - 1}"'})
        assert stale.status_code == 412
        assert stale.json()["current"]["revision"] == revision
        done = await http.post("/v1/drains", json=body, headers={"If-Match": f'"{revision}"'})
        assert done.status_code == 200, done.text
        drained = done.json()["revision"]
        assert drained > revision
        assert done.headers["ETag"] == f'"{drained}"'
        [drain] = done.json()["drains"]
        assert (drain["kind"], drain["name"], drain["service"]) == ("node", "a1", "web")
        events = (await http.get("/v1/events")).json()["events"]
        assert events[-1]["cause"] == "service web on node drained: web release"

    async with ApiClient([api.url], NODE_A1) as agent:
        view = await agent.node_desired("a1")
    # The node itself stays active; only web is drained on it, dns is untouched.
    assert view.admin_state is AdminState.ACTIVE
    assert view.service_desired["web"].admin_state is AdminState.DRAINING
    assert view.service_desired["web"].drain_reason == "service web drained: web release"
    assert view.service_desired["dns"].admin_state is AdminState.ACTIVE

    async with ApiClient([api.url], VIEWER) as viewer:
        weights = await viewer.effective_weights()
    # Site a serves with half its capacity (a2 never heard from): 300 x 1/2 against 100.
    assert weights.nodes == {"a1": 600.0, "a2": 0.0, "b1": 400.0}
    assert weights.services["web"].nodes == {"a1": 0.0, "a2": 0.0, "b1": 1000.0}
    assert weights.services["dns"].nodes == weights.nodes

    async with ApiClient([api.url], OPERATOR) as client:
        # Undrain without --service ends the node's own drain only: there is none.
        with pytest.raises(NotFound):
            await client.undrain(DrainKind.NODE, "a1", revision=drained)
        with pytest.raises(Conflict):
            await client.undrain(DrainKind.NODE, "a1", revision=revision, service="web")
        state = await client.undrain(DrainKind.NODE, "a1", revision=drained, service="web")
        assert state.drains == []
        with pytest.raises(InvalidRequest) as unknown:
            await client.drain(DrainKind.NODE, "a1", "x", revision=state.revision, service="nosuch")
        assert unknown.value.field == "service"


async def test_a_site_drain_of_a_service_and_node_drains_combine(api: ApiUnderTest) -> None:
    revision = await seed_services(api)
    async with ApiClient([api.url], OPERATOR) as client:
        state = await client.drain(
            DrainKind.SITE, "a", "dns move", revision=revision, service="dns"
        )
        state = await client.drain(DrainKind.NODE, "b1", "kernel", revision=state.revision)
    async with ApiClient([api.url], VIEWER) as viewer:
        weights = await viewer.effective_weights()
    # b1 drained for everything, a drained for dns: web on a1, dns nowhere.
    assert weights.nodes == {"a1": 1000.0, "a2": 0.0, "b1": 0.0}
    assert weights.services["web"].nodes == {"a1": 1000.0, "a2": 0.0, "b1": 0.0}
    assert weights.services["dns"].nodes == {"a1": 0.0, "a2": 0.0, "b1": 0.0}
    async with ApiClient([api.url], NODE_B1) as agent:
        view = await agent.node_desired("b1")
    assert view.admin_state is AdminState.DRAINING
    assert {s: v.drain_source for s, v in view.service_desired.items()} == {
        "web": DrainKind.NODE,
        "dns": DrainKind.NODE,
    }
    async with ApiClient([api.url], NODE_A1) as agent:
        view = await agent.node_desired("a1")
    assert view.service_desired["dns"].drain_reason == "service dns drained on site a: dns move"
    assert view.service_desired["web"].admin_state is AdminState.ACTIVE


async def test_service_weights_are_revisioned_and_move_only_their_service(
    api: ApiUnderTest,
) -> None:
    revision = await seed_services(api)
    update = WeightsUpdate(services={"web": ServiceWeightsUpdate(sites={"a": 200, "b": 300})})
    async with ApiClient([api.url], OPERATOR) as client:
        with pytest.raises(Conflict) as conflict:
            await client.set_weights(update, revision=revision - 1)
        assert conflict.value.current is not None
        assert conflict.value.current.revision == revision
        state = await client.set_weights(update, revision=revision)
        assert state.service_weights["web"].sites == {"a": 200, "b": 300}
        assert state.sites["a"].weight == 300  # the site's own weight is untouched
        with pytest.raises(InvalidRequest) as bad:
            await client.set_weights(
                WeightsUpdate(services={"web": ServiceWeightsUpdate(nodes={"zz": 1})}),
                revision=state.revision,
            )
        assert bad.value.field == "services.web.nodes.zz"
    async with ApiClient([api.url], VIEWER) as viewer:
        weights = await viewer.effective_weights()
    # web: site a 200 x 1/2 (a2 never heard from) against site b 300.
    assert weights.nodes == {"a1": 600.0, "a2": 0.0, "b1": 400.0}
    assert weights.services["web"].nodes == {"a1": 250.0, "a2": 0.0, "b1": 750.0}
    assert weights.services["dns"].nodes == weights.nodes
    async with ApiClient([api.url], NODE_B1) as agent:
        view = await agent.node_desired("b1")
    assert (view.link_bandwidth_mbps, view.service_desired["web"].link_bandwidth_mbps) == (
        400.0,
        750.0,
    )

    async with ApiClient([api.url], OPERATOR) as client:
        # null clears the service's own weight; a declarative apply keeps the others.
        cleared = WeightsUpdate(services={"web": ServiceWeightsUpdate(sites={"a": None})})
        state = await client.set_weights(cleared, revision=state.revision)
        assert state.service_weights["web"].sites == {"b": 300}
        spec = DesiredSpec(sites=state.sites, nodes=state.nodes, services=state.services)
        state = await client.apply_state(spec, revision=state.revision)
        assert state.service_weights["web"].sites == {"b": 300}
        state = await client.delete_service("web", revision=state.revision)
        assert state.service_weights == {}


async def test_an_agent_of_node_contract_2_gets_its_own_shape(api: ApiUnderTest) -> None:
    """Agents of contract 2 read no per-service fields and refuse unknown ones: they get the
    view without them, and keep working (node and site drains reach them as before)."""
    revision = await seed_services(api)
    async with ApiClient([api.url], OPERATOR) as client:
        await client.drain(DrainKind.NODE, "a1", "web only", revision=revision, service="web")
    async with httpx.AsyncClient(base_url=api.url, headers=auth(NODE_A1)) as old_agent:
        answer = await old_agent.post(
            "/v1/nodes/a1/heartbeat", params={"contract": 2}, json={"state": "healthy"}
        )
        assert answer.status_code == 200, answer.text
        view = answer.json()
        assert view["contract_version"] == 2
        assert "service_desired" not in view
        assert view["admin_state"] == "active"
        polled = await old_agent.get("/v1/nodes/a1/desired", params={"contract": 2})
        assert polled.status_code == 200
        assert "service_desired" not in polled.json()
        refused = await old_agent.get("/v1/nodes/a1/desired", params={"contract": 4})
        assert refused.status_code == 426
        assert "versions 2 and 3" in refused.json()["detail"]


async def test_the_budget_refuses_a_service_drain_that_empties_a_site_of_it(
    api_factory: Callable[..., ApiUnderTest],
) -> None:
    api = api_factory(budget={})
    revision = await seed_services(api)
    async with ApiClient([api.url], OPERATOR) as client:
        # a1 is the only live node of site a: draining web there leaves site a no web.
        with pytest.raises(BudgetRefused) as refused:
            await client.drain(DrainKind.NODE, "a1", "web", revision=revision, service="web")
        assert [(b.scope, b.bound) for b in refused.value.breaches] == [
            ("service web site a", BudgetBound.MIN_SHARE)
        ]
        state = await client.drain(
            DrainKind.NODE, "a1", "web", revision=revision, service="web", override="test"
        )
        events = await client.events(limit=3)
    assert any(e.kind == "budget-override" and "service web" in e.cause for e in events)
    assert state.drains[0].service == "web"


async def test_heartbeats_with_a_service_down_move_that_services_share(
    api: ApiUnderTest,
) -> None:
    await seed_services(api)
    web_down = [
        ServiceReport(name="web", state=ServiceState.DOWN),
        ServiceReport(name="dns", state=ServiceState.HEALTHY),
    ]
    async with ApiClient([api.url], NODE_B1) as agent:
        await agent.heartbeat("b1", Heartbeat(state=NodeState.HEALTHY, services=web_down))

    async def moved() -> bool:
        async with ApiClient([api.url], VIEWER) as viewer:
            weights = await viewer.effective_weights()
        return weights.services["web"].nodes.get("b1") == 0.0

    await poll_until(moved)
    async with ApiClient([api.url], VIEWER) as viewer:
        weights = await viewer.effective_weights()
    assert weights.services["web"].nodes == {"a1": 1000.0, "a2": 0.0, "b1": 0.0}
    assert weights.services["dns"].nodes == {"a1": 600.0, "a2": 0.0, "b1": 400.0}
