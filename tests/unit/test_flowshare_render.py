"""The kernel state of forwarding as data: the nft table, ip rules/routes, sysctls; and the
flowshare: config section (one line per problem, keys never echoed)."""

from __future__ import annotations

from typing import Any

import pytest

from edge.config import ConfigError, FlowShareConfig, parse_config
from edge.flowshare import render
from edge.flowshare.render import LOCAL_TABLE, Route, Rule
from edge.flowshare.wire import flow_key

VIP = ("198.51.100.10", 8080)


def section(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "local_address": "198.18.1.1",
        "peers": [
            {"name": "edge2", "address": "198.18.1.2"},
            {"name": "edge3", "address": "198.18.1.3"},
        ],
        "peer_interface": "lan0",
        "key": "a-shared-key-of-16+bytes",
    }
    data.update(overrides)
    return data


def node(**flowshare: Any) -> dict[str, Any]:
    return {
        "node": {"name": "edge1", "site": "s"},
        "listeners": [
            {"name": "tcp", "kind": "tcp", "address": VIP[0], "port": VIP[1]},
            {"name": "any", "kind": "http", "address": "0.0.0.0", "port": 80},
        ],
        "backends": [{"name": "b", "address": "127.0.0.1", "port": 9000}],
        "flowshare": section(**flowshare),
    }


CFG = FlowShareConfig.model_validate(section())


def test_the_ruleset_classifies_before_routing_and_never_forwards_twice() -> None:
    text = render.ruleset(CFG, [VIP])
    assert text.startswith(f"add table inet {render.TABLE}\ndelete table inet {render.TABLE}\n")
    lines = [line.strip() for line in text.splitlines()]
    chain = lines[lines.index("chain classify {") + 1 :]
    assert chain[0] == "type filter hook prerouting priority raw; policy accept;"
    order = [
        next(i for i, line in enumerate(chain) if needle in line)
        for needle in ('"lan0" ip saddr', '"lan0" counter', "tcp flags & syn", "meta mark set")
    ]
    assert order == sorted(order)  # from peers: loop check, then never marked; SYNs never
    assert "elements = { 198.51.100.10 . 8080 }" in text
    assert 'meta mark 0x4e01 counter comment "to edge2"' in text
    assert 'meta mark 0x4e02 counter comment "to edge3"' in text
    assert render.ruleset(CFG, [VIP]) == text  # a pure function: diffable


def test_routing_puts_the_local_rule_after_the_fwmark_rules() -> None:
    plan = render.routing(CFG, [VIP, ("2001:db8::1", 80)])
    assert plan.rules == (
        Rule(51, 4901, 0x4E01),
        Rule(52, 4902, 0x4E02),
        Rule(53, LOCAL_TABLE),
    )
    assert plan.remove_rules == (Rule(0, LOCAL_TABLE),)
    assert plan.routes == (
        Route(4901, "198.51.100.10/32", "198.18.1.2", "lan0"),
        Route(4902, "198.51.100.10/32", "198.18.1.3", "lan0"),
    )
    assert render.sysctls(CFG) == {
        "net/ipv4/ip_forward": "1",
        "net/ipv4/ip_early_demux": "0",
        "net/ipv4/conf/lan0/rp_filter": "2",
    }


def test_element_commands_chunk_and_skip_ipv6() -> None:
    v4 = [flow_key("198.19.0.2", p, *VIP) for p in range(1, render.ELEMENTS_PER_COMMAND + 2)]
    v6 = flow_key("2001:db8::2", 1, "2001:db8::1", 80)
    text = render.element_commands([v4[0], v6], {k: 0x4E01 for k in [*v4, v6]})
    lines = text.splitlines()
    assert (
        lines[0]
        == f"delete element inet {render.TABLE} owners4 {{ 198.19.0.2 . 1 . 198.51.100.10 . 8080 }}"
    )
    assert len(lines) == 3 and all(line.startswith("add element") for line in lines[1:])
    assert "2001:db8" not in text
    assert render.element_commands([], {}) == ""


def test_shared_vips_skip_wildcard_listeners() -> None:
    assert render.shared_vips(parse_config(node())) == {"tcp": VIP}


def test_shared_vips_are_every_services_listeners() -> None:
    """A node in the `services:` shape has no top-level listeners: each service's count
    (before, such a node shared no VIP at all and forwarded nothing)."""
    data = node()
    listeners, backends = data.pop("listeners"), data.pop("backends")
    data["services"] = [
        {"name": "web", "prefixes": ["198.51.100.10/32"], "listeners": listeners,
         "backends": backends},
        {"name": "app", "prefixes": ["198.51.100.20/32", "2001:db8:100::20/128"],
         "listeners": [
             {"name": "app", "kind": "http", "address": "198.51.100.20", "port": 80},
             {"name": "app6", "kind": "http", "address": "2001:db8:100::20", "port": 80},
         ],
         "backends": backends},
    ]  # fmt: skip
    assert render.shared_vips(parse_config(data)) == {
        "tcp": VIP,
        "app": ("198.51.100.20", 80),
        "app6": ("2001:db8:100::20", 80),
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"key": "short"}, "flowshare: key: at least 16 bytes"),
        ({"key": None}, "give exactly one of key and key_env"),
        ({"key_env": "FLOWSHARE_KEY_UNSET"}, "give exactly one of key and key_env"),
        ({"peers": []}, "flowshare.peers: List should have at least 1 item"),
        ({"local_address": "nope"}, "flowshare.local_address"),
        ({"peers": [{"name": "a", "address": "198.18.1.1"}]}, "this node's own local_address"),
        ({"peers": [{"name": "a", "address": "198.18.1.2"}] * 2}, "duplicate name"),
        (
            {"overlay": {"vni": 7, "underlay_address": "198.18.0.2"}},
            "overlay: peers edge2, edge3 have no underlay address",
        ),
        ({"overlay": {"vni": 0, "underlay_address": "198.18.0.2"}}, "flowshare.overlay.vni"),
        ({"overlay": {"vni": 7, "underlay_address": "x"}}, "flowshare.overlay.underlay_address"),
    ],
)
def test_bad_sections_are_one_line_without_the_key(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(node(**overrides))
    text = str(error.value)
    assert message in text and "\n" not in text
    assert "a-shared-key" not in text and "short" not in text


def test_the_overlay_replicates_to_every_peer_underlay() -> None:
    cfg = FlowShareConfig.model_validate(
        section(
            peers=[
                {"name": "edge2", "address": "198.18.1.2", "underlay": "198.18.0.10"},
                {"name": "edge3", "address": "198.18.1.3", "underlay": "198.18.0.6"},
            ],
            overlay={"vni": 4242, "underlay_address": "198.18.0.2"},
        )
    )
    assert render.overlay(cfg) == render.OverlayPlan(
        device="lan0",
        vni=4242,
        port=4789,
        local="198.18.0.2",
        address="198.18.1.1",
        prefix_len=24,
        remotes=("198.18.0.10", "198.18.0.6"),
    )
    # rp_filter loose on it, like on a shared segment
    assert render.sysctls(cfg)["net/ipv4/conf/lan0/rp_filter"] == "2"
    assert render.overlay(FlowShareConfig.model_validate(section())) is None


def test_only_the_sysctls_that_differ_are_written() -> None:
    wanted = render.sysctls(FlowShareConfig.model_validate(section()))
    current = {**wanted, "net/ipv4/ip_early_demux": "1", render.ALL_RP_FILTER: "0"}
    assert render.sysctl_writes(wanted, current) == {"net/ipv4/ip_early_demux": "0"}
    # A container: the runtime set them, conf.all's rp_filter is loose, nothing to write
    # (the device's own rp_filter does not matter then).
    container = {
        "net/ipv4/ip_forward": "1",
        "net/ipv4/ip_early_demux": "0",
        "net/ipv4/conf/lan0/rp_filter": "0",
        render.ALL_RP_FILTER: "2",
    }
    assert render.sysctl_writes(wanted, container) == {}
