"""edge.reload_plan: what a reload does to a node's services (keep, reconfigure, start,
remove, or refuse with one line naming the field), and the property that every service of
the running config and of the new one is in exactly one step."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from edge.config import NodeConfig, parse_config
from edge.reload_plan import Action, plan_reload
from tests.unit.test_dual_stack import BGP, VIP6, node, service

WEB4 = service("web4", "198.51.100.10/32", "198.51.100.10")
WEB6 = service("web6", f"{VIP6}/128", VIP6)


def cfg(*services: dict[str, Any], bgp: dict[str, Any] | None = None) -> NodeConfig:
    return parse_config(node(*services, bgp=bgp))


def test_a_service_added_starts_and_the_other_is_kept() -> None:
    plan = plan_reload(cfg(WEB4), cfg(WEB4, WEB6))
    assert plan.refused is None
    assert plan.keep == ("web4",) and plan.start == ("web6",)
    assert not plan.remove and not plan.reconfigure
    assert plan.summary() == "start web6"


def test_a_service_removed_is_drained() -> None:
    plan = plan_reload(cfg(WEB4, WEB6), cfg(WEB6))
    assert plan.refused is None
    assert plan.remove == ("web4",) and plan.keep == ("web6",)
    (step,) = [s for s in plan.steps if s.action is Action.REMOVE]
    assert "drained" in step.reason


def test_a_changed_service_is_reconfigured_in_place_naming_what_changed() -> None:
    changed = {**WEB4, "backends": [{"name": "b1", "address": "::1", "port": 8081}]}
    plan = plan_reload(cfg(WEB4, WEB6), cfg(changed, WEB6))
    assert plan.refused is None
    assert plan.reconfigure == ("web4",) and plan.keep == ("web6",)
    (step,) = [s for s in plan.steps if s.action is Action.RECONFIGURE]
    assert step.reason == "changed: backends"


def test_a_rename_is_a_remove_and_a_start() -> None:
    renamed = service("www4", "198.51.100.11/32", "198.51.100.11")
    plan = plan_reload(cfg(WEB4, WEB6), cfg(renamed, WEB6))
    assert plan.refused is None
    assert plan.remove == ("web4",) and plan.start == ("www4",) and plan.keep == ("web6",)


def test_a_rename_that_keeps_the_prefix_is_refused_it_drains_first() -> None:
    renamed = {**WEB4, "name": "www4"}
    plan = plan_reload(cfg(WEB4, WEB6), cfg(renamed, WEB6))
    assert plan.refused is not None
    assert plan.refused.startswith("services.0.prefixes: 198.51.100.10/32 is still service web4's")
    assert "remove it in one reload" in plan.refused


def _on(spec: dict[str, Any], address: str, port: int, name: str | None = None) -> dict[str, Any]:
    listener = {**spec["listeners"][0], "address": address, "port": port}
    return {**spec, "listeners": [{**listener, "name": name or listener["name"]}]}


def test_a_listener_a_kept_service_releases_in_the_same_reload_is_refused() -> None:
    web4 = _on(WEB4, "0.0.0.0", 80)
    api4 = _on(service("api4", "198.51.100.12/32", "198.51.100.12"), "0.0.0.0", 80)
    plan = plan_reload(cfg(web4), cfg(_on(WEB4, "0.0.0.0", 81), api4))
    assert plan.refused == (
        "services.1.listeners.0: 0.0.0.0 port 80 is still service web4's: release it in "
        "one reload, take it in the next"
    )


def test_a_service_still_draining_cannot_come_back_yet() -> None:
    old = cfg(WEB6)
    running = [*cfg(WEB4, WEB6).service_list()]
    plan = plan_reload(old, cfg(WEB4, WEB6), running, {"web4"})
    assert plan.refused == (
        "services.0.name: service web4 is still draining after an earlier reload; add it "
        "again once it is gone"
    )
    # Its prefix is held until it is gone, by whichever name.
    other = {**WEB4, "name": "www4"}
    plan = plan_reload(old, cfg(other, WEB6), running, {"web4"})
    assert plan.refused is not None and "still service web4's, which drains first" in plan.refused
    # The draining service is no step of this reload.
    plan = plan_reload(old, cfg(WEB6), running, {"web4"})
    assert plan.refused is None and [s.service for s in plan.steps] == ["web6"]


def test_moving_between_the_single_service_shape_and_services_takes_a_restart() -> None:
    implicit = parse_config(
        {
            "node": {"name": "edge-a1", "site": "site-a"},
            "listeners": [{"name": "l", "kind": "http", "address": "198.51.100.10", "port": 80}],
            "backends": [{"name": "b1", "address": "127.0.0.1", "port": 8080}],
            "bgp": {**BGP, "prefixes": ["198.51.100.10/32"]},
        }
    )
    plan = plan_reload(implicit, cfg(WEB4))
    assert plan.refused is not None and plan.refused.startswith("services: ")
    assert plan_reload(implicit, implicit).keep == ("default",)


def test_a_new_prefix_the_running_bgp_cannot_carry_is_refused() -> None:
    v4_only = {k: v for k, v in BGP.items() if k != "local_address_v6"}
    v4_only["neighbors"] = BGP["neighbors"][:1]
    plan = plan_reload(cfg(WEB4, bgp=v4_only), cfg(WEB4, WEB6))
    assert plan.refused is not None
    assert plan.refused.startswith("services.1.prefixes: 2001:db8:100::10/128 is IPv6")
    assert plan.refused.endswith("(bgp changes take a restart)")


# -- the property -------------------------------------------------------------------------

POOL = [service(f"s{i}", f"198.51.100.{20 + i}/32", f"198.51.100.{20 + i}") for i in range(6)]


def _variant(spec: dict[str, Any], changed: bool) -> dict[str, Any]:
    if not changed:
        return spec
    return {**spec, "backends": [{"name": "b1", "address": "::1", "port": 9090}]}


@given(
    st.lists(st.booleans(), min_size=6, max_size=6),
    st.lists(st.booleans(), min_size=6, max_size=6),
    st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_every_service_of_old_and_new_is_in_exactly_one_step(
    in_old: list[bool], in_new: list[bool], changed: list[bool]
) -> None:
    old_specs = [s for s, keep in zip(POOL, in_old, strict=True) if keep]
    new_specs = [_variant(s, c) for s, keep, c in zip(POOL, in_new, changed, strict=True) if keep]
    if not old_specs or not new_specs:
        return  # a node.yaml of services: has at least one
    old, new = cfg(*old_specs), cfg(*new_specs)
    plan = plan_reload(old, new)
    names = [step.service for step in plan.steps]
    old_names = {s["name"] for s in old_specs}
    new_names = {s["name"] for s in new_specs}
    assert sorted(names) == sorted(old_names | new_names)  # each exactly once
    assert set(plan.start) == new_names - old_names
    assert set(plan.remove) == old_names - new_names
    assert set(plan.keep) | set(plan.reconfigure) == old_names & new_names
    # Each service holds its own prefix and listener: nothing to refuse.
    assert plan.refused is None
    # The same config again changes nothing.
    again = plan_reload(new, new)
    assert set(again.keep) == new_names and again.summary() == "services unchanged"
