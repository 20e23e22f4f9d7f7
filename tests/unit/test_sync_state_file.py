"""The last-known-good file of edge.sync: atomic replacement, damaged files ignored."""

from __future__ import annotations

from pathlib import Path

from contract.schemas import NodeDesired
from edge.sync import load_last_known_good, write_atomically

VIEW = NodeDesired(
    revision=7,
    node="a1",
    site="a",
    drained=False,
    operator_weight=100,
    effective_weight=500.0,
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
