"""The proxy's own metric families, read at scrape time from plain counters."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, Metric

from edge.proxy.common import ProxyContext


def proxy_metrics(contexts: Mapping[str, ProxyContext]) -> Iterator[Metric]:
    """`contexts`: each service's, by service name."""
    rejected = CounterMetricFamily(
        "anycast_edge_http_rejected",
        "Messages the framing core refused (client: answered 4xx/5xx, never forwarded; "
        "backend: the client got 502, the backend connection was closed)",
        labels=["side", "reason"],
    )
    totals: dict[tuple[str, str], int] = {}
    for ctx in contexts.values():
        for key, count in ctx.rejections.items():
            totals[key] = totals.get(key, 0) + count
    for (side, reason), count in sorted(totals.items()):
        rejected.add_metric([side, reason], count)
    yield rejected
    ejections = CounterMetricFamily(
        "anycast_edge_backend_ejections",
        "Outlier ejections of a backend by live-traffic evidence",
        labels=["backend", "service"],
    )
    for name, ctx in contexts.items():
        for backend in ctx.pool.active_backends:
            ejections.add_metric([backend.name, name], backend.outlier.ejections)
    yield ejections
