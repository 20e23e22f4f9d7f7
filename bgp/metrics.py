"""Prometheus series for the BGP side, read at scrape time from the speaker's status.

Named in the style of the FRR and BIRD exporters (`frr_bgp_peer_up`,
`frr_bgp_peer_prefixes_advertised_count_total`, `bird_protocol_up`, ...), under the
agent's `anycast_edge_` prefix. Everything comes from `BgpSpeaker.status()`, so
/metrics and /status can never disagree. The agent's admin endpoint registers it with
one line (see `BgpCollector`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "anycast_edge_bgp"


def bgp_metric_families(status: Mapping[str, Any]) -> Iterator[Metric]:
    """The metric families for one speaker's status (`BgpSpeaker.status()`)."""
    peer = ["peer"]
    up = GaugeMetricFamily(
        f"{PREFIX}_peer_up", "1 while the BGP session is established", labels=peer
    )
    uptime = GaugeMetricFamily(
        f"{PREFIX}_peer_uptime_seconds", "Seconds since the session was established", labels=peer
    )
    hold = GaugeMetricFamily(
        f"{PREFIX}_peer_hold_time_seconds", "Negotiated hold time", labels=peer
    )
    advertised = GaugeMetricFamily(
        f"{PREFIX}_peer_prefixes_advertised_count",
        "Prefixes the peer was last sent as announced (what it holds from us)",
        labels=peer,
    )
    established = CounterMetricFamily(
        f"{PREFIX}_peer_established", "Times the session came up", labels=peer
    )
    updates = CounterMetricFamily(
        f"{PREFIX}_peer_updates_sent",
        "UPDATEs sent, by kind (announce, withdraw, end-of-rib)",
        labels=[*peer, "kind"],
    )
    notifications = CounterMetricFamily(
        f"{PREFIX}_peer_notifications",
        "NOTIFICATIONs sent and received, by decoded reason",
        labels=[*peer, "direction", "reason"],
    )
    refreshes = CounterMetricFamily(
        f"{PREFIX}_peer_route_refreshes_received", "ROUTE-REFRESH requests received", labels=peer
    )
    bfd = GaugeMetricFamily(
        f"{PREFIX}_bfd_peer_up", "1 while the BFD session with the peer is up", labels=peer
    )
    for address, session in status.get("sessions", {}).items():
        labels = [address]
        up.add_metric(labels, 1.0 if session["state"] == "up" else 0.0)
        uptime.add_metric(labels, session["uptime_s"] or 0.0)
        hold.add_metric(labels, session["hold_time_s"] or 0.0)
        held = sum(1 for sent in session["sent"].values() if sent["announced"])
        advertised.add_metric(labels, held if session["state"] == "up" else 0.0)
        counters = session["counters"]
        established.add_metric(labels, counters["established"])
        for kind, count in counters["updates_sent"].items():
            updates.add_metric([address, kind], count)
        for entry in counters["notifications"]:
            notifications.add_metric([address, entry["direction"], entry["reason"]], entry["count"])
        refreshes.add_metric(labels, counters["route_refreshes_received"])
        if session.get("bfd") is not None:
            bfd.add_metric(labels, 1.0 if session["bfd"] == "up" else 0.0)
    yield from (up, uptime, hold, advertised, established, updates, notifications, refreshes, bfd)

    carried = GaugeMetricFamily(
        f"{PREFIX}_prefix_peers",
        "Established peers holding the prefix from us (0 while desired: no session)",
        labels=["prefix", "desired"],
    )
    for prefix, entry in status.get("prefixes", {}).items():
        carried.add_metric([prefix, str(entry["desired"]).lower()], len(entry["sent_to"]))
    yield carried
    holddowns = CounterMetricFamily(
        f"{PREFIX}_flap_holddowns", "Announcements held back by the flap budget"
    )
    holddowns.add_metric([], status.get("flap_holddowns", 0))
    yield holddowns
    deadman = CounterMetricFamily(
        f"{PREFIX}_deadman_firings",
        "Times the relay withdrew everything because the agent's loop stopped beating",
    )
    deadman.add_metric([], status.get("deadman", {}).get("firings", 0))
    yield deadman
    stalls = CounterMetricFamily(
        f"{PREFIX}_watchdog_stalls", "Times the in-process loop watchdog killed ExaBGP"
    )
    stalls.add_metric([], status.get("watchdog_stalls", 0))
    yield stalls
    restarts = CounterMetricFamily(f"{PREFIX}_exabgp_restarts", "Times ExaBGP was restarted")
    restarts.add_metric([], status.get("restarts", 0))
    yield restarts
    degraded = GaugeMetricFamily(
        f"{PREFIX}_degraded", "1 while the BGP side holds the node at degraded"
    )
    degraded.add_metric([], 0.0 if status.get("degraded_reason") is None else 1.0)
    yield degraded


class BgpCollector(Collector):
    """Reads the speaker's status at scrape time; `status` returns None while there is no
    speaker (the agent's admin endpoint passes its "bgp" status section)."""

    def __init__(self, status: Callable[[], Mapping[str, Any] | None]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        if status is not None:
            yield from bgp_metric_families(status)


__all__ = ["BgpCollector", "bgp_metric_families"]
