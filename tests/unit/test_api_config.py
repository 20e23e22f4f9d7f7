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


def test_a_fleet_of_node_tokens_each_finds_its_own_node() -> None:
    """One token per node (a thousand here): each secret identifies exactly its node, by
    the digest lookup; a secret one character off identifies nobody."""
    tokens = [
        {"name": f"edge-{i}", "role": "node", "node": f"n{i}", "token": f"secret-{i:04d}-x"}
        for i in range(1000)
    ]
    table = TokenTable.from_settings(parse_settings({"tokens": tokens}))
    for i in (0, 1, 499, 999):
        who = table.identify(f"Bearer secret-{i:04d}-x")
        assert who is not None and who.name == f"edge-{i}" and who.may_act_for_node(f"n{i}")
        assert not who.may_act_for_node(f"n{(i + 1) % 1000}")
        assert table.identify(f"Bearer secret-{i:04d}-y") is None
    assert table.identify("bearer  secret-0007-x ") is not None  # scheme case, spaces


def test_missing_token_env_is_a_config_error(tmp_path: Path) -> None:
    settings = parse_settings({"tokens": [{"name": "x", "role": "viewer", "token_env": "NOPE_X"}]})
    with pytest.raises(ConfigError, match="NOPE_X"):
        TokenTable.from_settings(settings)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"port": True}, "port"),
        ({"port": "8080"}, "port"),
        ({"heartbeat_ttl_s": "5"}, "heartbeat_ttl_s"),
        ({"allow_anonymous_read": "yes"}, "allow_anonymous_read"),
        ({"allow_anonymous_read": 1}, "allow_anonymous_read"),
        ({"tokens": [{"name": "x", "role": "viewer", "token": ""}]}, "tokens.0.token"),
        ({"tokens": [{"name": "x", "role": "viewer", "token": "  "}]}, "tokens.0"),
        (
            {
                "tokens": [
                    {"name": "x", "role": "viewer", "token": "t1"},
                    {"name": "x", "role": "operator", "token": "t2"},
                ]
            },
            "tokens",
        ),
    ],
)
def test_numbers_booleans_and_tokens_are_strict(data: object, field: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_settings(data)
    assert f": {field}:" in str(error.value)


def test_two_tokens_sharing_a_secret_are_refused() -> None:
    settings = parse_settings(
        {
            "tokens": [
                {"name": "viewers", "role": "viewer", "token": "same-secret"},
                {"name": "ops", "role": "operator", "token": "same-secret"},
            ]
        }
    )
    with pytest.raises(ConfigError, match=r"tokens\[ops\]: same secret as tokens\[viewers\]"):
        TokenTable.from_settings(settings)


def _pem_pair(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    args = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
    subprocess.run(
        ["openssl", *args, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def _bad_files(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (gslb.yaml text, what the error line must say)."""
    cert, key = _pem_pair(tmp_path, "a")
    _, other_key = _pem_pair(tmp_path, "b")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
    not_a_db = tmp_path / "not-a-db"
    not_a_db.write_bytes(b"this is not sqlite, it is a text file of some length" * 20)
    return {
        "garbage-cert": (f"tls: {{cert: {garbage}, key: {key}}}\n", "tls.cert"),
        "garbage-key": (f"tls: {{cert: {cert}, key: {garbage}}}\n", "tls.key"),
        "mismatched-key": (f"tls: {{cert: {cert}, key: {other_key}}}\n", "does not match"),
        "sqlite-in-missing-dir": (
            f"store: {{kind: sqlite, path: {tmp_path}/no/such/dir/g.db}}\n",
            "does not exist",
        ),
        "sqlite-is-a-dir": (f"store: {{kind: sqlite, path: {tmp_path}}}\n", "is a directory"),
        "sqlite-not-a-db": (f"store: {{kind: sqlite, path: {not_a_db}}}\n", "not a usable"),
        "port-true": ("port: true\n", "port"),
        "shared-secret": (
            "tokens:\n  - {name: a, role: viewer, token: s}\n  - {name: b, role: operator, token: s}\n",
            "same secret",
        ),
    }


def test_bad_files_exit_2_with_one_line_from_check_and_from_start(tmp_path: Path) -> None:
    """Each bad file: one line on stderr, exit 2, from `--check` and from a real start
    (which would otherwise bind a port: nothing is started)."""
    for name, (text, expected) in _bad_files(tmp_path).items():
        config = tmp_path / f"{name}.yaml"
        config.write_text(f"port: 0\n{text}" if not text.startswith("port") else text)
        for extra in (["--check"], []):
            result = subprocess.run(
                [sys.executable, "-m", "api", "--config", str(config), *extra],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            where = f"{name} {extra}: {result.stderr!r}"
            assert result.returncode == 2, where
            assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, where
            assert expected in result.stderr, where
            assert str(config) in result.stderr, where


def test_a_good_tls_pair_and_a_fresh_sqlite_path_pass_the_check(tmp_path: Path) -> None:
    cert, key = _pem_pair(tmp_path, "ok")
    config = tmp_path / "gslb.yaml"
    config.write_text(
        f"tls: {{cert: {cert}, key: {key}}}\nstore: {{kind: sqlite, path: {tmp_path}/new.db}}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "api", "--config", str(config), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert not (tmp_path / "new.db").exists()  # a check creates nothing
