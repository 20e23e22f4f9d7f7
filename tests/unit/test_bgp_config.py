"""bgp.config: every bad field is named in one line; the local-address check is separate."""

from __future__ import annotations

import subprocess
import sys
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from bgp.config import (
    BgpConfig,
    ConfigError,
    check_addresses_are_local,
    describe_validation_error,
    load_bgp_config,
)


def valid() -> dict[str, Any]:
    return {
        "local_asn": 65101,
        "router_id": "198.18.0.2",
        "local_address": "198.18.0.2",
        "prefixes": ["198.51.100.10/32"],
        "neighbors": [{"peer_address": "198.18.0.1", "peer_asn": 65000, "md5_password": "s3cr3t"}],
    }


def error_line(**changes: Any) -> str:
    data = valid() | changes
    with pytest.raises(ValidationError) as info:
        BgpConfig.model_validate(data)
    return describe_validation_error(info.value)


def test_defaults() -> None:
    config = BgpConfig.model_validate(valid())
    assert config.neighbors[0].hold_time_s == 3
    assert config.bfd.enabled is False
    assert config.flap.max_changes_per_minute >= 1
    assert "s3cr3t" not in repr(config) and "s3cr3t" not in str(config.model_dump())


@pytest.mark.parametrize("asn", [0, 23456, 65535, 4294967295, 4294967296, -1])
def test_bad_local_asn_is_named(asn: int) -> None:
    line = error_line(local_asn=asn)
    assert line.startswith("bgp.local_asn:")


def test_bad_peer_asn_is_named() -> None:
    line = error_line(neighbors=[{"peer_address": "198.18.0.1", "peer_asn": 0}])
    assert line.startswith("bgp.neighbors.0.peer_asn:")


@pytest.mark.parametrize("prefix", ["198.51.101.10/32", "198.51.100.0/23", "banana", "10.0.0.1/33"])
def test_bad_prefix_is_named(prefix: str) -> None:
    line = error_line(prefixes=[prefix])
    assert line.startswith("bgp.prefixes")


def test_prefix_outside_range_says_so() -> None:
    line = error_line(prefixes=["203.0.113.1/32"])
    assert line.startswith("bgp.prefixes:")
    assert "outside the anycast range 198.51.100.0/24" in line


@pytest.mark.parametrize("password", ["", "has space", 'quo"te', "semi;colon", "x" * 81, "é"])
def test_bad_password_is_named_and_not_echoed(password: str) -> None:
    line = error_line(
        neighbors=[{"peer_address": "198.18.0.1", "peer_asn": 65000, "md5_password": password}]
    )
    assert line.startswith("bgp.neighbors.0.md5_password:")
    if password:
        assert password not in line


def test_unknown_field_is_refused() -> None:
    assert error_line(local_asm=1).startswith("bgp.local_asm:")


def test_duplicates_refused() -> None:
    assert "twice" in error_line(prefixes=["198.51.100.1/32", "198.51.100.1/32"])
    neighbor = {"peer_address": "198.18.0.1", "peer_asn": 65000}
    assert "twice" in error_line(neighbors=[neighbor, neighbor])


def test_hold_time_below_three_refused() -> None:
    line = error_line(neighbors=[{"peer_address": "198.18.0.1", "peer_asn": 1, "hold_time_s": 1}])
    assert line.startswith("bgp.neighbors.0.hold_time_s:")


def test_local_address_check() -> None:
    config = BgpConfig.model_validate(valid())
    here = [IPv4Interface("198.18.0.2/30"), IPv4Interface("127.0.0.1/8")]
    assert check_addresses_are_local(config, here) == []
    elsewhere = [IPv4Interface("198.18.4.2/30")]
    errors = check_addresses_are_local(config, elsewhere)
    assert errors[0].startswith("bgp.local_address: 198.18.0.2 is not on a local interface")
    assert errors[1].startswith("bgp.neighbors.0.peer_address:")
    # A /32 on lo says nothing about which neighbors are reachable.
    only_host = [IPv4Interface("198.18.0.2/32")]
    assert check_addresses_are_local(config, only_host)[0].startswith("bgp.neighbors.0")


def test_cli_exit_2_one_line(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("bgp:\n  local_asn: 0\n")
    result = subprocess.run(
        [sys.executable, "-m", "bgp.config", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "bgp.local_asn" in result.stderr


def test_loader_checks_addresses_on_this_host(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    # 198.18.255.254 is assigned nowhere on a test machine.
    body = valid() | {"local_address": "198.18.255.254"}
    import yaml

    path.write_text(yaml.safe_dump({"bgp": body}))
    with pytest.raises(ConfigError, match=r"^bgp.local_address: 198.18.255.254"):
        load_bgp_config(path)
    assert load_bgp_config(path, check_local=False).local_asn == 65101


def test_node_yaml_embeds_bgp_and_names_its_fields_without_echoing_secrets(
    tmp_path: Path,
) -> None:
    from edge.config import ConfigError as EdgeConfigError
    from edge.config import load_config, parse_config

    node: dict[str, Any] = {
        "node": {"name": "e1", "site": "s"},
        "listeners": [{"name": "tcp", "kind": "tcp", "address": "127.0.0.1", "port": 8080}],
        "backends": [{"name": "b1", "address": "127.0.0.1", "port": 9000}],
    }
    assert parse_config(node).bgp is None
    secret = "has space secret"
    bad = valid() | {
        "neighbors": [{"peer_address": "198.18.0.1", "peer_asn": 65000, "md5_password": secret}]
    }
    with pytest.raises(EdgeConfigError) as info:
        parse_config(node | {"bgp": bad})
    assert str(info.value).startswith("bgp.neighbors.0.md5_password:")
    assert "secret" not in str(info.value)
    with pytest.raises(EdgeConfigError, match=r"^bgp.local_asn:"):
        parse_config(node | {"bgp": valid() | {"local_asn": 23456}})
    # The loader also checks the addresses against this host's interfaces.
    import yaml

    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(node | {"bgp": valid() | {"local_address": "198.18.255.254"}}))
    with pytest.raises(EdgeConfigError, match=r"^bgp.local_address: 198.18.255.254"):
        load_config(path)


def test_example_bgp_section_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "bgp.yaml"
    config = load_bgp_config(example, check_local=False)
    assert config.bfd.enabled and config.neighbors[0].hold_time_s == 3


def test_deadman_defaults_and_bounds() -> None:
    config = BgpConfig.model_validate(valid())
    assert config.deadman.enabled and config.deadman.timeout_ms <= 1000
    assert 100 <= config.deadman.beat_interval_ms <= 200
    assert error_line(deadman={"beat_interval_ms": 50}).startswith("bgp.deadman.beat_interval_ms:")
    line = error_line(deadman={"beat_interval_ms": 200, "timeout_ms": 300})
    assert line.startswith("bgp.deadman:") and "twice" in line


def neighbor_error(**changes: Any) -> str:
    neighbor = {"peer_address": "198.18.0.1", "peer_asn": 65000} | changes
    return error_line(neighbors=[neighbor])


def test_bad_neighbor_configs_name_the_field() -> None:
    assert neighbor_error(multihop=True).startswith("bgp.neighbors.0.ttl:")
    assert "TTL" in neighbor_error(multihop=True)
    assert neighbor_error(multihop=True, ttl=1).startswith("bgp.neighbors.0.ttl:")
    assert neighbor_error(ttl=5).startswith("bgp.neighbors.0.ttl:")
    assert neighbor_error(port=0).startswith("bgp.neighbors.0.port:")
    assert neighbor_error(port=65536).startswith("bgp.neighbors.0.port:")
    assert neighbor_error(communities=["65000:70000"]).startswith("bgp.neighbors.0.communities.0:")
    assert neighbor_error(communities=["no-export"]).startswith("bgp.neighbors.0.communities.0:")
    line = neighbor_error(large_communities=["1:2"])
    assert line.startswith("bgp.neighbors.0.large_communities.0:") and "RFC 8092" in line
    assert neighbor_error(large_communities=["1:2:4294967296"]).startswith(
        "bgp.neighbors.0.large_communities.0:"
    )
    assert neighbor_error(link_bandwidth="sometimes").startswith("bgp.neighbors.0.link_bandwidth:")
    assert error_line(large_communities=["x"]).startswith("bgp.large_communities.0:")


def test_ibgp_refused_where_it_cannot_work_and_accepted_where_it_can() -> None:
    line = neighbor_error(peer_asn=65101, prepends=2)
    assert line.startswith("bgp.neighbors.0.prepends:") and "iBGP" in line
    line = neighbor_error(peer_asn=65101, local_pref=100, drain_local_pref=100)
    assert line.startswith("bgp.neighbors.0.drain_local_pref:")
    ibgp = BgpConfig.model_validate(
        valid() | {"neighbors": [{"peer_address": "198.18.0.1", "peer_asn": 65101}]}
    )
    assert ibgp.neighbors[0].local_pref > ibgp.neighbors[0].drain_local_pref


def test_multihop_and_ibgp_peers_need_no_connected_subnet() -> None:
    data = valid() | {
        "neighbors": [
            {"peer_address": "198.18.9.1", "peer_asn": 65000, "multihop": True, "ttl": 3},
            {"peer_address": "198.18.9.2", "peer_asn": 65101},
        ]
    }
    config = BgpConfig.model_validate(data)
    assert check_addresses_are_local(config, [IPv4Interface("198.18.0.2/30")]) == []
    single = BgpConfig.model_validate(
        data | {"neighbors": [data["neighbors"][0] | {"multihop": False, "ttl": None}]}
    )
    (error,) = check_addresses_are_local(single, [IPv4Interface("198.18.0.2/30")])
    assert error.startswith("bgp.neighbors.0.peer_address:")


@pytest.mark.parametrize(
    ("neighbor", "field"),
    [
        ({"peer_asn": 65101, "prepends": 1}, "bgp.neighbors.0.prepends"),  # iBGP
        ({"multihop": True}, "bgp.neighbors.0.ttl"),
        ({"port": 70000}, "bgp.neighbors.0.port"),
        ({"communities": ["65000:x"]}, "bgp.neighbors.0.communities.0"),
    ],
)
def test_check_config_refuses_a_neighbor_that_cannot_work(
    tmp_path: Path, neighbor: dict[str, Any], field: str
) -> None:
    """`anycast-edge check-config`: one line naming the field, exit 2 (the agent's `run`
    loads the same way, so nothing is started or announced)."""
    import yaml

    node = {
        "node": {"name": "e1", "site": "s"},
        "listeners": [{"name": "tcp", "kind": "tcp", "address": "127.0.0.1", "port": 8080}],
        "backends": [{"name": "b1", "address": "127.0.0.1", "port": 9000}],
        "bgp": valid()
        | {"neighbors": [{"peer_address": "198.18.0.1", "peer_asn": 65000} | neighbor]},
    }
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(node))
    binary = Path(sys.executable).with_name("anycast-edge")
    result = subprocess.run(
        [str(binary), "check-config", "-c", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1 and field + ":" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_numbers_and_booleans_are_not_coerced() -> None:
    assert "local_asn: expected an integer, got '65001'" in error_line(local_asn="65001")
    assert "capacity_mbps: expected a number, got True" in error_line(capacity_mbps=True)
