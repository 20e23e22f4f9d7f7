"""gslb.yaml validation, `python -m api` exit codes, and token roles (no sockets)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from api.auth import TokenTable
from api.settings import ConfigError, load_settings, parse_settings
from contract.schemas import Role


def test_defaults_are_sqlite_on_loopback() -> None:
    settings = parse_settings({})
    assert settings.host == "127.0.0.1"
    assert settings.store.kind == "sqlite"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"port": 70000}, "port"),
        ({"colour": 1}, "colour"),
        ({"store": {"kind": "etcd", "endpoints": []}}, "store.etcd.endpoints"),
        ({"tokens": [{"name": "x", "role": "node", "token": "t"}]}, "tokens.0"),
        ({"tokens": [{"name": "x", "role": "king", "token": "t"}]}, "tokens.0.role"),
        ({"tls": {"cert": "/nonexistent.crt", "key": "/nonexistent.key"}}, "tls.cert"),
    ],
)
def test_bad_config_is_one_line_naming_the_field(data: object, field: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_settings(data)
    message = str(error.value)
    assert "\n" not in message
    assert f": {field}:" in message


def test_python_m_api_exits_2_on_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "gslb.yaml"
    config.write_text("store: {kind: etcd, endpoints: [ftp://x]}\n")
    result = subprocess.run(
        [sys.executable, "-m", "api", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "store.etcd.endpoints.0" in result.stderr


def test_token_from_environment_and_roles(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GSLB_OPS_TOKEN", "s3cret-from-env")
    config = tmp_path / "gslb.yaml"
    config.write_text(
        "tokens:\n"
        "  - {name: ops, role: operator, token_env: GSLB_OPS_TOKEN}\n"
        "  - {name: edge-a1, role: node, node: a1, token: node-secret}\n"
    )
    settings = load_settings(config)
    assert "s3cret" not in repr(settings)  # secrets never in reprs or logs
    tokens = TokenTable.from_settings(settings)
    ops = tokens.identify("Bearer s3cret-from-env")
    assert ops is not None and ops.role is Role.OPERATOR and ops.can_write()
    node = tokens.identify("Bearer node-secret")
    assert node is not None and node.may_act_for_node("a1") and not node.may_act_for_node("b1")
    assert not node.can_write() and not node.can_read()
    assert tokens.identify("Bearer wrong") is None
    assert tokens.identify(None) is None
    assert tokens.identify("Basic node-secret") is None


def test_missing_token_env_is_a_config_error(tmp_path: Path) -> None:
    settings = parse_settings({"tokens": [{"name": "x", "role": "viewer", "token_env": "NOPE_X"}]})
    with pytest.raises(ConfigError, match="NOPE_X"):
        TokenTable.from_settings(settings)
