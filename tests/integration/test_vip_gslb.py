"""The GSLB's view of an active-passive group: two real agents with a `vip_group:` (real
kernel, real ARP, real etcd fencing) heartbeat to the real API; `edgectl status` shows who
owns the VIP, under which term and fencing token, and follows a failover."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from contract.client import ApiClient
from contract.schemas import NodeSpec, SiteSpec
from tests.integration.conftest import OPERATOR, TOKENS, ApiUnderTest
from tests.support.procs import BIN, wait_for
from tests.support.vip_lab import ApLab, Node

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240), pytest.mark.needs("root", "etcd")]

NODE_TOKENS = {"n1": "node-n1-token-0123", "n2": "node-n2-token-0123"}


def edgectl_status(api: ApiUnderTest) -> dict[str, Any]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EDGECTL_")}
    environ.update(EDGECTL_API=api.url, EDGECTL_TOKEN=OPERATOR)
    done = subprocess.run(
        [str(BIN / "edgectl"), "status", "--json"],
        capture_output=True, text=True, env=environ, timeout=30, check=True,
    )  # fmt: skip
    return dict(json.loads(done.stdout))


def group(api: ApiUnderTest) -> dict[str, Any] | None:
    groups = edgectl_status(api)["groups"]
    return groups[0] if groups else None


@pytest.mark.parametrize("store_kind", ["sqlite"])
def test_edgectl_shows_who_owns_the_vip_and_follows_a_failover(
    api_factory: Callable[..., ApiUnderTest], etcd_cluster: Any
) -> None:
    node_tokens = [
        {"name": f"edge-{n}", "role": "node", "node": n, "token": t} for n, t in NODE_TOKENS.items()
    ]
    api = api_factory(tokens=[*TOKENS, *node_tokens])

    async def seed() -> None:
        async with ApiClient([api.url], OPERATOR) as operator:
            state = await operator.put_site("site-ap", SiteSpec(), revision=0)
            for name in NODE_TOKENS:
                state = await operator.put_node(
                    name, NodeSpec(site="site-ap"), revision=state.revision
                )

    asyncio.run(seed())
    port = int(api.url.rsplit(":", 1)[1])
    lab = ApLab.create_segment(2, etcd_cluster.client_urls, relay_ports=[port])
    try:
        n1, n2 = lab.nodes

        def config(node: Node, priority: int) -> dict[str, Any]:
            data = lab.node_config(node, priority, etcd=lab.etcd_urls)
            data["control_plane"] = {
                "endpoints": [f"http://127.0.0.1:{port}"],
                "token": NODE_TOKENS[node.name],
                "state_file": str(lab.workdir / f"desired-{node.name}.json"),
                "heartbeat_interval": 0.3,
            }
            return data

        lab.start_node(n1, config(n1, 200))
        lab.wait_role(n1, "active", 20)
        lab.start_node(n2, config(n2, 100))
        lab.wait_vip(n2, "reason", "peer_active", 20)

        def roles() -> dict[str, str]:
            g = group(api)
            return {} if g is None else {m["node"]: m["role"] for m in g["members"]}

        wait_for(lambda: roles() == {"n1": "active", "n2": "standby"}, 20, what="both reported")
        before = group(api)
        assert before is not None and before["active"] == ["n1"]
        assert before["vip"] == "198.18.2.100/24"
        active = next(m for m in before["members"] if m["node"] == "n1")
        assert active["fencing_token"] is not None and active["term"] >= 1
        assert "claim" in active["last_transition"]

        lab.signal_node(n1, signal.SIGKILL)  # the active dies: n2 takes over
        wait_for(lambda: roles().get("n2") == "active", 30, what="n2 active in edgectl")
        after = group(api)
        assert after is not None
        promoted = next(m for m in after["members"] if m["node"] == "n2")
        # A new owner holds a newer fencing token than the dead one did.
        assert promoted["fencing_token"] > active["fencing_token"]
        wait_for(lambda: (g := group(api)) is not None and g["active"] == ["n2"], 30, what="dead")
    finally:
        lab.close()
