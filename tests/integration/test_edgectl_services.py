"""`edgectl drain/undrain --service` and `edgectl weights set --service`: the real binary
against uvicorn serving the real app (SQLite; the API tests cover etcd), nodes played by
the test with node tokens (tests/integration/test_edgectl.py's helpers)."""

from __future__ import annotations

import json

import pytest

from contract.client import ApiClient
from contract.schemas import AdminState, ServiceSpec
from tests.integration.conftest import NODE_A1, ApiUnderTest
from tests.integration.test_edgectl import Nodes, call, failed, ok, run, seed, sqlite_only

pytestmark = [pytest.mark.timeout(180), sqlite_only]


def with_services(api: ApiUnderTest) -> None:
    revision = seed(api)

    async def work(client: ApiClient) -> None:
        state = await client.put_service(
            "web", ServiceSpec(prefix="198.51.100.10/32"), revision=revision
        )
        await client.put_service(
            "dns", ServiceSpec(prefix="2001:db8::53/128"), revision=state.revision
        )

    call(api, work)


def test_drain_and_undrain_one_service_of_a_node_and_of_a_site(api: ApiUnderTest) -> None:
    with_services(api)
    out = ok(run(api, "drain", "a1", "--service", "web", "--reason", "web release")).stdout
    assert "service web on node a1 drained at revision" in out
    state = call(api, lambda c: c.state())
    [drain] = state.drains
    assert (drain.kind, drain.name, drain.service, drain.reason) == (
        "node",
        "a1",
        "web",
        "web release",
    )
    # The node is not drained: status shows it in service, its view drains only web.
    status = json.loads(ok(run(api, "status", "--json")).stdout)
    a1 = next(n for n in status["nodes"] if n["name"] == "a1")
    assert not a1["drained"]
    view = call(api, lambda c: c.node_desired("a1"), NODE_A1)
    assert view.admin_state is AdminState.ACTIVE
    assert view.service_desired["web"].admin_state is not AdminState.ACTIVE
    assert view.service_desired["dns"].admin_state is AdminState.ACTIVE

    site = json.loads(
        ok(run(api, "drain", "site-b", "--service", "dns", "--reason", "move", "--json")).stdout
    )
    assert (site["kind"], site["service"], site["nodes"]) == ("site", "dns", ["b1"])
    events = json.loads(ok(run(api, "events", "--json", "--limit", "1")).stdout)
    assert events[0]["cause"] == "service dns on site drained: move"

    # Each drain is ended by its own undrain.
    failed(run(api, "undrain", "a1"), 4, "node a1 is not drained")
    failed(
        run(api, "undrain", "a1", "--service", "dns"), 4, "service dns is not drained on node a1"
    )
    failed(
        run(api, "drain", "a1", "--service", "nosuch", "--reason", "x"),
        4,
        "no service named 'nosuch'",
    )
    ok(run(api, "undrain", "a1", "--service", "web"))
    ok(run(api, "undrain", "site-b", "--service", "dns"))
    assert call(api, lambda c: c.state()).drains == []


def test_drain_of_a_service_with_wait_waits_for_the_fleet_to_apply_it(
    api: ApiUnderTest,
) -> None:
    with_services(api)
    with Nodes(api, apply=True):
        out = ok(
            run(
                api, "drain", "b1", "--service", "web", "--reason", "r", "--wait", "--timeout", "60"
            )
        ).stdout
        assert "service web on node b1 drained at revision" in out and "fleet converged" in out
        ok(run(api, "undrain", "b1", "--service", "web", "--wait", "--timeout", "60"))


def test_weights_set_for_one_service(api: ApiUnderTest) -> None:
    with_services(api)
    out = json.loads(
        ok(
            run(api, "weights", "set", "site-a=3", "--node", "b1=7", "--service", "web", "--json")
        ).stdout
    )
    assert out["service"] == "web"
    assert {(c["kind"], c["name"], c["before"], c["after"]) for c in out["changed"]} == {
        ("site", "site-a", "100", "3"),
        ("node", "b1", "100", "7"),
    }
    state = call(api, lambda c: c.state())
    assert state.service_weights["web"].sites == {"site-a": 3}
    assert state.service_weights["web"].nodes == {"b1": 7}
    assert state.sites["site-a"].weight == 100  # the site's own weight is untouched
    shown = json.loads(ok(run(api, "weights", "show", "--json")).stdout)
    assert shown["services"]["web"]["sites"]["site-a"]["weight"] == 3
    assert shown["services"]["dns"]["sites"]["site-a"]["weight"] == 100
    assert "per service" in ok(run(api, "weights", "show")).stdout
    # Setting it again changes nothing; an unknown service is one line, exit 4.
    again = ok(run(api, "weights", "set", "site-a=3", "--service", "web")).stdout
    assert "nothing to change" in again
    failed(run(api, "weights", "set", "site-a=3", "--service", "nosuch"), 4, "no service named")
