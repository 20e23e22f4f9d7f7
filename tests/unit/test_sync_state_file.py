"""The last-known-good file of edge.sync: atomic replacement, damaged files ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

from contract.schemas import AdminState, NodeDesired
from edge.sync import load_last_known_good, write_atomically

VIEW = NodeDesired(
    revision=7,
    node="a1",
    site="a",
    admin_state=AdminState.ACTIVE,
    operator_weight=100,
    link_bandwidth_mbps=500.0,
    fingerprint="abc",
)


def test_round_trip_and_replace(tmp_path: Path) -> None:
    path = tmp_path / "state" / "desired.json"
    assert load_last_known_good(path) is None
    write_atomically(path, VIEW.model_dump_json().encode())
    assert load_last_known_good(path) == VIEW
    newer = VIEW.model_copy(update={"revision": 8, "fingerprint": "def"})
    write_atomically(path, newer.model_dump_json().encode())
    assert load_last_known_good(path) == newer
    assert [p.name for p in path.parent.iterdir()] == ["desired.json"]  # no temp file left


def test_damaged_file_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "desired.json"
    path.write_text('{"revision": 7, "node": "a1"')  # torn by a crash of an older writer
    assert load_last_known_good(path) is None


def test_a_file_of_the_previous_contract_is_ignored_with_its_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Written by an agent before node contract 2 (one folded effective_weight): never
    misread as a share; the node starts as if it had none, and says why."""
    path = tmp_path / "desired.json"
    path.write_text(
        '{"revision": 7, "node": "a1", "site": "a", "drained": false, "drain_reason": "",'
        ' "operator_weight": 100, "effective_weight": 500.0, "services": {}, "fingerprint": "x"}'
    )
    assert load_last_known_good(path) is None
    assert "node contract version 1" in caplog.text
