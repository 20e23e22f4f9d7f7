"""bgp.exabgp pure parts: config rendering, commands, diff, parsing of ExaBGP's JSON."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from hypothesis import given
from hypothesis import strategies as st

from bgp.config import BgpConfig
from bgp.exabgp import (
    Ack,
    Negotiated,
    NeighborState,
    NotificationSeen,
    OpenSeen,
    RefreshSeen,
    SentUpdate,
    announce_command,
    diff_commands,
    parse_message,
    render_config,
)
from bgp.neighbors import NeighborRoute, route_for, routes_for
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


PEER = IPv4Address("198.18.0.5")


def first_route(condition: Serving, neighbor: int = 0) -> NeighborRoute:
    return route_for(
        min(ads(condition), key=lambda a: a.prefix), CONFIG.neighbors[neighbor], CONFIG
    )


def test_render_config() -> None:
    text = render_config(CONFIG, "/usr/bin/python3 relay.py /run/x.sock")
    assert "run /usr/bin/python3 relay.py /run/x.sock;" in text
    assert "encoder json;" in text
    assert text.count("hold-time 3;") == 2
    assert "md5-password pw-1;" in text and text.count("md5-password") == 1
    assert "local-as 65101;" in text and "peer-as 65001;" in text
    assert "router-id 198.18.0.6;" in text and "local-address 198.18.0.6;" in text
    # Route refresh offered, graceful restart not (unless asked for); the session
    # messages the driver's observed state needs are all reported.
    assert text.count("route-refresh enable;") == 2 and "graceful-restart" not in text
    assert "negotiated;" in text and text.count("notification;") == 4
    assert text.count("connect 179;") == 2 and "passive" not in text and "ttl" not in text
    assert text.count("{") == text.count("}")


def test_render_session_features() -> None:
    config = CONFIG.model_copy(
        update={
            "neighbors": [
                CONFIG.neighbors[0].model_copy(
                    update={"multihop": True, "ttl": 4, "graceful_restart_s": 30}
                ),
                CONFIG.neighbors[1].model_copy(
                    update={"passive": True, "port": 1790, "route_refresh": False}
                ),
            ]
        }
    )
    text = render_config(config, "relay")
    assert "outgoing-ttl 4;" in text and "graceful-restart 30;" in text
    assert "passive true;" in text and "listen 1790;" in text
    assert "route-refresh disable;" in text


def test_announce_command_healthy_and_draining() -> None:
    healthy = announce_command(PEER, first_route(Serving.FULL))
    assert healthy.startswith(
        "neighbor 198.18.0.5 announce route 198.51.100.10/32 next-hop 198.18.0.6"
    )
    assert "med 7" in healthy and "as-path [ 65101 ]" in healthy
    assert "extended-community [ 0x0004FE4D4CEE6B28 ]" in healthy  # 125e6 bytes/s
    assert "community [" not in healthy.replace("extended-community", "")
    assert "local-preference" not in healthy and "large-community" not in healthy
    draining = announce_command(PEER, first_route(Serving.LEAVING))
    assert "as-path [ 65101 65101 65101 ]" in draining
    assert "community [ 65535:0 ]" in draining


def test_diff_withdraws_first_and_only_changes() -> None:
    up, down = ads(Serving.FULL), ads(Serving.STOPPED)
    assert diff_commands(up, up, CONFIG) == []
    assert diff_commands(up, down, CONFIG) == [
        f"neighbor {peer} withdraw route 198.51.100.{n}/32"
        for peer in ("198.18.0.5", "198.18.0.9")
        for n in (10, 20)
    ]
    assert all(" announce route " in c for c in diff_commands(down, up, CONFIG))
    half = ads(Serving.FULL, 0.5)
    # Attribute change: re-announce to each neighbor, no withdraw.
    assert len(diff_commands(up, half, CONFIG)) == 4
    mixed = {a for a in up if str(a.prefix).endswith(".10/32")}
    later = mixed | {a for a in half if str(a.prefix).endswith(".20/32")}
    commands = diff_commands(up, later, CONFIG)
    assert commands == [c for c in commands if "198.51.100.20" in c]


@given(st.sampled_from(list(Serving)), st.sampled_from(list(Serving)))
def test_diff_applied_reaches_desired(a: Serving, b: Serving) -> None:
    """Replaying the commands on a per-neighbor RIB gives each neighbor exactly what
    bgp.neighbors says it should hold."""
    current, desired = ads(a), ads(b)
    ribs = {
        n.peer_address: {r.prefix: r for r in routes_for(current, n, CONFIG)}
        for n in CONFIG.neighbors
    }
    by_command = {
        announce_command(n.peer_address, route): (n.peer_address, route)
        for n in CONFIG.neighbors
        for route in routes_for(desired, n, CONFIG)
    }
    for command in diff_commands(current, desired, CONFIG):
        words = command.split()
        if words[2] == "withdraw":
            ribs[IPv4Address(words[1])].pop(IPv4Network(words[4]))
        else:
            peer, route = by_command[command]
            ribs[peer][route.prefix] = route
    for neighbor in CONFIG.neighbors:
        held = set(ribs[neighbor.peer_address].values())
        assert held == routes_for(desired, neighbor, CONFIG)


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


def test_parse_session_messages() -> None:
    """The shapes ExaBGP 5.0.15 prints (captured from a run against FRR 8.4)."""
    sent_open = (
        HEADER + '"type": "open", ' + NEIGHBOR + '"direction": "send", "open": { "version": 4, '
        '"asn": 65101, "hold_time": 3, "router_id": "198.18.0.6", "capabilities": { '
        '"multiprotocol": { "name": "multiprotocol", "families": [ "ipv4/unicast" ] }, '
        '"route-refresh": { "name": "route-refresh", "variant": "RFC" }, '
        '"hostname": { "host-name": null, "domain-name": null } } } } }'
    )
    assert parse_message(sent_open) == OpenSeen(
        PEER, "send", 65101, 3, frozenset({"multiprotocol", "route-refresh", "hostname"})
    )
    received_open = (
        HEADER + '"type": "open", ' + NEIGHBOR + '"direction": "receive", "open": { '
        '"version": 4, "asn": 65000, "hold_time": 180, "router_id": "198.18.0.1", '
        '"capabilities": { "2": { "name": "route-refresh", "variant": "RFC" }, '
        '"64": { "name": "graceful restart", "time": 120 } } } } }'
    )
    parsed = parse_message(received_open)
    assert isinstance(parsed, OpenSeen)
    assert parsed.capabilities == {"route-refresh", "graceful-restart"}
    negotiated = (
        HEADER + '"type": "negotiated", ' + NEIGHBOR + '"negotiated": { "message_size": 65535, '
        '"hold_time": 3, "asn4": true, "refresh": "enhanced", "families": ["ipv4 unicast"] } } }'
    )
    assert parse_message(negotiated) == Negotiated(PEER, 3, "enhanced")
    notification = (
        HEADER + '"type": "notification", ' + NEIGHBOR + '"direction": "receive", '
        '"notification": { "code": 6, "subcode": 2, "data": "0x00", '
        '"message": "Shutdown Communication: \\"going-away\\"" } } }'
    )
    parsed = parse_message(notification)
    assert isinstance(parsed, NotificationSeen)
    assert (parsed.direction, parsed.code, parsed.subcode) == ("receive", 6, 2)
    assert "going-away" in parsed.message
    refresh = (
        HEADER + '"type": "refresh", ' + NEIGHBOR + '"direction": "receive", '
        '"route-refresh": { "afi": "ipv4", "safi": "unicast", "subtype": "0" } } }'
    )
    assert parse_message(refresh) == RefreshSeen(PEER)
    # Malformed shapes are ignored, never raised.
    assert parse_message(sent_open.replace('"hold_time": 3', '"hold_time": "x"')) is None
