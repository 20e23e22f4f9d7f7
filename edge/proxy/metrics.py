"""The proxy's own metric families, read at scrape time from plain counters."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric

from edge.proxy.common import ProxyContext


def proxy_metrics(ctx: ProxyContext) -> Iterator[Metric]:
    rejected = CounterMetricFamily(
        "anycast_edge_http_rejected",
        "Messages the framing core refused (client: answered 4xx/5xx, never forwarded; "
        "backend: the client got 502, the backend connection was closed)",
        labels=["side", "reason"],
    )
    for (side, reason), count in sorted(ctx.rejections.items()):
        rejected.add_metric([side, reason], count)
    yield rejected
    ejections = CounterMetricFamily(
        "anycast_edge_backend_ejections",
        "Outlier ejections of a backend by live-traffic evidence",
        labels=["backend"],
    )
    for backend in ctx.pool.active_backends:
        ejections.add_metric([backend.name], backend.outlier.ejections)
    yield ejections
