"""The vip_group section: every bad input is one line naming the field, and no key is echoed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edge.config import ConfigError, parse_config, parse_witness_config

KEY = "k" * 32


def node(**group: Any) -> dict[str, Any]:
    vip_group: dict[str, Any] = {
        "name": "g1",
        "interface": "eth1",
        "vip": "198.18.2.100/24",
        "priority": 100,
        "key": KEY,
        "members": [{"id": "n1", "address": "198.18.2.1"}, {"id": "n2", "address": "198.18.2.2"}],
    }
    vip_group.update(group)
    return {
        "node": {"name": "n1", "site": "s"},
        "listeners": [{"name": "web", "kind": "http", "address": "0.0.0.0", "port": 8080}],
        "backends": [{"name": "b1", "address": "198.18.2.20", "port": 8081}],
        "vip_group": {k: v for k, v in vip_group.items() if v is not None},
    }


def test_a_valid_group_and_its_defaults() -> None:
    group = parse_config(node()).vip_group
    assert group is not None
    assert (group.advert_interval, group.dead_after, group.preempt, group.fencing) == (
        0.1,
        3,
        True,
        None,
    )
    assert group.shared_key() == KEY.encode()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"priority": 0}, "vip_group.priority: Input should be greater than or equal to 1"),
        ({"priority": 255}, "vip_group.priority: Input should be less than or equal to 254"),
        ({"key": "short-key"}, "vip_group: the shared key must be at least 32 bytes"),
        ({"key": None}, "vip_group: give exactly one of key, key_env and key_file"),
        ({"key_env": "X_VIP_KEY"}, "vip_group: give exactly one of key, key_env and key_file"),
        (
            {
                "members": [
                    {"id": "n1", "address": "198.18.2.1"},
                    {"id": "n1", "address": "198.18.2.2"},
                ]
            },
            "vip_group.members: duplicate node id 'n1'",
        ),
        (
            {
                "members": [
                    {"id": "n1", "address": "198.18.2.1"},
                    {"id": "n2", "address": "198.18.2.1"},
                ]
            },
            "vip_group.members: two members have the same address",
        ),
        (
            {"members": [{"id": "n2", "address": "198.18.2.2"}]},
            "vip_group.members: this node ('n1') is not a member",
        ),
        ({"vip": "198.18.2.1/24"}, "vip_group: vip must not be a member's own address"),
        ({"vip": "198.18.2.100"}, "vip_group.vip: must be address/prefix"),
        ({"multicast": "198.18.2.255"}, "vip_group.multicast: must be an IPv4 multicast"),
        ({"multicast": "ff02::12"}, "vip_group.multicast: must be an IPv4 multicast"),
        ({"multicast": "nonsense"}, "vip_group.multicast: must be an IPv4 multicast"),
        (
            {
                "multicast": "224.0.0.18",
                "members": [
                    {"id": "n1", "address": "2001:db8::1"},
                    {"id": "n2", "address": "2001:db8::2"},
                ],
                "vip": "2001:db8::100/64",
            },
            "vip_group: multicast heartbeats need IPv4 member addresses",
        ),
        (
            {"fencing": {"endpoints": ["http://127.0.0.1:2379"], "lease_margin": 1.0}},
            "vip_group.fencing.lease_margin: Input should be greater than or equal to 1.35",
        ),
        (
            {
                "fencing": {
                    "endpoints": ["http://127.0.0.1:2379"],
                    "lease_ttl": 2,
                    "lease_margin": 1.8,
                }
            },
            "lease_margin must leave at least 0.4 s",
        ),
    ],
)
def test_bad_input_is_one_line_naming_the_field(change: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(node(**change))
    message = str(error.value)
    assert expected in message and "\n" not in message


def test_a_short_key_is_never_echoed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(node(key="secret-but-short"))
    assert "secret-but-short" not in str(error.value)
    monkeypatch.setenv("X_VIP_KEY", "e" * 40)
    assert parse_config(node(key=None, key_env="X_VIP_KEY")).vip_group is not None
    key_file = tmp_path / "vip.key"
    key_file.write_text("f" * 48 + "\n")
    group = parse_config(node(key=None, key_file=str(key_file))).vip_group
    assert group is not None and group.shared_key() == b"f" * 48
    with pytest.raises(ConfigError, match="key_file: cannot read"):
        parse_config(node(key=None, key_file=str(tmp_path / "missing")))


WITNESS_MEMBERS = [
    {"id": "n1", "address": "198.18.2.1"},
    {"id": "n2", "address": "198.18.2.2"},
    {"id": "w1", "address": "198.18.2.3", "witness": True},
]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"members": WITNESS_MEMBERS, "fencing": {"endpoints": ["http://127.0.0.1:2379"]}},
            "vip_group: a witness and fencing do not go together",
        ),
        (
            {"members": [WITNESS_MEMBERS[0], WITNESS_MEMBERS[2]]},
            "vip_group: a group with a witness needs at least 3 members",
        ),
        (
            {"members": WITNESS_MEMBERS, "multicast": "224.0.0.18"},
            "vip_group: a group with a witness needs unicast heartbeats",
        ),
        ({"members": WITNESS_MEMBERS, "quorum_hold": 1.0}, "vip_group.quorum_hold"),
        (
            {"members": [{**m, "witness": m["id"] == "n1"} for m in WITNESS_MEMBERS]},
            "vip_group.members: this node ('n1') is a witness",
        ),
    ],
)
def test_bad_witness_groups_are_one_line(change: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(node(**change))
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_a_group_with_a_witness_is_a_quorum_group() -> None:
    group = parse_config(node(members=WITNESS_MEMBERS)).vip_group
    assert group is not None and group.quorum and group.quorum_hold == 2.0
    assert not parse_config(node()).vip_group.quorum  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("witness", "expected"),
    [
        ({"node_id": "n1"}, "witness.members: 'n1' must be listed with witness: true"),
        ({"key": "short"}, "the shared key must be at least 32 bytes"),
        ({"members": WITNESS_MEMBERS[:2]}, "witness.members"),
        ({"port": True}, "witness.port"),
    ],
)
def test_bad_witness_configs_are_one_line(witness: dict[str, Any], expected: str) -> None:
    data = {"group": "g1", "node_id": "w1", "members": WITNESS_MEMBERS, "key": KEY, **witness}
    with pytest.raises(ConfigError) as error:
        parse_witness_config({"witness": data})
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert (
        parse_witness_config(
            {"witness": {"group": "g1", "node_id": "w1", "members": WITNESS_MEMBERS, "key": KEY}}
        ).node_id
        == "w1"
    )


def test_announce_bgp_needs_a_bgp_section_that_announces_the_vip() -> None:
    with pytest.raises(ConfigError, match=r"vip_group\.announce: bgp needs a bgp: section"):
        parse_config(node(announce="bgp"))
    bgp = {
        "local_asn": 65101,
        "router_id": "127.0.0.1",
        "local_address": "127.0.0.1",
        "prefixes": ["198.51.100.10/32"],
        "neighbors": [{"peer_address": "127.0.0.2", "peer_asn": 65000}],
    }
    data = node(announce="bgp", vip="198.51.100.11/32")
    data["bgp"] = bgp
    with pytest.raises(ConfigError) as error:
        parse_config(data)
    assert "vip_group.vip: with announce: bgp, 198.51.100.11 must be one of" in str(error.value)
    data = node(announce="bgp", vip="198.51.100.10/32", standby_med_penalty=50)
    data["bgp"] = bgp
    group = parse_config(data).vip_group
    assert group is not None and (group.announce, group.standby_med_penalty) == ("bgp", 50)
