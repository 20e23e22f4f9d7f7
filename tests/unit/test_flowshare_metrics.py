"""edge.flowshare.metrics: the /status section becomes `anycast_edge_flowshare_*` series
(parsed back with prometheus-client's own parser), and nothing without the extension."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edge.flowshare.metrics import FlowShareCollector

SECTION: dict[str, Any] = {
    "forwarding": "unavailable",
    "unavailable": "no interface 'x'",
    "own_flows": 7,
    "map_size": 12,
    "in_sync": True,
    "sync_lag_ms": {"samples": 3, "p50": 20.0, "p99": 80.0},
    "peers": {
        "edge2": {"connected": True, "synced": True, "flows_held": 5, "frames_received": 40,
                  "packets_forwarded": 9},
        "edge3": {"connected": False, "synced": False, "flows_held": 7, "frames_received": 2,
                  "packets_forwarded": 0},
    },
    "packets_from_peers": 4,
    "loop_drops": 1,
    "refused_frames": {"bad mac": 3},
}  # fmt: skip


def samples(section: dict[str, Any] | None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FlowShareCollector(lambda: section))
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_the_status_section_as_series() -> None:
    got = samples(SECTION)
    p = "anycast_edge_flowshare"
    assert got[(f"{p}_forwarding", (("state", "unavailable"),))] == 1
    assert got[(f"{p}_forwarding", (("state", "on"),))] == 0
    assert got[(f"{p}_map_size", ())] == 12
    assert got[(f"{p}_sync_lag_seconds", (("quantile", "0.99"),))] == 0.08
    assert got[(f"{p}_peer_flows_held", (("peer", "edge3"),))] == 7
    assert got[(f"{p}_peer_synced", (("peer", "edge2"),))] == 1
    assert got[(f"{p}_peer_synced", (("peer", "edge3"),))] == 0
    assert got[(f"{p}_peer_frames_received_total", (("peer", "edge2"),))] == 40
    assert got[(f"{p}_peer_packets_forwarded_total", (("peer", "edge2"),))] == 9
    assert got[(f"{p}_loop_drops_total", ())] == 1
    assert got[(f"{p}_refused_frames_total", (("reason", "bad mac"),))] == 3


def test_no_series_without_the_extension_nor_lag_without_samples() -> None:
    assert samples(None) == {}
    quiet = {**SECTION, "sync_lag_ms": {"samples": 0, "p50": None, "p99": None}}
    assert not any(name.endswith("sync_lag_seconds") for name, _ in samples(quiet))
