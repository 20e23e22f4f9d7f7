"""Real parts only: a 3-member etcd cluster (session-scoped, loopback, temp dir) and the real
app served by uvicorn on loopback ports. The `api` fixture is parametrized over both stores,
so every test that uses it runs against SQLite and etcd."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI

from api.app import create_app
from api.settings import Settings, parse_settings
from api.store import open_store
from tests.support.etcd_cluster import LocalEtcdCluster
from tests.support.requires import require
from tests.support.server import ThreadedServer
from tests.support.site import Site

OPERATOR = "operator-token-0123"
VIEWER = "viewer-token-0123"
NODE_A1 = "node-a1-token-0123"
NODE_B1 = "node-b1-token-0123"
OFF_BUDGET = {"site": {"min_share": 0.0}, "fleet": {"min_share": 0.0}}
DEFAULT_BUDGET: dict[str, object] = {}  # gslb.yaml's defaults
TOKENS = [
    {"name": "alice", "role": "operator", "token": OPERATOR},
    {"name": "victor", "role": "viewer", "token": VIEWER},
    {"name": "edge-a1", "role": "node", "node": "a1", "token": NODE_A1},
    {"name": "edge-b1", "role": "node", "node": "b1", "token": NODE_B1},
]


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEtcdCluster]:
    require("etcd")
    cluster = LocalEtcdCluster(tmp_path_factory.mktemp("etcd"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@dataclass
class ApiUnderTest:
    kind: str
    url: str
    server: ThreadedServer
    settings: Settings
    make_app: Callable[[], FastAPI]


def make_settings(
    kind: str, tmp_path: Path, etcd: LocalEtcdCluster | None, prefix: str, **overrides: object
) -> Settings:
    store: dict[str, object]
    if kind == "sqlite":
        store = {"kind": "sqlite", "path": str(tmp_path / "gslb.db")}
    else:
        assert etcd is not None
        store = {"kind": "etcd", "endpoints": etcd.client_urls, "prefix": prefix}
    data: dict[str, object] = {
        "store": store,
        "tokens": TOKENS,
        "heartbeat_ttl_s": 2,
        "sweep_interval_s": 0.2,
        "max_body_bytes": 16384,
        # Most tests drain the only node or site they have: the disruption budget is off
        # here, and the tests of the budget (test_budget.py, edgectl) turn it on.
        "budget": OFF_BUDGET,
    }
    data.update(overrides)
    return parse_settings(data)


@pytest.fixture(params=["sqlite", "etcd"])
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def api_factory(
    store_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., ApiUnderTest]]:
    """Start API instances sharing one store (same SQLite file or etcd prefix)."""
    etcd = request.getfixturevalue("etcd_cluster") if store_kind == "etcd" else None
    prefix = f"/test-{uuid.uuid4().hex[:8]}/"
    servers: list[ThreadedServer] = []

    def start(**overrides: object) -> ApiUnderTest:
        settings = make_settings(store_kind, tmp_path, etcd, prefix, **overrides)

        def make_app() -> FastAPI:
            return create_app(open_store(settings.store), settings)

        server = ThreadedServer(make_app)
        server.start()
        servers.append(server)
        return ApiUnderTest(store_kind, server.url, server, settings, make_app)

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def api(api_factory: Callable[..., ApiUnderTest]) -> ApiUnderTest:
    return api_factory()


# -- the edge agent with real backends (tests/support/site.py) -------------------
@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    try:
        yield s.start()
    finally:
        s.close()


@pytest.fixture(scope="module")
def shared_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """For tests that only read: one agent for the whole module."""
    s = Site(tmp_path_factory.mktemp("shared"))
    try:
        yield s.start()
    finally:
        s.close()
