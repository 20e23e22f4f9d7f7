"""Node contract 2 against an API of contract 1: one clear error, never a misread number.

The old API cannot be had in this tree, so its answer is replayed from its recorded
shape (the NodeDesired of contract 1) through httpx's transport; everything else is real
(the typed client, its parsing, the sync's fail-static handling)."""

from __future__ import annotations

import json

import httpx
import pytest

from contract.client import ApiClient, ApiError, ContractMismatch
from contract.schemas import Heartbeat, NodeState

OLD_VIEW = {
    "revision": 7,
    "node": "a1",
    "site": "a",
    "drained": False,
    "drain_reason": "",
    "operator_weight": 100,
    "effective_weight": 500.0,
    "services": {},
    "fingerprint": "0123456789abcdef",
}


def old_api(request: httpx.Request) -> httpx.Response:
    assert request.url.params.get("contract") == "3"  # the new client always says its version
    return httpx.Response(200, json=OLD_VIEW)


async def test_a_view_of_contract_1_is_a_clear_version_error() -> None:
    async with ApiClient(["http://gslb"], "t", transport=httpx.MockTransport(old_api)) as client:
        with pytest.raises(ContractMismatch, match="contract version 1; this client speaks"):
            await client.node_desired("a1")
        with pytest.raises(ContractMismatch, match="upgrade the API"):
            await client.heartbeat("a1", Heartbeat(state=NodeState.HEALTHY))


async def test_a_drain_without_service_is_what_an_older_api_accepts() -> None:
    """An older API (before per-service drains) refuses unknown fields: the client leaves
    out `service` when it is not given, and sends it when it is."""
    bodies: list[dict[str, object]] = []

    def old_drains(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        if set(body) - {"kind", "name", "reason"}:  # the old DrainRequest: extra forbidden
            return httpx.Response(422, json={"detail": f"{sorted(body)}: extra fields"})
        return httpx.Response(200, json={"revision": 8})

    client = ApiClient(["http://api.test"], transport=httpx.MockTransport(old_drains))
    try:
        state = await client.drain("node", "a1", "kernel upgrade", revision=7)
        assert state.revision == 8
        assert bodies[-1] == {"kind": "node", "name": "a1", "reason": "kernel upgrade"}
        with pytest.raises(ApiError):  # a per-service drain needs the newer API
            await client.drain("node", "a1", "dns only", revision=7, service="dns")
        assert bodies[-1]["service"] == "dns"
    finally:
        await client.aclose()
