"""node.yaml validation: one line naming the field and what was expected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edge.config import ConfigError, load_config, parse_config


def base() -> dict[str, Any]:
    return {
        "node": {"name": "edge-a1", "site": "site-a"},
        "listeners": [{"name": "web", "kind": "http", "address": "198.51.100.10", "port": 80}],
        "backends": [{"name": "b1", "address": "127.0.0.1", "port": 8080}],
    }


def test_minimal_config_is_valid_with_defaults() -> None:
    cfg = parse_config(base())
    assert cfg.health.active.rise == 2 and cfg.admin.address == "127.0.0.1"


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        (
            {"backends": [{"name": "b1", "address": "127.0.0.1", "port": 70000}]},
            "backends.0.port: Input should be less than or equal to 65535 (got 70000)",
        ),
        ({"backends": [{"name": "b1", "address": "nope", "port": 1}]}, "backends.0.address:"),
        (
            {"listeners": [{"name": "web", "kind": "udp", "address": "127.0.0.1", "port": 1}]},
            "listeners.0.kind: Input should be 'tcp' or 'http'",
        ),
        ({"backends": []}, "backends: List should have at least 1 item"),
        ({"extra": 1}, "extra: Extra inputs are not permitted"),
        (
            {"health": {"active": {"interval": 1, "timeout": 2}}},
            "health.active: timeout must not exceed interval",
        ),
        ({"admin": {"address": "0.0.0.0"}}, "admin.address: must be a loopback address"),
        ({"metrics": {"address": "nope"}}, "metrics.address: "),
        ({"metrics": {"port": 9902}}, "metrics.address: Field required"),
        ({"metrics": {"address": "0.0.0.0", "port": 0}}, "metrics.port: Input should be greater"),
        ({"log_format": "xml"}, "log_format: Input should be 'text' or 'json'"),
        ({"pool": {"maglev_table_size": 65536}}, "pool.maglev_table_size: must be a prime number"),
        (
            {"pool": {"algorithm": "maglev", "hash_key": {"kind": "header"}}},
            "pool.hash_key: a header hash key needs a name",
        ),
        (
            {"state": {"degraded_below": 0.4, "down_below": 0.5}},
            "state: down_below must not exceed degraded_below",
        ),
        (
            {
                "backends": [
                    {"name": "b1", "address": "127.0.0.1", "port": 1},
                    {"name": "b1", "address": "127.0.0.1", "port": 2},
                ]
            },
            "backends: duplicate name 'b1'",
        ),
    ],
)
def test_errors_name_the_field(patch: dict[str, Any], expected: str) -> None:
    data = base() | patch
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    message = str(info.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_missing_field() -> None:
    data = base()
    del data["node"]
    with pytest.raises(ConfigError, match=r"^node: Field required$"):
        parse_config(data)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("node: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_example_node_yaml_with_control_plane_section_is_valid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import yaml

    root = Path(__file__).resolve().parents[2] / "deploy" / "examples"
    data = yaml.safe_load((root / "node.yaml").read_text())
    data |= yaml.safe_load((root / "control_plane.yaml").read_text())
    monkeypatch.setenv("ANYCAST_EDGE_NODE_TOKEN", "t0ken")
    cfg = parse_config(data)
    assert cfg.control_plane is not None and cfg.control_plane.bearer_token() == "t0ken"
    monkeypatch.delenv("ANYCAST_EDGE_NODE_TOKEN")
    with pytest.raises(ConfigError, match="ANYCAST_EDGE_NODE_TOKEN is not set"):
        parse_config(data)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("listeners", 0, "port"), True, "listeners.0: port: expected an integer, got True"),
        (("listeners", 0, "port"), "8080", "listeners.0: port: expected an integer, got '8080'"),
        (("backends", 0, "weight"), 2.0, "backends.0: weight: expected an integer, got 2.0"),
        (("health", "active", "interval"), True, "interval: expected a number, got True"),
        (("health", "active", "interval"), "1", "interval: expected a number, got '1'"),
        (("health", "passive", "enabled"), "yes", "enabled: expected true or false"),
        (("health", "passive", "enabled"), 1, "enabled: expected true or false, got 1"),
    ],
)
def test_numbers_and_booleans_are_strict(
    path: tuple[str | int, ...], value: object, expected: str
) -> None:
    data = base()
    data.setdefault("health", {}).setdefault("active", {})
    data["health"].setdefault("passive", {})
    target: Any = data
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    with pytest.raises(ConfigError) as error:
        parse_config(data)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_an_integer_is_a_number() -> None:
    data = base()
    data["health"] = {"active": {"interval": 1}}
    assert parse_config(data).health.active.interval == 1.0
