"""The failover timeline the lab bench draws: a real PNG of the size it promises, with the
requests counted in the right buckets."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from bench.timeline import BUCKET_S, DPI, HEIGHT_PX, WIDTH_PX, buckets, draw


def _records() -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for i in range(400):
        t = 1000.0 + i * 0.025
        node = "edge-a1" if t < 1005 else "edge-a2"
        ok = not (1004.9 < t < 1005.0)
        out.append({"start": t, "end": t + 0.01, "ok": ok, "node": node if ok else ""})
    return out


def test_buckets_count_served_per_node_and_failures() -> None:
    served, failed = buckets(_records(), 1000.0)
    assert set(served) == {"edge-a1", "edge-a2"}
    assert (
        sum(served["edge-a1"].values()) + sum(served["edge-a2"].values()) + sum(failed.values())
        == 400
    )
    assert set(failed) == {int(4.9 // BUCKET_S)}


def test_draw_writes_a_png_of_the_promised_size(tmp_path: Path) -> None:
    path = draw(_records(), [(1005.0, "drain issued")], tmp_path / "t.png", "a drain")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (WIDTH_PX, HEIGHT_PX)
    assert DPI == 100 and len(data) > 20_000  # lines and text were drawn, not a blank page


def test_nothing_to_draw_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no requests"):
        draw([], [], tmp_path / "t.png", "empty")
