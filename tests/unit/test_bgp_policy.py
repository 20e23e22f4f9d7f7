"""bgp.policy: fail closed, reasons, attributes; property tests for the rules that must hold."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bgp.config import BgpConfig
from bgp.policy import (
    GRACEFUL_SHUTDOWN,
    NodeCondition,
    PolicyInputs,
    Reason,
    advertisements,
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
    }
)


def inputs(condition: NodeCondition, **kw: Any) -> PolicyInputs:
    return PolicyInputs(condition=condition, config=CONFIG, **kw)


def test_names_match_the_edge_state_machine() -> None:
    assert [c.value for c in NodeCondition] == [
        "starting",
        "healthy",
        "degraded",
        "draining",
        "down",
    ]
    assert str(NodeCondition.HEALTHY) == "healthy"


@pytest.mark.parametrize(
    ("condition", "drain", "complete", "weight", "expected"),
    [
        (NodeCondition.STARTING, False, False, 1.0, Reason.WITHDRAW_STARTING),
        (NodeCondition.STARTING, True, False, 1.0, Reason.WITHDRAW_STARTING),
        (NodeCondition.DOWN, False, False, 1.0, Reason.WITHDRAW_DOWN),
        (NodeCondition.DOWN, True, False, 5.0, Reason.WITHDRAW_DOWN),
        (NodeCondition.HEALTHY, False, False, 1.0, Reason.ANNOUNCE_HEALTHY),
        (NodeCondition.HEALTHY, False, False, 0.0, Reason.WITHDRAW_ZERO_WEIGHT),
        (NodeCondition.HEALTHY, False, False, -1.0, Reason.WITHDRAW_INVALID_WEIGHT),
        (NodeCondition.HEALTHY, False, False, float("nan"), Reason.WITHDRAW_INVALID_WEIGHT),
        (NodeCondition.HEALTHY, False, False, float("inf"), Reason.WITHDRAW_INVALID_WEIGHT),
        (NodeCondition.HEALTHY, False, True, 1.0, Reason.ANNOUNCE_HEALTHY),
        (NodeCondition.HEALTHY, True, False, 1.0, Reason.ANNOUNCE_DRAINING),
        (NodeCondition.HEALTHY, True, True, 1.0, Reason.WITHDRAW_DRAINED),
        (NodeCondition.DEGRADED, False, False, 1.0, Reason.ANNOUNCE_DEGRADED),
        (NodeCondition.DEGRADED, True, False, 1.0, Reason.ANNOUNCE_DRAINING),
        (NodeCondition.DRAINING, False, False, 1.0, Reason.ANNOUNCE_DRAINING),
        (NodeCondition.DRAINING, False, True, 1.0, Reason.WITHDRAW_DRAINED),
        (NodeCondition.DRAINING, False, False, 0.0, Reason.WITHDRAW_ZERO_WEIGHT),
    ],
)
def test_decision_table(
    condition: NodeCondition, drain: bool, complete: bool, weight: float, expected: Reason
) -> None:
    announce, reason = should_announce(
        inputs(condition, operator_drain=drain, drain_complete=complete, weight=weight)
    )
    assert reason is expected
    assert announce is expected.announces
    ads, reason2 = advertisements(
        inputs(condition, operator_drain=drain, drain_complete=complete, weight=weight)
    )
    assert reason2 is expected
    assert bool(ads) is announce


def test_healthy_attributes() -> None:
    ads, _ = advertisements(inputs(NodeCondition.HEALTHY, weight=1.0))
    assert {str(a.prefix) for a in ads} == {"198.51.100.10/32", "198.51.100.11/32"}
    for ad in ads:
        assert str(ad.next_hop) == "198.18.0.2"
        assert ad.med == 50
        assert ad.as_path_prepends == 0
        assert ad.communities == ("65101:100",)
        assert ad.link_bandwidth_bytes_per_s == 300e6 / 8


def test_draining_carries_gshut_and_prepends() -> None:
    ads, _ = advertisements(inputs(NodeCondition.DRAINING))
    for ad in ads:
        assert GRACEFUL_SHUTDOWN in ad.communities and "65101:100" in ad.communities
        assert ad.as_path_prepends == 2


def test_weight_scales_bandwidth() -> None:
    (ad, *_) = advertisements(inputs(NodeCondition.HEALTHY, weight=0.5))[0]
    assert ad.link_bandwidth_bytes_per_s == 150e6 / 8


def test_transitive_link_bandwidth_encoding() -> None:
    value = transitive_link_bandwidth(65101, 37_500_000.0)
    raw = bytes.fromhex(value[2:])
    assert raw[:2] == b"\x00\x04"  # transitive two-octet AS specific, link bandwidth
    assert int.from_bytes(raw[2:4]) == 65101
    assert struct.unpack(">f", raw[4:])[0] == 37_500_000.0
    # A 4-byte ASN does not fit: AS_TRANS stands in.
    assert bytes.fromhex(transitive_link_bandwidth(4200000000, 1.0)[2:])[2:4] == b"\x5b\xa0"


conditions = st.sampled_from(list(NodeCondition))
weights = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.floats(min_value=0, max_value=100)
)


@given(conditions, weights, st.booleans(), st.booleans())
def test_never_announce_unless_risen_and_wanted(
    condition: NodeCondition, weight: float, drain: bool, complete: bool
) -> None:
    ads, reason = advertisements(
        inputs(condition, weight=weight, operator_drain=drain, drain_complete=complete)
    )
    if condition in (NodeCondition.STARTING, NodeCondition.DOWN):
        assert not ads
    if not (weight > 0 and weight != float("inf")):
        assert not ads
    assert bool(ads) is reason.announces


@given(conditions, st.floats(min_value=0.001, max_value=100), st.booleans())
def test_draining_always_carries_gshut(
    condition: NodeCondition, weight: float, operator_drain: bool
) -> None:
    ads, _ = advertisements(inputs(condition, weight=weight, operator_drain=operator_drain))
    draining = condition is NodeCondition.DRAINING or operator_drain
    for ad in ads:
        assert (GRACEFUL_SHUTDOWN in ad.communities) is draining
        assert (ad.as_path_prepends > 0) is draining
        assert ad.link_bandwidth_bytes_per_s > 0


@given(st.floats(min_value=0.001, max_value=100), st.floats(min_value=0.001, max_value=100))
def test_bandwidth_is_proportional_to_weight(w1: float, w2: float) -> None:
    (a,) = list(advertisements(inputs(NodeCondition.HEALTHY, weight=w1))[0])[:1]
    (b,) = list(advertisements(inputs(NodeCondition.HEALTHY, weight=w2))[0])[:1]
    assert a.link_bandwidth_bytes_per_s * w2 == pytest.approx(b.link_bandwidth_bytes_per_s * w1)
