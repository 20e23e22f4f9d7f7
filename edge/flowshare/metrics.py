"""Prometheus series for flow sharing, read at scrape time from the extension's /status
section (`FlowShareExtension.status()`), so /metrics and /status can never disagree.
The agent's admin endpoint registers it with one line (see `FlowShareCollector`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "anycast_edge_flowshare"
FORWARDING_STATES = ("on", "off", "unavailable")


def flowshare_metric_families(status: Mapping[str, Any]) -> Iterator[Metric]:
    """The metric families for one extension's status section."""
    forwarding = GaugeMetricFamily(
        f"{PREFIX}_forwarding",
        "1 for the forwarding's current state (on, off by config, unavailable on this host)",
        labels=["state"],
    )
    for state in FORWARDING_STATES:
        forwarding.add_metric([state], 1.0 if status["forwarding"] == state else 0.0)
    yield forwarding
    yield GaugeMetricFamily(
        f"{PREFIX}_map_size", "Flows in the kernel's forwarding map", value=status["map_size"]
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_own_flows", "Flows this node owns (shared with its peers)",
        value=status["own_flows"],
    )  # fmt: skip
    yield GaugeMetricFamily(
        f"{PREFIX}_in_sync", "1 when every connected peer acknowledged all of our flows",
        value=1.0 if status["in_sync"] else 0.0,
    )  # fmt: skip
    lag = status["sync_lag_ms"]
    quantiles = GaugeMetricFamily(
        f"{PREFIX}_sync_lag_seconds",
        "Accept of a flow -> every peer's kernel map holds it, over the last samples",
        labels=["quantile"],
    )
    for name, quantile in (("p50", "0.5"), ("p99", "0.99")):
        if lag[name] is not None:
            quantiles.add_metric([quantile], lag[name] / 1000)
    yield quantiles
    peer = ["peer"]
    connected = GaugeMetricFamily(
        f"{PREFIX}_peer_connected", "1 while our flow stream to the peer is up", labels=peer
    )
    synced = GaugeMetricFamily(
        f"{PREFIX}_peer_synced",
        "1 when the peer acknowledged all of our flows and we hold its (the GSLB's gate)",
        labels=peer,
    )
    held = GaugeMetricFamily(
        f"{PREFIX}_peer_flows_held", "Flows received from the peer that it owns", labels=peer
    )
    frames = CounterMetricFamily(
        f"{PREFIX}_peer_frames_received", "Authenticated frames received from the peer",
        labels=peer,
    )  # fmt: skip
    forwarded = CounterMetricFamily(
        f"{PREFIX}_peer_packets_forwarded", "Packets handed to the peer that owns their flow",
        labels=peer,
    )  # fmt: skip
    for name, section in status["peers"].items():
        connected.add_metric([name], 1.0 if section["connected"] else 0.0)
        synced.add_metric([name], 1.0 if section.get("synced") else 0.0)
        held.add_metric([name], section["flows_held"])
        frames.add_metric([name], section["frames_received"])
        forwarded.add_metric([name], section["packets_forwarded"])
    yield from (connected, synced, held, frames, forwarded)
    yield CounterMetricFamily(
        f"{PREFIX}_packets_from_peers", "Packets a peer forwarded to this node",
        value=status["packets_from_peers"],
    )  # fmt: skip
    yield CounterMetricFamily(
        f"{PREFIX}_loop_drops",
        "Packets a peer forwarded that this node would forward again (stale maps): dropped",
        value=status["loop_drops"],
    )
    refused = CounterMetricFamily(
        f"{PREFIX}_refused_frames", "Peer frames refused, by reason", labels=["reason"]
    )
    for reason, count in status["refused_frames"].items():
        refused.add_metric([reason], count)
    yield refused


class FlowShareCollector(Collector):
    """Reads the flowshare /status section at scrape time; nothing without the extension."""

    def __init__(self, section: Callable[[], Mapping[str, Any] | None]) -> None:
        self._section = section

    def collect(self) -> Iterator[Metric]:
        status = self._section()
        if status is not None:
            yield from flowshare_metric_families(status)
