"""Failover timelines as pictures: what a client saw during a bench scenario, per node, with
the scenario's event marks (drain issued, route gone from the FIB, weight applied ...).

`draw` takes the lab client's per-request records ({start, end, ok, node}) and a list of
(time, label) marks, and writes one PNG: requests served per second by each node on top,
failed requests per second below, every mark a dashed line across both. matplotlib with the
Agg backend: no display, no font download.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

#: Requests are counted in buckets of this many seconds (then scaled to per second).
BUCKET_S = 0.25
WIDTH_PX, HEIGHT_PX, DPI = 1200, 700, 100


def buckets(
    records: Sequence[dict[str, Any]], origin: float
) -> tuple[dict[str, collections.Counter[int]], collections.Counter[int]]:
    """Per node: bucket index -> requests served; and bucket -> requests failed."""
    served: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    failed: collections.Counter[int] = collections.Counter()
    for record in records:
        index = int((record["start"] - origin) // BUCKET_S)
        if record["ok"]:
            served[record.get("node") or "?"][index] += 1
        else:
            failed[index] += 1
    return dict(served), failed


def draw(
    records: Sequence[dict[str, Any]],
    marks: Sequence[tuple[float, str]],
    path: Path,
    title: str,
) -> Path:
    if not records:
        raise ValueError("no requests to draw")
    origin = min(r["start"] for r in records)
    served, failed = buckets(records, origin)
    last = max(int((r["start"] - origin) // BUCKET_S) for r in records)
    xs = [i * BUCKET_S for i in range(last + 1)]
    per_s = 1 / BUCKET_S

    figure, (top, bottom) = plt.subplots(
        2,
        1,
        sharex=True,
        figsize=(WIDTH_PX / DPI, HEIGHT_PX / DPI),
        dpi=DPI,
        gridspec_kw={"height_ratios": [3, 1]},
    )
    for node in sorted(served):
        top.plot(xs, [served[node][i] * per_s for i in range(last + 1)], label=node, linewidth=1.4)
    bottom.bar(
        xs, [failed[i] * per_s for i in range(last + 1)], width=BUCKET_S, color="#c8302c",
        align="edge", label="failed",
    )  # fmt: skip
    for when, label in marks:
        x = when - origin
        for axis in (top, bottom):
            axis.axvline(x, color="#5f6b7a", linestyle="--", linewidth=1)
        top.annotate(
            label, (x, 1.0), xycoords=("data", "axes fraction"), rotation=90,
            va="top", ha="right", fontsize=8, color="#1d232b",
        )  # fmt: skip
    top.set_title(title)
    top.set_ylabel("requests/s served")
    # Outside the plot, right: the event marks are labelled along the top edge.
    top.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)
    top.grid(alpha=0.3)
    bottom.set_ylabel("failed/s")
    bottom.set_xlabel("seconds")
    bottom.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path
