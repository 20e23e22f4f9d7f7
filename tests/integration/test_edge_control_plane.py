"""The real agent (`anycast-edge run` with a `control_plane:` section) against the real API
(uvicorn, on SQLite and on etcd): a GSLB drain reaches the node and its traffic, the node's
heartbeats and applied revision reach the API, and losing every API changes nothing for
traffic: the agent keeps serving on its last known good view, also across a restart."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from contract.client import ApiClient
from contract.schemas import DrainKind, NodeSpec, SiteSpec
from tests.integration.conftest import NODE_A1, OPERATOR, VIEWER, ApiUnderTest
from tests.support.procs import wait_for
from tests.support.site import Site

pytestmark = pytest.mark.timeout(180)


def control_plane_site(tmp_path: Path, api: ApiUnderTest) -> Site:
    site = Site(
        tmp_path,
        control_plane={
            "endpoints": [api.url],
            "token": NODE_A1,
            "state_file": str(tmp_path / "desired.json"),
            "heartbeat_interval": 0.2,
        },
    )
    site.agent.config["node"]["name"] = "a1"
    return site


def control(site: Site) -> dict[str, Any]:
    return dict(site.agent.status()["control_plane"])


def steady_load(site: Site, stop: threading.Event, failures: list[str], served: list[int]) -> None:
    with httpx.Client(base_url=site.http, timeout=5) as client:
        for _ in range(20000):  # bounded in count, and stopped by the test
            if stop.is_set():
                return
            try:
                r = client.get("/")
                (served if r.status_code == 200 else failures).append(r.status_code)
            except httpx.HTTPError as error:
                failures.append(repr(error))


def test_gslb_drives_the_agent_and_losing_the_api_takes_no_traffic_down(
    api_factory: Callable[..., ApiUnderTest], tmp_path: Path
) -> None:
    api = api_factory()

    async def seed() -> int:
        async with ApiClient([api.url], OPERATOR) as operator:
            state = await operator.put_site("site-t", SiteSpec(), revision=0)
            state = await operator.put_node("a1", NodeSpec(site="site-t"), revision=state.revision)
            return state.revision

    revision = asyncio.run(seed())
    site = control_plane_site(tmp_path, api)
    try:
        site.start()
        # Heartbeats reach the API; the node applies the view the API publishes to it.
        wait_for(
            lambda: control(site)["applied_revision"] >= revision and not control(site)["stale"]
        )

        async def observed_state() -> str:
            async with ApiClient([api.url], VIEWER) as viewer:
                nodes = {n.node: n for n in await viewer.observed()}
                heartbeat = nodes["a1"].heartbeat
                return "" if heartbeat is None else str(heartbeat.state)

        wait_for(lambda: asyncio.run(observed_state()) == "healthy")
        desired = control(site)["desired"]
        assert desired["admin_state"] == "active" and desired["link_bandwidth_mbps"] == 1000

        # A GSLB drain reaches the node: draining, then down, and it stops serving.
        async def drain() -> int:
            async with ApiClient([api.url], OPERATOR) as operator:
                state = await operator.state()
                state = await operator.drain(
                    DrainKind.NODE, "a1", "kernel upgrade", revision=state.revision
                )
                return state.revision

        drained_at = asyncio.run(drain())
        status = site.agent.wait_state("down", timeout=30)
        assert any("kernel upgrade (GSLB)" in e["cause"] for e in status["events"])
        # One owner: the state machine's drain says where it is and who asked.
        assert status["drain"] == {
            "phase": "done", "source": "GSLB", "reason": "kernel upgrade",
        }  # fmt: skip
        wait_for(lambda: control(site)["applied_revision"] >= drained_at)
        # The GSLB sees the drain finish: its published admin state becomes drained.
        wait_for(lambda: control(site)["desired"]["admin_state"] == "drained")

        async def undrain() -> int:
            async with ApiClient([api.url], OPERATOR) as operator:
                state = await operator.state()
                state = await operator.undrain(DrainKind.NODE, "a1", revision=state.revision)
                return state.revision

        undrained_at = asyncio.run(undrain())
        site.agent.wait_state("healthy", timeout=30)
        wait_for(lambda: control(site)["applied_revision"] >= undrained_at)

        # Every API gone, under steady load: the node keeps serving, and says it is stale.
        stop, failures, served = threading.Event(), [], []  # type: ignore[var-annotated]
        load = threading.Thread(target=steady_load, args=(site, stop, failures, served))
        load.start()
        try:
            wait_for(lambda: len(served) > 50)
            api.server.stop()
            wait_for(lambda: control(site)["stale"])
            mark = len(served)
            wait_for(lambda: len(served) > mark + 200)
        finally:
            stop.set()
            load.join(30)
        assert failures == []
        assert site.agent.status()["state"] == "healthy"
        metrics = httpx.get(site.agent.admin + "/metrics").text
        assert "anycast_edge_control_plane_stale 1.0" in metrics

        # Restarted while no API answers: it starts from the view on disk and serves.
        site.agent.stop()
        site.agent.start()
        assert control(site)["desired"]["revision"] == undrained_at
        assert control(site)["stale"]
        assert httpx.get(site.http + "/").status_code == 200

        # One API returns: a change made through it reaches the node.
        api.server.start()
        drained_again = asyncio.run(drain())
        site.agent.wait_state("down", timeout=30)
        wait_for(
            lambda: (
                control(site)["applied_revision"] >= drained_again and not control(site)["stale"]
            )
        )
    finally:
        site.close()


def test_control_plane_config_errors_never_echo_the_token(tmp_path: Path) -> None:
    import subprocess

    import yaml

    from tests.support.procs import BIN, free_port, node_config

    config = node_config(
        [{"name": "web", "kind": "http", "address": "127.0.0.1", "port": free_port()}],
        [{"name": "b1", "address": "127.0.0.1", "port": 1}],
        control_plane={"endpoints": ["ftp://x"], "token": "s3cret-token-value"},
    )
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [str(BIN / "anycast-edge"), "check-config", "-c", str(path)],
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert err.startswith("anycast-edge: config error: control_plane.endpoints.0:")
    assert "s3cret" not in err
    config["control_plane"] = {
        "endpoints": ["http://127.0.0.1:1"],
        "token_env": "NO_SUCH_TOKEN_VAR",
    }
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [str(BIN / "anycast-edge"), "check-config", "-c", str(path)],
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "environment variable NO_SUCH_TOKEN_VAR is not set" in proc.stderr.decode()
