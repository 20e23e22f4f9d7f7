"""bgp.exabgp pure parts: config rendering, commands, diff, parsing of ExaBGP's JSON."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from hypothesis import given
from hypothesis import strategies as st

from bgp.config import BgpConfig
from bgp.exabgp import (
    Ack,
    NeighborState,
    SentUpdate,
    announce_command,
    diff_commands,
    parse_message,
    render_config,
)
from bgp.policy import PolicyInputs, Serving, advertisements

CONFIG = BgpConfig.model_validate(
    {
        "local_asn": 65101,
        "router_id": "198.18.0.6",
        "local_address": "198.18.0.6",
        "prefixes": ["198.51.100.10/32", "198.51.100.20/32"],
        "neighbors": [
            {"peer_address": "198.18.0.5", "peer_asn": 65000, "md5_password": "pw-1"},
            {"peer_address": "198.18.0.9", "peer_asn": 65001},
        ],
        "drain_prepends": 2,
        "med": 7,
    }
)


def ads(serving: Serving, fraction: float = 1.0) -> frozenset:  # type: ignore[type-arg]
    return advertisements(PolicyInputs(serving, CONFIG, fraction * CONFIG.capacity_mbps))[0]


def test_render_config() -> None:
    text = render_config(CONFIG, "/usr/bin/python3 relay.py /run/x.sock")
    assert "run /usr/bin/python3 relay.py /run/x.sock;" in text
    assert "encoder json;" in text
    assert text.count("hold-time 3;") == 2
    assert "md5-password pw-1;" in text and text.count("md5-password") == 1
    assert "local-as 65101;" in text and "peer-as 65001;" in text
    assert "router-id 198.18.0.6;" in text and "local-address 198.18.0.6;" in text
    assert text.count("{") == text.count("}")


def test_announce_command_healthy_and_draining() -> None:
    healthy = announce_command(min(ads(Serving.FULL), key=lambda a: a.prefix))
    assert healthy.startswith("announce route 198.51.100.10/32 next-hop 198.18.0.6")
    assert "med 7" in healthy and "as-path [ 65101 ]" in healthy
    assert "extended-community [ 0x0004FE4D4CEE6B28 ]" in healthy  # 125e6 bytes/s
    assert "community [" not in healthy.replace("extended-community", "")
    draining = announce_command(min(ads(Serving.LEAVING), key=lambda a: a.prefix))
    assert "as-path [ 65101 65101 65101 ]" in draining
    assert "community [ 65535:0 ]" in draining


def test_diff_withdraws_first_and_only_changes() -> None:
    up, down = ads(Serving.FULL), ads(Serving.STOPPED)
    assert diff_commands(up, up) == []
    assert diff_commands(up, down) == [
        "withdraw route 198.51.100.10/32",
        "withdraw route 198.51.100.20/32",
    ]
    assert all(c.startswith("announce") for c in diff_commands(down, up))
    half = ads(Serving.FULL, 0.5)
    assert len(diff_commands(up, half)) == 2  # attribute change: re-announce, no withdraw
    mixed = {a for a in up if str(a.prefix).endswith(".10/32")}
    commands = diff_commands(up, mixed | {a for a in half if str(a.prefix).endswith(".20/32")})
    assert commands == [c for c in commands if "198.51.100.20" in c]


@given(st.sampled_from(list(Serving)), st.sampled_from(list(Serving)))
def test_diff_applied_reaches_desired(a: Serving, b: Serving) -> None:
    current, desired = ads(a), ads(b)
    rib = {adv.prefix: adv for adv in current}
    by_command = {announce_command(adv): adv for adv in desired}
    for command in diff_commands(current, desired):
        if command.startswith("withdraw"):
            rib.pop(IPv4Network(command.split()[2]))
        else:
            adv = by_command[command]
            rib[adv.prefix] = adv
    assert set(rib.values()) == set(desired)


HEADER = '{ "exabgp": "5.0.0", "time": 1.0, "host" : "vm", "pid" : 1, "ppid" : 1, "counter": 1, '
NEIGHBOR = (
    '"neighbor": { "address": { "local": "198.18.0.6", "peer": "198.18.0.5" }, '
    '"asn": { "local": 65101, "peer": 65000 }, "router-id": "198.18.0.6" , '
)


def test_parse_acks_and_state() -> None:
    assert parse_message("done\n") == Ack(True)
    assert parse_message("error") == Ack(False)
    assert parse_message("garbage") is None
    assert parse_message("{ broken json") is None
    line = HEADER + '"type": "state", ' + NEIGHBOR + '"state": "up" } }'
    assert parse_message(line) == NeighborState(IPv4Address("198.18.0.5"), "up")


def test_parse_sent_updates() -> None:
    eor = (
        HEADER + '"type": "update", ' + NEIGHBOR + '"direction": "send", "message": '
        '{ "eor": { "afi" : "ipv4", "safi" : "unicast" } } } }'
    )
    parsed = parse_message(eor)
    assert isinstance(parsed, SentUpdate) and parsed.end_of_rib
    withdraw = (
        HEADER + '"type": "update", ' + NEIGHBOR + '"direction": "send", "message": '
        '{ "update": { "withdraw": { "ipv4 unicast": [ { "nlri": "198.51.100.10/32" } ] } } } } }'
    )
    assert parse_message(withdraw) == SentUpdate(
        IPv4Address("198.18.0.5"), frozenset(), frozenset({IPv4Network("198.51.100.10/32")})
    )
    announce = (
        HEADER + '"type": "update", ' + NEIGHBOR + '"direction": "send", "message": '
        '{ "update": { "attribute": { "origin": "igp" }, "announce": { "ipv4 unicast": '
        '{ "198.18.0.6": [ { "nlri": "198.51.100.10/32" }, '
        '{ "nlri": "198.51.100.20/32" } ] } } } } } }'
    )
    parsed = parse_message(announce)
    assert isinstance(parsed, SentUpdate)
    assert parsed.announced == {IPv4Network("198.51.100.10/32"), IPv4Network("198.51.100.20/32")}
    received = announce.replace('"direction": "send"', '"direction": "receive"')
    assert parse_message(received) is None
