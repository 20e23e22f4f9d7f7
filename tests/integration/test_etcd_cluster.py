"""etcd-only properties: several API instances on one cluster, and a leader killed with -9."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.app import create_app
from api.heartbeat_writes import lease_ttl_s
from api.settings import parse_settings
from api.store import open_store
from api.store.etcd import EtcdStore
from contract.client import ApiClient, Conflict, Unavailable
from contract.schemas import Heartbeat, NodeSpec, NodeState, ServiceSpec, SiteSpec
from tests.integration.conftest import NODE_A1, OPERATOR, make_settings
from tests.support.etcd_cluster import LocalEtcdCluster
from tests.support.server import ThreadedServer

pytestmark = pytest.mark.timeout(180)


def _server(
    cluster: LocalEtcdCluster, tmp_path: Path, prefix: str, **overrides: object
) -> ThreadedServer:
    settings = make_settings("etcd", tmp_path, cluster, prefix, **overrides)
    return ThreadedServer(lambda: create_app(open_store(settings.store), settings))


async def test_two_api_instances_share_state_and_push(
    etcd_cluster: LocalEtcdCluster, tmp_path: Path
) -> None:
    prefix = f"/multi-{uuid.uuid4().hex[:8]}/"
    with (
        _server(etcd_cluster, tmp_path, prefix) as site_a,
        _server(etcd_cluster, tmp_path, prefix) as site_b,
    ):
        async with (
            ApiClient([site_a.url], OPERATOR) as via_a,
            ApiClient([site_b.url], NODE_A1) as node_via_b,
        ):
            state = await via_a.put_site("a", SiteSpec(), revision=0)
            state = await via_a.put_node("a1", NodeSpec(site="a"), revision=state.revision)
            await node_via_b.heartbeat("a1", Heartbeat(state=NodeState.HEALTHY))
            # Start the long-poll from the settled view: the heartbeat reflected in it.
            for _ in range(200):  # bounded: 10 s
                first = await node_via_b.node_desired("a1")
                if (await via_a.effective_weights()).nodes["a1"] > 0:
                    break
                await asyncio.sleep(0.05)
            waiter = asyncio.create_task(
                node_via_b.node_desired(
                    "a1", after_revision=first.revision, fingerprint=first.fingerprint, timeout_s=20
                )
            )
            await asyncio.sleep(0.2)
            state = await via_a.put_node(
                "a1", NodeSpec(site="a", weight=5), revision=state.revision
            )
            # Instance b learns of a's write through etcd's watch, not by polling.
            seen = await asyncio.wait_for(waiter, 15)
            assert seen.revision == state.revision
            assert seen.operator_weight == 5
            observed = {o.node: o for o in await via_a.observed()}
            assert observed["a1"].heartbeat is not None


async def test_leader_kill_during_writes_loses_no_acknowledged_write(
    etcd_cluster: LocalEtcdCluster, tmp_path: Path
) -> None:
    prefix = f"/kill-{uuid.uuid4().hex[:8]}/"
    acknowledged: list[str] = []
    unavailable = 0
    killed: int | None = None
    with _server(etcd_cluster, tmp_path, prefix) as api:
        async with ApiClient([api.url], OPERATOR, timeout_s=10) as client:
            revision = (await client.put_site("a", SiteSpec(), revision=0)).revision
            try:
                for i in range(40):
                    if i == 10:
                        killed = etcd_cluster.leader_index()
                        assert killed is not None
                        etcd_cluster.kill(killed)
                    name = f"s{i}"
                    spec = ServiceSpec(prefix=f"198.51.100.{i}/32")
                    try:
                        state = await client.put_service(name, spec, revision=revision)
                    except Unavailable:
                        unavailable += 1
                        # The write may or may not have committed; only acknowledged ones count.
                        await asyncio.sleep(0.2)
                        with contextlib.suppress(Unavailable):
                            revision = (await client.state()).revision
                        continue
                    except Conflict as conflict:
                        revision = conflict.current.revision
                        continue
                    acknowledged.append(name)
                    revision = state.revision
            finally:
                if killed is not None:
                    etcd_cluster.restart(killed)
                    etcd_cluster.wait_healthy()
    print(f"acknowledged {len(acknowledged)}, unavailable {unavailable}")
    assert len(acknowledged) >= 20, (acknowledged, unavailable)
    # Read back through a fresh client of the whole cluster.
    store = EtcdStore(etcd_cluster.client_urls, prefix=prefix)
    try:
        final = await store.read_desired()
    finally:
        await store.close()
    missing = [name for name in acknowledged if name not in final.services]
    assert missing == []


async def test_api_starts_without_etcd_and_answers_503_not_500(tmp_path: Path) -> None:
    settings = parse_settings(
        {
            "store": {
                "kind": "etcd",
                "endpoints": ["http://127.0.0.1:9", "http://127.0.0.2:9"],
                "request_timeout_s": 0.2,
                "deadline_s": 0.5,
            },
            "tokens": [{"name": "ops", "role": "operator", "token": OPERATOR}],
        }
    )
    with ThreadedServer(lambda: create_app(open_store(settings.store), settings)) as api:
        async with httpx.AsyncClient(
            base_url=api.url, headers={"Authorization": f"Bearer {OPERATOR}"}
        ) as http:
            assert (await http.get("/healthz")).status_code == 200
            state = await http.get("/v1/state")
            assert state.status_code == 503
            assert state.headers["Retry-After"] == "1"
            write = await http.put("/v1/sites/a", json={}, headers={"If-Match": '"0"'})
            assert write.status_code == 503


async def test_two_sweeping_instances_report_a_dead_node_once(
    etcd_cluster: LocalEtcdCluster, tmp_path: Path
) -> None:
    prefix = f"/sweep-{uuid.uuid4().hex[:8]}/"
    with (
        _server(etcd_cluster, tmp_path, prefix) as site_a,
        _server(etcd_cluster, tmp_path, prefix) as site_b,
    ):
        async with (
            ApiClient([site_a.url], OPERATOR) as via_a,
            ApiClient([site_b.url], NODE_A1) as node_via_b,
        ):
            state = await via_a.put_site("a", SiteSpec(), revision=0)
            await via_a.put_node("a1", NodeSpec(site="a"), revision=state.revision)
            await node_via_b.heartbeat("a1", Heartbeat(state=NodeState.HEALTHY))

            async def dead_events() -> int:
                return sum(e.kind == "node-dead" for e in await via_a.events())

            for _ in range(150):  # bounded: TTL 2 s + lease bucket + sweeps
                if await dead_events():
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # several more sweeps by both instances
            assert await dead_events() == 1


@contextlib.contextmanager
def _frozen(cluster: LocalEtcdCluster, index: int) -> Iterator[None]:
    """SIGSTOP one member (its sockets stay open and say nothing), SIGCONT after."""
    process = cluster.members[index].process
    assert process is not None and process.poll() is None
    process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        process.send_signal(signal.SIGCONT)
        cluster.wait_healthy()


async def test_watch_moves_off_a_frozen_member_and_wakes_on_the_write(
    etcd_cluster: LocalEtcdCluster, tmp_path: Path
) -> None:
    """The member carrying the API's watch is SIGSTOPped; a write through another member
    (another API instance that never talks to the frozen one) must wake the first API's
    /v1/watch because the watch moved, not because its deadline ran out: the long-poll
    deadline (110 s) is far beyond the client's own read timeout (30 s)."""
    prefix = f"/frozen-{uuid.uuid4().hex[:8]}/"
    settings = make_settings("etcd", tmp_path, etcd_cluster, prefix, long_poll_max_s=120)
    store = open_store(settings.store)
    assert isinstance(store, EtcdStore)
    with ThreadedServer(lambda: create_app(store, settings)) as watched:
        async with ApiClient([watched.url], OPERATOR) as client:
            state = await client.put_site("a", SiteSpec(), revision=0)
            watch_key = prefix.encode() + b"w/"
            for _ in range(100):  # bounded: 5 s for the stream to open
                if watch_key in store.gateway.watching:
                    break
                await asyncio.sleep(0.05)
            carrier = etcd_cluster.client_urls.index(store.gateway.watching[watch_key])
            others = [u for i, u in enumerate(etcd_cluster.client_urls) if i != carrier]
            writer_settings = make_settings(
                "etcd",
                tmp_path,
                etcd_cluster,
                prefix,
                store={"kind": "etcd", "endpoints": others, "prefix": prefix},
            )
            failovers = store.gateway.silent_member_failovers
            writer = ThreadedServer(
                lambda: create_app(open_store(writer_settings.store), writer_settings)
            )
            with writer:
                async with (
                    httpx.AsyncClient(base_url=watched.url, timeout=30) as http,
                    ApiClient([writer.url], OPERATOR) as via_writer,
                ):
                    waiter = asyncio.create_task(
                        http.get(
                            "/v1/watch",
                            params={"after_revision": state.revision, "timeout_s": 110},
                            headers={"Authorization": f"Bearer {OPERATOR}"},
                        )
                    )
                    await asyncio.sleep(0.3)  # parked: only a notification wakes it now
                    with _frozen(etcd_cluster, carrier):
                        written = await via_writer.put_site(
                            "b", SiteSpec(), revision=state.revision
                        )
                        answer = await waiter
            assert answer.status_code == 200
            assert answer.json()["revision"] == written.revision
            assert "b" in answer.json()["sites"]
            # It moved because the member went silent (after the thaw it may come back).
            assert store.gateway.silent_member_failovers > failovers


async def test_heartbeats_alternating_between_two_instances_keep_the_node_live_on_both(
    etcd_cluster: LocalEtcdCluster, tmp_path: Path
) -> None:
    """The write rule (api/heartbeat_writes.py) with two instances on one etcd: the node's
    heartbeats go to one instance, then the other, and back (A to instance 1, B to 2, A to 1
    again: instance 1 must not skip A because it wrote A last). Both instances see the node
    alive after every heartbeat and show its newest report; once it stops, both see it dead
    within the bound (the lease: TTL + TTL/3 + 1 s rounded up, then a sweep)."""
    prefix = f"/alternate-{uuid.uuid4().hex[:8]}/"
    # TTL/3 = 1 s: each A-B-A below fits in it many times over.
    settings = make_settings("etcd", tmp_path, etcd_cluster, prefix, heartbeat_ttl_s=3)
    ttl = settings.heartbeat_ttl_s
    stores = [open_store(settings.store), open_store(settings.store)]
    assert all(isinstance(s, EtcdStore) for s in stores)
    servers = [
        ThreadedServer(lambda store=store: create_app(store, settings))  # type: ignore[misc]
        for store in stores
    ]
    healthy, degraded = NodeState.HEALTHY, NodeState.DEGRADED
    # (instance, state): runs of one instance (the rule skips there), and A-B-A switches.
    pattern = [(0, healthy), (0, healthy), (0, healthy), (1, degraded), (0, healthy)]
    pattern += [(0, healthy), (1, healthy), (1, healthy), (1, healthy), (0, healthy)]
    beats = pattern * 8  # 80 beats, longer than the lease: its refreshes keep the node alive
    with servers[0], servers[1]:
        async with contextlib.AsyncExitStack() as stack:
            operators = [
                await stack.enter_async_context(ApiClient([s.url], OPERATOR)) for s in servers
            ]
            nodes = [await stack.enter_async_context(ApiClient([s.url], NODE_A1)) for s in servers]
            state = await operators[0].put_site("a", SiteSpec(), revision=0)
            await operators[0].put_node("a1", NodeSpec(site="a"), revision=state.revision)

            async def seen() -> list[tuple[str, NodeState | None]]:
                views = [{o.node: o for o in await op.observed()}["a1"] for op in operators]
                return [(o.liveness, o.heartbeat.state if o.heartbeat else None) for o in views]

            for i, (instance, node_state) in enumerate(beats):
                await nodes[instance].heartbeat("a1", Heartbeat(state=node_state, connections=i))
                for _ in range(20):  # bounded: 1 s (the node's next beat is well within TTL)
                    views = await seen()
                    assert all(liveness == "alive" for liveness, _ in views), (i, views)
                    if all(s == node_state for _, s in views):
                        break
                    await asyncio.sleep(0.05)
                assert all(s == node_state for _, s in views), (i, views)
                await asyncio.sleep(0.05)
            # The rule did skip heartbeats (runs on one instance within TTL/3), on both.
            skipped = [s.heartbeats_skipped for s in stores if isinstance(s, EtcdStore)]
            assert all(n > 0 for n in skipped), skipped

            for _ in range(int(10 * (lease_ttl_s(ttl) + 4))):  # bounded: the lease + sweeps
                views = await seen()
                dead = [e for e in await operators[1].events() if e.kind == "node-dead"]
                if all(liveness == "dead" for liveness, _ in views) and dead:
                    break
                await asyncio.sleep(0.1)
            assert views == [("dead", beats[-1][1])] * 2, views
            await asyncio.sleep(0.5)  # more sweeps by both instances
            dead = [e for e in await operators[1].events() if e.kind == "node-dead"]
            assert len(dead) == 1, dead
