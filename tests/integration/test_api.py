"""The API over real HTTP (uvicorn on loopback), against SQLite and a real etcd cluster."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from api.app import GslbApi
from api.heartbeat_writes import dead_within_s
from api.routes.heartbeats import HeartbeatFastPath
from contract.client import ApiClient, Conflict, Forbidden, InvalidRequest
from contract.schemas import (
    NODE_CONTRACT_VERSION,
    AdminState,
    DesiredSpec,
    DrainKind,
    Heartbeat,
    Liveness,
    NodeDesired,
    NodeSpec,
    NodeState,
    SiteSpec,
)
from tests.integration.conftest import NODE_A1, NODE_B1, OPERATOR, VIEWER, ApiUnderTest

pytestmark = pytest.mark.timeout(120)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def seed(api: ApiUnderTest) -> int:
    """Two sites, a1/a2 in a, b1 in b. Returns the revision."""
    async with ApiClient([api.url], OPERATOR) as client:
        state = await client.put_site("a", SiteSpec(weight=300), revision=0)
        state = await client.put_site("b", SiteSpec(weight=100), revision=state.revision)
        for name, site in (("a1", "a"), ("a2", "a"), ("b1", "b")):
            state = await client.put_node(name, NodeSpec(site=site), revision=state.revision)
        return state.revision


async def poll_until(predicate: Callable[[], object], timeout_s: float = 10.0) -> None:
    """Bounded polling (no timed assertion): fail only if it never happens."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met within the bound")


async def test_revisioned_writes_need_if_match_and_return_etag(api: ApiUnderTest) -> None:
    async with httpx.AsyncClient(base_url=api.url, headers=auth(OPERATOR)) as http:
        missing = await http.put("/v1/sites/a", json={"weight": 1})
        assert missing.status_code == 428
        assert missing.json()["field"] == "If-Match"

        created = await http.put("/v1/sites/a", json={"weight": 1}, headers={"If-Match": '"0"'})
        assert created.status_code == 200
        revision = created.json()["revision"]
        assert created.headers["ETag"] == f'"{revision}"'

        stale = await http.put("/v1/sites/a", json={"weight": 2}, headers={"If-Match": '"0"'})
        assert stale.status_code == 412
        assert stale.json()["current"]["revision"] == revision
        assert stale.json()["current"]["sites"]["a"]["weight"] == 1

        events = (await http.get("/v1/events")).json()["events"]
        assert [(e["kind"], e["subject"], e["author"]) for e in events] == [
            ("site-set", "a", "alice")
        ]


async def test_concurrent_conflicting_writes_exactly_one_wins(api: ApiUnderTest) -> None:
    revision = await seed(api)
    async with httpx.AsyncClient(base_url=api.url, headers=auth(OPERATOR)) as http:

        async def write(weight: int) -> httpx.Response:
            return await http.put(
                "/v1/weights",
                json={"sites": {"a": weight}},
                headers={"If-Match": f'"{revision}"'},
            )

        responses = await asyncio.gather(*(write(w) for w in range(1, 7)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200] + [412] * 5
        winner = next(r for r in responses if r.status_code == 200).json()
        for loser in (r for r in responses if r.status_code == 412):
            assert loser.json()["current"] == winner
        final = (await http.get("/v1/state")).json()
        assert final["sites"]["a"]["weight"] == winner["sites"]["a"]["weight"]


async def test_retried_write_with_same_idempotency_key_is_recognised(api: ApiUnderTest) -> None:
    revision = await seed(api)
    headers = {"If-Match": f'"{revision}"', "Idempotency-Key": "retry-me-1"}
    async with httpx.AsyncClient(base_url=api.url, headers=auth(OPERATOR)) as http:
        first = await http.put("/v1/weights", json={"sites": {"b": 7}}, headers=headers)
        again = await http.put("/v1/weights", json={"sites": {"b": 7}}, headers=headers)
        other = await http.put(
            "/v1/weights", json={"sites": {"b": 8}}, headers={"If-Match": f'"{revision}"'}
        )
    assert first.status_code == again.status_code == 200
    assert first.json()["revision"] == again.json()["revision"]
    assert other.status_code == 412


async def test_idempotency_key_reused_for_another_request_is_422(api: ApiUnderTest) -> None:
    revision = await seed(api)
    headers = {"If-Match": f'"{revision}"', "Idempotency-Key": "reused-1"}
    async with httpx.AsyncClient(base_url=api.url, headers=auth(OPERATOR)) as http:
        first = await http.put("/v1/weights", json={"sites": {"b": 7}}, headers=headers)
        other_body = await http.put("/v1/weights", json={"sites": {"b": 9}}, headers=headers)
        other_path = await http.put("/v1/sites/c", json={"weight": 7}, headers=headers)
        state = (await http.get("/v1/state")).json()
    assert first.status_code == 200
    for refused in (other_body, other_path):
        assert refused.status_code == 422, refused.text
        assert refused.json()["field"] == "Idempotency-Key"
    # nothing of the second requests was written
    assert state["revision"] == first.json()["revision"]
    assert state["sites"]["b"]["weight"] == 7 and "c" not in state["sites"]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/sites/a", {"weight": 1, "colour": "red"}, "colour"),
        ("/v1/sites/a", {"weight": "heavy"}, "weight"),
        ("/v1/sites/a", {"weight": "7"}, "weight"),
        ("/v1/sites/a", {"weight": True}, "weight"),
        ("/v1/sites/a", {"weight": 7.0}, "weight"),
        ("/v1/weights", {"sites": {"a": True}}, "sites.a"),
        ("/v1/weights", {"sites": {"a": "7"}}, "sites.a"),
        ("/v1/services/web", {"prefix": "198.51.100.0/24", "ports": [True]}, "ports.0"),
        ("/v1/sites/a", {"weight": 1001}, "weight"),
        ("/v1/sites/a", {"weight": -1}, "weight"),
        ("/v1/nodes/z1", {"site": "nowhere"}, "site"),
        ("/v1/weights", {"nodes": {"ghost": 1}}, "nodes.ghost"),
        ("/v1/sites/Bad_Name", {"weight": 1}, "name"),
    ],
)
async def test_bad_input_is_422_naming_the_field(
    api: ApiUnderTest, path: str, body: object, field: str
) -> None:
    revision = await seed(api)
    async with httpx.AsyncClient(base_url=api.url, headers=auth(OPERATOR)) as http:
        response = await http.put(path, json=body, headers={"If-Match": f'"{revision}"'})
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field


async def test_oversized_and_malformed_bodies_are_refused_without_500(api: ApiUnderTest) -> None:
    async with httpx.AsyncClient(base_url=api.url, headers=auth(OPERATOR)) as http:
        big = await http.put(
            "/v1/weights", content=b"{" + b" " * 20000 + b"}", headers={"If-Match": '"0"'}
        )
        assert big.status_code == 413

        async def chunks() -> object:
            for _ in range(40):
                yield b" " * 1000

        # A chunked body has no Content-Length: it is cut off once past the limit. The client
        # sees the 413, or a reset if it was still sending when the server closed.
        try:
            streamed = await http.put("/v1/weights", content=chunks(), headers={"If-Match": '"0"'})
            assert streamed.status_code == 413
        except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
            pass
        assert (await http.get("/healthz")).status_code == 200
        garbage = await http.put(
            "/v1/weights",
            content=b"\xff{not json",
            headers={"If-Match": '"0"', "Content-Type": "application/json"},
        )
        assert garbage.status_code in (400, 422)


async def test_roles_node_token_cannot_write_or_act_for_another_node(api: ApiUnderTest) -> None:
    revision = await seed(api)
    async with ApiClient([api.url], NODE_A1) as node_a1:
        with pytest.raises(Forbidden):
            await node_a1.put_site("a", SiteSpec(weight=1), revision=revision)
        with pytest.raises(Forbidden):
            await node_a1.drain(DrainKind.SITE, "b", "sabotage", revision=revision)
        with pytest.raises(Forbidden):
            await node_a1.heartbeat("b1", Heartbeat(state=NodeState.DOWN))
        with pytest.raises(Forbidden):
            await node_a1.state()  # a node reads only its own view
        with pytest.raises(Forbidden):
            await node_a1.node_desired("b1")  # nor another node's view
        view = await node_a1.heartbeat("a1", Heartbeat(state=NodeState.HEALTHY))
        assert view.node == "a1"
        assert (await node_a1.node_desired("a1")).node == "a1"
    async with ApiClient([api.url], VIEWER) as viewer:
        with pytest.raises(Forbidden):
            await viewer.put_site("a", SiteSpec(weight=1), revision=revision)
        assert (await viewer.state()).revision == revision
    async with httpx.AsyncClient(base_url=api.url) as anonymous:
        assert (await anonymous.get("/v1/state")).status_code == 401
        wrong = await anonymous.get("/v1/state", headers=auth("not-a-token"))
        assert wrong.status_code == 401
        assert "not-a-token" not in wrong.text
        assert OPERATOR not in (await anonymous.get("/openapi.json")).text


async def test_node_whose_heartbeats_stop_is_dead_after_ttl(api: ApiUnderTest) -> None:
    await seed(api)
    async with ApiClient([api.url], NODE_A1) as a1, ApiClient([api.url], NODE_B1) as b1:
        await a1.heartbeat("a1", Heartbeat(state=NodeState.HEALTHY))
        await b1.heartbeat("b1", Heartbeat(state=NodeState.HEALTHY))
    async with ApiClient([api.url], VIEWER) as viewer:
        before = {o.node: o for o in await viewer.observed()}
        assert before["a1"].liveness is Liveness.ALIVE
        assert before["a2"].liveness is Liveness.UNKNOWN

        async def a1_dead() -> bool:
            return {o.node: o for o in await viewer.observed()}["a1"].liveness is Liveness.DEAD

        await poll_until(a1_dead, timeout_s=15)
        after = {o.node: o for o in await viewer.observed()}["a1"]
        assert after.last_seen == before["a1"].last_seen

        async def dead_event() -> bool:
            events = await viewer.events()
            return any(e.kind == "node-dead" and e.subject == "a1" for e in events)

        await poll_until(dead_event, timeout_s=10)
        # b1 went silent too: no node of the fleet looks alive, which says more about the
        # GSLB's view than about the nodes. Fail-open: their last weights are kept, and
        # /v1/status says so (api/panic.py).
        weights = await viewer.effective_weights()
        assert weights.nodes["a1"] > 0
        async with httpx.AsyncClient(base_url=api.url, headers=auth(VIEWER)) as http:
            status = (await http.get("/v1/status")).json()
        assert [(s["scope"], s["trust"]) for s in status["fail_open"]] == [("fleet", "panic")]
        assert any(e.kind == "fail-open" for e in await viewer.events())


async def test_watch_long_poll_delivers_a_change_and_effective_weights(api: ApiUnderTest) -> None:
    revision = await seed(api)
    async with ApiClient([api.url], NODE_A1) as a1, ApiClient([api.url], OPERATOR) as operator:
        await a1.heartbeat("a1", Heartbeat(state=NodeState.HEALTHY))

        # The published view is rebuilt from heartbeats shortly after: wait until it shows
        # a1 alive, so the view the long-poll starts from is the settled one.
        async def heartbeat_reflected() -> bool:
            return (await operator.effective_weights()).nodes["a1"] > 0

        await poll_until(heartbeat_reflected, timeout_s=10)
        first = await a1.node_desired("a1")
        waiter = asyncio.create_task(
            a1.node_desired(
                "a1", after_revision=first.revision, fingerprint=first.fingerprint, timeout_s=20
            )
        )
        await asyncio.sleep(0.2)
        assert not waiter.done()
        state = await operator.drain(DrainKind.SITE, "a", "maintenance", revision=revision)
        changed = await asyncio.wait_for(waiter, 15)
        assert changed.revision == state.revision
        # Whether to serve changed; how much did not: a1 keeps its share (as if it served)
        # for the GRACEFUL_SHUTDOWN phase of its drain.
        assert changed.admin_state is AdminState.DRAINING  # a1 still reports healthy
        assert changed.drain_source is DrainKind.SITE and "maintenance" in changed.drain_reason
        assert changed.link_bandwidth_mbps == first.link_bandwidth_mbps > 0

        watched = await operator.watch_state(after_revision=state.revision - 1, timeout_s=5)
        assert watched.revision == state.revision


async def test_convergence_reports_applied_and_lagging(api: ApiUnderTest) -> None:
    revision = await seed(api)
    async with ApiClient([api.url], NODE_A1) as a1, ApiClient([api.url], NODE_B1) as b1:
        await a1.heartbeat("a1", Heartbeat(state=NodeState.HEALTHY, applied_revision=revision))
        await b1.heartbeat("b1", Heartbeat(state=NodeState.HEALTHY, applied_revision=revision - 1))
    async with ApiClient([api.url], VIEWER) as viewer:
        report = await viewer.convergence()
    assert report.revision == revision
    assert report.applied == ["a1"]
    assert [(n.node, n.applied_revision) for n in report.lagging] == [
        ("a2", None),
        ("b1", revision - 1),
    ]
    assert not report.converged


async def test_client_raises_typed_conflict_and_fails_over(api: ApiUnderTest) -> None:
    revision = await seed(api)
    dead_endpoint = "http://127.0.0.1:9"  # discard port: nothing listens on loopback
    async with ApiClient([dead_endpoint, api.url], OPERATOR, timeout_s=2) as client:
        state = await client.put_site("b", SiteSpec(weight=5), revision=revision)
        assert client.current_endpoint == api.url
        with pytest.raises(Conflict) as conflict:
            await client.put_site("b", SiteSpec(weight=6), revision=revision)
        assert conflict.value.current == state
        with pytest.raises(InvalidRequest) as invalid:
            await client.put_node("x", NodeSpec(site="nowhere"), revision=state.revision)
        assert invalid.value.field == "site"


async def test_apply_whole_state_in_one_revision(api: ApiUnderTest) -> None:
    revision = await seed(api)
    async with ApiClient([api.url], OPERATOR) as client:
        await client.drain(DrainKind.NODE, "b1", "disk", revision=revision)
        current = await client.state()
        spec = DesiredSpec(
            sites={"a": SiteSpec(), "b": SiteSpec()},
            nodes={"b1": NodeSpec(site="b"), "b2": NodeSpec(site="b")},
        )
        applied = await client.apply_state(spec, revision=current.revision)
        assert applied.revision > current.revision
        assert set(applied.nodes) == {"b1", "b2"}
        assert [d.name for d in applied.drains] == ["b1"]  # the drain of a kept node stays
        with pytest.raises(InvalidRequest) as invalid:
            await client.apply_state(
                DesiredSpec(nodes={"x": NodeSpec(site="nowhere")}), revision=applied.revision
            )
        assert invalid.value.field == "nodes.x.site"


async def test_an_agent_of_the_previous_node_contract_gets_a_clear_426(api: ApiUnderTest) -> None:
    """Agents before node contract 2 send no `contract` parameter: their heartbeat is still
    recorded (they are alive and count for the others' shares), and the answer says why
    they get no view. They keep serving on their last known good."""
    await seed(api)
    headers = {"Authorization": f"Bearer {NODE_A1}"}
    async with httpx.AsyncClient(base_url=api.url, headers=headers) as old_agent:
        r = await old_agent.post("/v1/nodes/a1/heartbeat", json={"state": "healthy"})
        assert r.status_code == 426
        assert "node contract versions 2 and 3" in r.json()["detail"]
        assert "upgrade the agent" in r.json()["detail"]
        r = await old_agent.get("/v1/nodes/a1/desired")
        assert r.status_code == 426
    async with ApiClient([api.url], VIEWER) as viewer:
        observed = {o.node: o for o in await viewer.observed()}
        assert observed["a1"].heartbeat is not None
        assert observed["a1"].heartbeat.state is NodeState.HEALTHY


async def test_a_restarted_api_keeps_live_nodes_weights_for_one_ttl(
    api_factory: Callable[..., ApiUnderTest],
) -> None:
    """The API is down longer than the heartbeat TTL while its node keeps serving: right
    after the restart every lease has expired, but the node's view must not drop to weight
    0 for a death it never reported; /v1/status says why."""
    api = api_factory(heartbeat_ttl_s=3)
    await seed(api)
    async with ApiClient([api.url], NODE_A1) as a1:
        await a1.heartbeat("a1", Heartbeat(state=NodeState.HEALTHY))
        before = await a1.node_desired("a1")
    assert before.link_bandwidth_mbps > 0
    api.server.stop()
    # The lease expires while nobody can renew it (etcd: by dead_within_s, the write rule's
    # bound; SQLite: the TTL).
    await asyncio.sleep(dead_within_s(3) + 0.5)
    api.server.start()
    async with ApiClient([api.url], NODE_A1) as a1, ApiClient([api.url], VIEWER) as viewer:
        after = await a1.node_desired("a1")
        observed = {o.node: o for o in await viewer.observed()}
        async with httpx.AsyncClient(base_url=api.url, headers=auth(VIEWER)) as http:
            status = (await http.get("/v1/status")).json()
    assert after.link_bandwidth_mbps == before.link_bandwidth_mbps
    assert observed["a1"].liveness is Liveness.DEAD  # shown as it is, only not acted on
    assert [(s["scope"], s["trust"]) for s in status["fail_open"]] == [("fleet", "starting")]


async def test_heartbeat_fast_path_answers_as_the_route_does(api: ApiUnderTest) -> None:
    """A well-formed heartbeat is answered by HeartbeatFastPath, without FastAPI: same
    status, headers and bytes as the route (which answers a request with another content
    type); every refusal is still the route's own."""
    await seed(api)
    body = Heartbeat(state=NodeState.HEALTHY, connections=3).model_dump_json()
    path = f"/v1/nodes/a1/heartbeat?contract={NODE_CONTRACT_VERSION}"
    json_type = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=api.url, headers=auth(NODE_A1)) as http:
        fast = await http.post(path, content=body, headers=json_type)
        routed = await http.post(
            path, content=body, headers={"Content-Type": "application/json; charset=utf-8"}
        )
        for answer in (fast, routed):
            assert answer.status_code == 200, answer.text
            assert answer.headers["content-type"] == "application/json"
            # FastAPI's serialisation of the view, byte for byte
            view = NodeDesired.model_validate_json(answer.content)
            assert answer.content == view.model_dump_json().encode()
            assert view.node == "a1"
        refusals = (
            (NODE_B1, body, 403),
            ("not-a-token", body, 401),
            (NODE_A1, '{"state": "sleepy"}', 422),
            (NODE_A1, "{", 400),
        )
        for token, content, status in refusals:
            r = await http.post(path, content=content, headers={**json_type, **auth(token)})
            assert r.status_code == status, r.text
            assert r.json()["detail"]
        metrics = (await http.get("/metrics", headers=auth(VIEWER))).text
    # both 200s counted under the route's template
    assert (
        'gslb_api_requests_total{method="POST",route="/v1/nodes/{node}/heartbeat",status="200"}'
        " 2.0" in metrics
    )

    # In process: a well-formed heartbeat never reaches FastAPI.
    async def fastapi(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("the heartbeat fell through to FastAPI")

    ctx = api.make_app().state.ctx
    await ctx.store.start()
    try:
        transport = httpx.ASGITransport(app=HeartbeatFastPath(fastapi, ctx))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://api", headers=auth(NODE_A1)
        ) as in_process:
            r = await in_process.post(path, content=body, headers=json_type)
    finally:
        await ctx.store.close()
    assert r.status_code == 200
    assert NodeDesired.model_validate_json(r.content).node == "a1"

    # The app as served: heartbeats meet the fast path before FastAPI's middleware stack,
    # and what it passes on (here a body above the limit) goes through that stack.
    app = api.make_app()
    assert isinstance(app, GslbApi) and app.fast_path is not None
    passed_on: list[str] = []

    async def stack(scope: Scope, receive: Receive, send: Send) -> None:
        passed_on.append(scope["path"])
        await app.routed(scope, receive, send)

    app.fast_path.app = stack
    await app.state.ctx.store.start()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://api", headers=auth(NODE_A1)
        ) as served:
            fast_answer = await served.post(path, content=body, headers=json_type)
            too_big = b" " * (api.settings.max_body_bytes + 1)
            refused = await served.post(path, content=too_big, headers=json_type)
    finally:
        await app.state.ctx.store.close()
    assert fast_answer.status_code == 200
    assert (
        fast_answer.content
        == NodeDesired.model_validate_json(fast_answer.content).model_dump_json().encode()
    )
    assert refused.status_code == 413
    assert passed_on == [path.split("?", maxsplit=1)[0]]
