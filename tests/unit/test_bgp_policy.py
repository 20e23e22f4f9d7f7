"""bgp.policy: fail closed, reasons, attributes; property tests for the rules that must hold."""

from __future__ import annotations

import dataclasses
import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bgp.config import BgpConfig
from bgp.policy import (
    GRACEFUL_SHUTDOWN,
    PolicyInputs,
    Reason,
    Serving,
    advertisements,
    announced_mbps,
    should_announce,
    transitive_link_bandwidth,
)

CONFIG = BgpConfig.model_validate(
    {
        "local_asn": 65101,
        "router_id": "198.18.0.2",
        "local_address": "198.18.0.2",
        "prefixes": ["198.51.100.10/32", "198.51.100.11/32"],
        "neighbors": [{"peer_address": "198.18.0.1", "peer_asn": 65000}],
        "capacity_mbps": 300,
        "med": 50,
        "drain_prepends": 2,
        "communities": ["65101:100"],
        "degraded_bandwidth_factor": 0.25,
    }
)


def inputs(serving: Serving, mbps: float = 300.0) -> PolicyInputs:
    return PolicyInputs(serving, CONFIG, mbps)


@pytest.mark.parametrize(
    ("serving", "mbps", "expected"),
    [
        (Serving.NOT_READY, 300.0, Reason.WITHDRAW_STARTING),
        (Serving.STOPPED, 300.0, Reason.WITHDRAW_DOWN),
        (Serving.LEFT, 300.0, Reason.WITHDRAW_DRAINED),
        (Serving.LEFT, 0.0, Reason.WITHDRAW_DRAINED),
        (Serving.FULL, 300.0, Reason.ANNOUNCE_HEALTHY),
        (Serving.FULL, 0.0, Reason.WITHDRAW_ZERO_BANDWIDTH),
        (Serving.FULL, -1.0, Reason.WITHDRAW_INVALID_BANDWIDTH),
        (Serving.FULL, float("nan"), Reason.WITHDRAW_INVALID_BANDWIDTH),
        (Serving.FULL, float("inf"), Reason.WITHDRAW_INVALID_BANDWIDTH),
        (Serving.REDUCED, 300.0, Reason.ANNOUNCE_DEGRADED),
        (Serving.LEAVING, 300.0, Reason.ANNOUNCE_DRAINING),
        (Serving.LEAVING, 0.0, Reason.WITHDRAW_ZERO_BANDWIDTH),
    ],
)
def test_decision_table(serving: Serving, mbps: float, expected: Reason) -> None:
    announce, reason = should_announce(inputs(serving, mbps))
    assert reason is expected
    assert announce is expected.announces
    ads, reason2 = advertisements(inputs(serving, mbps))
    assert reason2 is expected
    assert bool(ads) is announce


def test_every_serving_value_is_in_the_table() -> None:
    assert {s.value for s in Serving} == {
        "not-ready", "full", "reduced", "leaving", "left", "stopped",
    }  # fmt: skip


def test_healthy_attributes() -> None:
    ads, _ = advertisements(inputs(Serving.FULL))
    assert {str(a.prefix) for a in ads} == {"198.51.100.10/32", "198.51.100.11/32"}
    for ad in ads:
        assert str(ad.next_hop) == "198.18.0.2"
        assert ad.med == 50
        assert ad.as_path_prepends == 0
        assert ad.communities == ("65101:100",)
        assert ad.link_bandwidth_bytes_per_s == 300e6 / 8


def test_draining_carries_gshut_and_prepends_at_the_full_bandwidth() -> None:
    ads, _ = advertisements(inputs(Serving.LEAVING, 120.0))
    for ad in ads:
        assert GRACEFUL_SHUTDOWN in ad.communities and "65101:100" in ad.communities
        assert ad.as_path_prepends == 2
        assert ad.link_bandwidth_bytes_per_s == 120e6 / 8


def test_degraded_announces_the_configured_fraction() -> None:
    """DEGRADED acts on the edge: the policy reduces the bandwidth, no API involved."""
    (ad, *_) = advertisements(inputs(Serving.REDUCED, 200.0))[0]
    assert ad.link_bandwidth_bytes_per_s == 50e6 / 8  # 0.25 x 200 Mbit/s
    assert announced_mbps(inputs(Serving.FULL, 200.0)) == 200.0


def test_link_bandwidth_is_the_desired_mbps() -> None:
    (ad, *_) = advertisements(inputs(Serving.FULL, 150.0))[0]
    assert ad.link_bandwidth_bytes_per_s == 150e6 / 8


def test_transitive_link_bandwidth_encoding() -> None:
    value = transitive_link_bandwidth(65101, 37_500_000.0)
    raw = bytes.fromhex(value[2:])
    assert raw[:2] == b"\x00\x04"  # transitive two-octet AS specific, link bandwidth
    assert int.from_bytes(raw[2:4]) == 65101
    assert struct.unpack(">f", raw[4:])[0] == 37_500_000.0
    # A 4-byte ASN does not fit: AS_TRANS stands in.
    assert bytes.fromhex(transitive_link_bandwidth(4200000000, 1.0)[2:])[2:4] == b"\x5b\xa0"


servings = st.sampled_from(list(Serving))
bandwidths = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.floats(min_value=0, max_value=1e6)
)


@given(servings, bandwidths)
def test_never_announce_unless_risen_and_wanted(serving: Serving, mbps: float) -> None:
    ads, reason = advertisements(inputs(serving, mbps))
    if serving in (Serving.NOT_READY, Serving.STOPPED, Serving.LEFT):
        assert not ads
    if not (mbps > 0 and math.isfinite(mbps)):
        assert not ads
    assert bool(ads) is reason.announces


@given(servings, st.floats(min_value=0.001, max_value=1e6))
def test_only_leaving_carries_gshut(serving: Serving, mbps: float) -> None:
    ads, _ = advertisements(inputs(serving, mbps))
    for ad in ads:
        assert (GRACEFUL_SHUTDOWN in ad.communities) is (serving is Serving.LEAVING)
        assert (ad.as_path_prepends > 0) is (serving is Serving.LEAVING)
        assert 0 < ad.link_bandwidth_bytes_per_s <= mbps * 1e6 / 8 * (1 + 1e-9)


@given(st.floats(min_value=0.001, max_value=1e6), st.floats(min_value=0.001, max_value=1e6))
def test_bandwidth_is_proportional_to_the_desired_mbps(m1: float, m2: float) -> None:
    (a,) = list(advertisements(inputs(Serving.FULL, m1))[0])[:1]
    (b,) = list(advertisements(inputs(Serving.FULL, m2))[0])[:1]
    assert a.link_bandwidth_bytes_per_s * m2 == pytest.approx(b.link_bandwidth_bytes_per_s * m1)


def test_a_med_penalty_is_added_to_every_prefix_and_capped() -> None:
    config = BgpConfig.model_validate(
        {
            "local_asn": 65101,
            "router_id": "198.18.0.2",
            "local_address": "198.18.0.2",
            "prefixes": ["198.51.100.10/32"],
            "neighbors": [{"peer_address": "198.18.0.1", "peer_asn": 65000}],
            "med": 10,
        }
    )
    base = PolicyInputs(Serving.FULL, config, 1000.0)
    (plain,) = advertisements(base)[0]
    (penalized,) = advertisements(dataclasses.replace(base, med_penalty=100))[0]
    (capped,) = advertisements(dataclasses.replace(base, med_penalty=2**32))[0]
    assert (plain.med, penalized.med, capped.med) == (10, 110, 2**32 - 1)
