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
