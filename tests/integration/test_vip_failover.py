"""Active-passive mode with the real kernel, real ARP and a real 3-member etcd.

One L2 segment of network namespaces (tests/support/vip_lab.py): a client, two nodes
running `python -m edge.vip` (the agent with its vip_group extension), a backend. An
observer samples every 10 ms which nodes hold the VIP in their kernel; the client's view
is its own ARP entry (`ip -n client neigh`) and which node answers its HTTP requests.
"""

from __future__ import annotations

import bisect
import os
import random
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from edge.state import NodeState
from edge.vip.heartbeat import Heartbeat, encode
from tests.support.procs import run, wait_for
from tests.support.vip_lab import VIP, ApLab, Node, Observer, in_netns

pytestmark = [pytest.mark.netns, pytest.mark.timeout(300), pytest.mark.needs("root", "etcd")]


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[ApLab]:
    cluster = request.getfixturevalue("etcd_cluster")
    segment = ApLab.create_segment(2, cluster.client_urls)
    try:
        yield segment
    finally:
        segment.close()


@pytest.fixture
def bare_segment() -> Iterator[ApLab]:
    segment = ApLab.create_segment(2)
    try:
        yield segment
    finally:
        segment.close()


def start_pair(lab: ApLab, *, fenced: bool = True, **group: Any) -> tuple[Node, Node]:
    """n1 (priority 200) active, n2 (100) standby hearing it, the client on n1's MAC."""
    n1, n2 = lab.nodes
    etcd = lab.etcd_urls if fenced else None
    lab.start_node(n1, lab.node_config(n1, 200, etcd=etcd, **group))
    lab.wait_role(n1, "active", 20)
    lab.start_node(n2, lab.node_config(n2, 100, etcd=etcd, **group))
    lab.wait_vip(n2, "reason", "peer_active", 20)
    assert lab.client_get() == "n1"
    assert lab.client_mac_for_vip() == n1.mac
    return n1, n2


def client_follows(lab: ApLab, node: Node, timeout: float = 10.0) -> None:
    """The client's existing ARP entry moves to `node` without the client asking."""
    wait_for(lambda: lab.client_mac_for_vip() == node.mac, timeout, what=f"client on {node.name}")


class ClientLoop:
    """New HTTP requests from the client every 20 ms (bounded): who served, what failed."""

    def __init__(self, lab: ApLab, limit: int = 400) -> None:
        self.lab, self.limit = lab, limit
        self.served: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.served) + len(self.failures) < self.limit:
            try:
                self.served.append(self.lab.client_get(timeout=5.0))
            except OSError as error:
                self.failures.append(repr(error))
            time.sleep(0.02)

    def wait_served_by(self, name: str) -> None:
        wait_for(lambda: self.served[-3:] == [name] * 3, 10, what=f"requests served by {name}")

    def __enter__(self) -> ClientLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_kill_moves_the_vip_and_the_clients_arp_entry(lab: ApLab) -> None:
    n1, n2 = start_pair(lab)
    with Observer(lab) as observer:
        lab.signal_node(n1, signal.SIGKILL)
        lab.wait_role(n2, "active")
        client_follows(lab, n2)
        # nothing of n1 runs any more: its kernel drops the address by itself (lifetime)
        wait_for(lambda: not lab.holds_vip(n1), 5, what="the dead node's address to expire")
    assert observer.dual_owner_samples() == 0
    assert lab.client_get() == "n2"
    fencing = lab.vip_status(n2)["fencing"]
    assert fencing["holds_key"] and fencing["token"] > 0


def test_multicast_heartbeats_elect_one_owner_and_fail_over(lab: ApLab) -> None:
    """Heartbeats to a link-local group only (no unicast is sent): the standby hears the
    active through the group (start_pair waits for "peer_active", which only a heard peer
    gives), then takes over when it dies."""
    n1, n2 = start_pair(lab, multicast="224.0.0.18")
    assert lab.vip_status(n2)["heartbeats_to"] == ["224.0.0.18"]
    with Observer(lab) as observer:
        lab.signal_node(n1, signal.SIGKILL)
        lab.wait_role(n2, "active")
        client_follows(lab, n2)
    assert observer.dual_owner_samples() == 0
    assert lab.client_get() == "n2"


@pytest.fixture
def witness_segment() -> Iterator[ApLab]:
    segment = ApLab.create_segment(3)  # n3 is the witness
    try:
        yield segment
    finally:
        segment.close()


def test_a_witness_keeps_one_owner_through_a_heartbeat_cut_without_a_store(
    witness_segment: ApLab,
) -> None:
    """No store: n1 and n2 with a witness n3. Heartbeats between the two nodes are cut
    while both still reach the witness: n2 gets no majority, so n1 stays the only owner
    (without the witness both would own for the whole cut: the VRRP split brain). Then a
    kill of n1 moves the VIP to n2 once the votes for n1 have run out."""
    lab = witness_segment
    n1, n2, n3 = lab.nodes
    members: list[dict[str, object]] = [{"id": n.name, "address": n.address} for n in (n1, n2)]
    members.append({"id": n3.name, "address": n3.address, "witness": True})
    lab.start_witness(n3, members)
    lab.start_node(n1, lab.node_config(n1, 200, members=members))
    lab.wait_role(n1, "active", 20)
    lab.start_node(n2, lab.node_config(n2, 100, members=members))
    lab.wait_vip(n2, "reason", "peer_active", 20)
    # a starting member grants nobody for the hold (it may have, before a restart)
    wait_for(
        lambda: lab.vip_status(n1)["quorum"]["votes"] == {"n1": "n1", "n2": "n1", "n3": "n1"},
        10,
        what="every member voting for n1",
    )
    assert lab.vip_status(n1)["quorum"]["granted"]
    assert lab.client_get() == "n1"
    with Observer(lab) as observer:
        cut = time.monotonic()
        lab.cut_heartbeats(n1, peer=n2)
        lab.wait_vip(n2, "reason", "waiting_for_key", 10)  # no majority for it
        time.sleep(3.0)  # longer than the hold: the witness never moves its vote
        lab.heal_heartbeats(n1)
        lab.wait_vip(n2, "reason", "peer_active", 10)
    after_cut = [held for t, held in observer.samples if t >= cut]
    assert after_cut and all(held == frozenset({"n1"}) for held in after_cut)
    with Observer(lab) as observer:
        lab.signal_node(n1, signal.SIGKILL)
        lab.wait_role(n2, "active", 15)
        client_follows(lab, n2)
    assert observer.dual_owner_samples() == 0
    assert lab.client_get() == "n2"
    votes = lab.vip_status(n2)["quorum"]["votes"]
    assert (votes["n2"], votes["n3"]) == ("n2", "n2")


VIP6 = "2001:db8:2::100"


def _client_neigh6(lab: ApLab) -> str:
    """The client's IPv6 neighbour entry for VIP6: its link-layer address, or ''."""
    out = run("ip", "-6", "-n", lab.client_netns, "neigh", "show", VIP6).split()
    return out[out.index("lladdr") + 1] if "lladdr" in out else ""


def test_an_ipv6_vip_moves_with_an_unsolicited_neighbour_advertisement(
    bare_segment: ApLab,
) -> None:
    """An IPv6 VIP (without duplicate address detection: it moves by design): the client's
    neighbour entry follows the new owner by the override NA, without asking."""
    lab = bare_segment
    n1, n2 = lab.nodes
    client_dev = f"ae{lab.suffix}c"
    run("ip", "-6", "-n", lab.client_netns, "addr", "add", "2001:db8:2::50/64", "dev", client_dev, "nodad")  # fmt: skip
    for index, node in enumerate((n1, n2), 1):
        run("ip", "-6", "-n", node.netns, "addr", "add", f"2001:db8:2::{index}/64", "dev", node.veth, "nodad")  # fmt: skip
    lab.start_node(n1, lab.node_config(n1, 200, vip=f"{VIP6}/64"))
    lab.wait_role(n1, "active", 20)
    lab.start_node(n2, lab.node_config(n2, 100, vip=f"{VIP6}/64"))
    lab.wait_vip(n2, "reason", "peer_active", 20)
    addresses = run("ip", "-6", "-n", n1.netns, "addr", "show", "dev", n1.veth)
    assert VIP6 in addresses and "tentative" not in addresses and "dadfailed" not in addresses

    def poke() -> socket.socket:  # any datagram to the VIP makes the client resolve it
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.sendto(b"x", (VIP6, 9))
        return sock

    in_netns(lab.client_netns, poke).close()
    wait_for(lambda: _client_neigh6(lab) == n1.mac, 5, what="the client's entry on n1")
    lab.signal_node(n1, signal.SIGKILL)
    lab.wait_role(n2, "active")
    wait_for(lambda: _client_neigh6(lab) == n2.mac, 10, what="the client's entry on n2")
    # n2 put the VIP while the dead n1's copy was still there (its lifetime runs out 1 s
    # after): with duplicate address detection n2's would have failed it
    time.sleep(1.5)
    addresses = run("ip", "-6", "-n", n2.netns, "addr", "show", "dev", n2.veth)
    assert VIP6 in addresses and "tentative" not in addresses and "dadfailed" not in addresses


#: How a woken node steps down: it saw its own pause (rule 1), its silence past
#: 0.8 x guard_bound or the guard's word that it fired (rule 6), or its lease running out.
WOKEN_STEP_DOWN = frozenset({"woke_after_pause", "guard_fired", "lease_expiring"})
#: An owner that lets go for a cause of its own (a stall under load, its store, its
#: health), not because a peer claimed or outranked it.
OWN_CAUSES = WOKEN_STEP_DOWN | {"store_unreachable", "unhealthy", "isolated"}


def check_the_woken_node(
    lab: ApLab, observer: Observer, woken: Node, other: Node, woke_at: float, woke: float
) -> str:
    """What must hold once `woken` runs again after a freeze while `other` took over
    (`woke_at`: wall clock, `woke`: monotonic, at SIGCONT): its first transition is a step
    down for a reason of its own pause, never a keep or a claim on what it knew before; and
    it holds the VIP again only as a new election after `other` let go for a cause of its
    own. On a loaded host `other` may stall past its guard's bound in turn: its guard
    revokes its lease, it steps down, and the woken node rightly takes over by rank (the
    two records can come in either order: the stalled node writes its own late). Returns
    which of the two happened; a failure says which rule broke."""
    mine = [t for t in lab.vip_status(woken)["transitions"] if t["at"] >= woke_at]
    theirs = [t for t in lab.vip_status(other)["transitions"] if t["at"] >= woke_at]
    story = f"{woken.name} after waking: {mine}; {other.name}: {theirs}"
    assert mine, f"{woken.name} recorded no transition after waking: {story}"
    first = mine[0]
    assert first["role"] == "standby" and first["reason"] in WOKEN_STEP_DOWN, (
        f"SAFETY: {woken.name}'s first decision after waking was not a step down: {story}"
    )
    again = observer.first_time_held_by(woken.name, after=woke)
    claims = [t for t in mine if t["role"] == "active"]
    if again is None and not claims:
        return "kept off"
    assert claims, f"the observer saw {woken.name} hold the VIP but it never claimed: {story}"
    claim = claims[0]
    assert (claim["action"], claim["reason"]) == ("claim", "elected"), story
    let_go = [t for t in theirs if t["role"] == "standby"]
    assert let_go, (
        f"SAFETY: {woken.name} claimed again {claim['at'] - woke_at:.2f} s after waking while"
        f" {other.name} never let go (a claim on stale knowledge): {story}"
    )
    assert let_go[0]["reason"] in OWN_CAUSES, (
        f"SAFETY: {other.name} let go because of {woken.name} ({let_go[0]['reason']}), within"
        f" the preemption delay: {story}"
    )
    if again is not None:  # in the kernels: the other's VIP was gone first
        gone = observer.last_time_held_by(other.name, before=again)
        assert gone is None or gone < again, f"both held the VIP at {again}: {story}"
    return (
        f"{other.name} let go on its own ({let_go[0]['reason']}) and {woken.name} was"
        f" elected {claim['at'] - woke_at:.2f} s after waking (legitimate)"
    )


def test_freeze_moves_the_vip_and_the_woken_node_neither_keeps_nor_reclaims(lab: ApLab) -> None:
    """The whole node frozen, its VIP guard too (a host paused): nothing of it runs, the
    address goes by its kernel lifetime, the key by the lease's expiry, and n2 takes over.
    On waking it steps down before it answers, and does not claim again."""
    # a preemption delay longer than the test: a failback would be a legitimate election,
    # what must never happen is the woken node acting on what it knew before the freeze
    n1, n2 = start_pair(lab, preempt_delay=30)
    with Observer(lab) as observer:
        observer.wait_sees({"n1"})
        lab.signal_node(n1, signal.SIGSTOP, whole=True)
        lab.wait_role(n2, "active")
        client_follows(lab, n2)
        observer.wait_sees({"n2"})
        assert not lab.holds_vip(n1)
        woke, woke_at = time.monotonic(), time.time()
        lab.signal_node(n1, signal.SIGCONT, whole=True)
        lab.wait_role(n1, "standby")
        time.sleep(3.0)  # long enough for any wrong reclaim to show
        observer.wait_sampled_after(time.monotonic())
    outcome = check_the_woken_node(lab, observer, n1, n2, woke_at, woke)
    print("woken node:", outcome)
    assert observer.dual_owner_samples() == 0
    if outcome == "kept off":
        assert lab.vip_status(n2)["role"] == "active"
        assert lab.client_mac_for_vip() == n2.mac


def test_cut_heartbeats_with_the_store_reachable_leave_exactly_one_owner(lab: ApLab) -> None:
    """Heartbeats lost both ways (the data path and the store still work): the standby
    thinks the active is dead and asks for the key, which the active still holds."""
    n1, n2 = start_pair(lab)
    with Observer(lab) as observer:
        cut = time.monotonic()
        lab.cut_heartbeats(n1)
        lab.wait_vip(n2, "reason", "waiting_for_key", 10)
        time.sleep(3.0)
        lab.heal_heartbeats(n1)
        lab.wait_vip(n2, "reason", "peer_active", 10)
        time.sleep(0.5)
    after_cut = [held for t, held in observer.samples if t >= cut]
    assert after_cut and all(held == frozenset({"n1"}) for held in after_cut)
    assert lab.vip_status(n1)["role"] == "active"


def test_a_cut_link_makes_the_active_unhealthy_and_the_standby_takes_over(lab: ApLab) -> None:
    """The whole link of the active blackholed, carrier up (its backend unreachable too), no
    ARP monitor: it goes down by its own health checks, releases, and the standby claims;
    never two owners."""
    n1, n2 = start_pair(lab)
    with Observer(lab) as observer:
        lab.cut_link(n1)
        lab.wait_role(n2, "active")
        client_follows(lab, n2)
        lab.heal_link(n1)
        lab.wait_role(n1, "active", 20)  # failback once healthy (preemption)
        client_follows(lab, n1)
    assert observer.dual_owner_samples() == 0
    assert "unhealthy" in [t["reason"] for t in lab.vip_status(n1)["transitions"]]


def test_a_cut_link_isolates_the_active_by_its_arp_monitor(lab: ApLab) -> None:
    """With an ARP monitor on the gateway: the cut active hears neither the gateway nor its
    peer, steps down as isolated (before its health checks could say anything) and gives
    the key back; the standby, which still reaches the gateway, sees the key go through its
    watch and claims. The standby is not isolated meanwhile (it hears the gateway)."""
    lab.arp_monitor = True
    n1, n2 = start_pair(lab)
    with Observer(lab) as observer:
        cut_at = time.time()
        lab.cut_link(n1)
        lab.wait_role(n2, "active")
        client_follows(lab, n2)
        status = lab.vip_status(n1)
        assert status["arp_monitor"]["isolated"] is True
        assert lab.vip_status(n2)["arp_monitor"]["isolated"] is False
        lab.heal_link(n1)
        lab.wait_vip(n1, "eligible", True, 20)
        lab.wait_role(n1, "active", 20)  # failback (preemption)
        client_follows(lab, n1)
    assert observer.dual_owner_samples() == 0
    after_cut = [t for t in lab.vip_status(n1)["transitions"] if t["at"] >= cut_at]
    assert (after_cut[0]["action"], after_cut[0]["reason"]) == ("release", "isolated")
    assert lab.vip_status(n1)["arp_monitor"]["answered"] > 0


def test_a_node_cut_from_the_store_steps_down_before_its_lease_can_expire(lab: ApLab) -> None:
    n1, n2 = start_pair(lab)
    with Observer(lab) as observer:
        observer.wait_sees({"n1"})  # a loaded host can start the sampler late
        cut = time.monotonic()
        lab.cut_store(n1)
        lab.wait_role(n2, "active", 15)
        client_follows(lab, n2)
        observer.wait_sees({"n2"})  # and have it lag the node's own report
    released = observer.last_time_held_by("n1", before=time.monotonic())
    claimed = observer.first_time_held_by("n2", after=cut)
    assert released is not None and claimed is not None
    # n2 got the key only once etcd expired n1's lease: n1 had let go before that
    assert released < claimed
    assert observer.dual_owner_samples() == 0
    status = lab.vip_status(n1)
    assert status["role"] == "standby"
    assert "lease_expiring" in [t["reason"] for t in status["transitions"]]
    assert lab.status(n1)["state"] == str(NodeState.DEGRADED)  # says why, keeps serving


def _capture_heartbeat(lab: ApLab, into: Node, sender: Node, timeout: float = 5.0) -> bytes:
    """One genuine heartbeat from `sender`, as it arrived on `into`'s interface."""

    def make() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
        s.bind((into.veth, 0))
        s.settimeout(0.5)
        return s

    raw = in_netns(into.netns, make)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                frame = raw.recv(2048)
            except TimeoutError:
                continue
            ip = frame[14:]
            header = (ip[0] & 0x0F) * 4
            source = socket.inet_ntoa(ip[12:16])
            if ip[9] != 17 or source != sender.address:
                continue
            _, port = struct.unpack("!HH", ip[header : header + 4])
            if port == 5405:
                return bytes(ip[header + 8 :])
    finally:
        raw.close()
    raise TimeoutError("no heartbeat captured")


def _send_from(lab: ApLab, netns: str, source: str, target: str, packets: list[bytes]) -> None:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((source, 0))
        return s

    sock = in_netns(netns, make)
    try:
        for packet in packets:
            sock.sendto(packet, (target, 5405))
            time.sleep(0.002)
    finally:
        sock.close()


def test_forged_and_replayed_heartbeats_are_ignored(lab: ApLab) -> None:
    n1, n2 = start_pair(lab)
    captured = _capture_heartbeat(lab, n1, n2)
    before = lab.vip_status(n1)
    refused_before = before["heartbeats_refused"]
    takeover = Heartbeat(
        node_id="n2",
        group="g1",
        priority=254,
        health=NodeState.HEALTHY,
        active=True,
        eligible=True,
        term=99,
        token=0,
        counter=time.time_ns(),
    )
    wrong_key = encode(takeover, b"not-the-group-key-but-32-bytes!!")
    tampered = bytearray(captured)
    tampered[6] = 254  # priority, under the genuine MAC
    with Observer(lab) as observer:
        _send_from(lab, n2.netns, n2.address, n1.address, [captured] * 20)  # replays
        _send_from(lab, n2.netns, n2.address, n1.address, [wrong_key, bytes(tampered)] * 20)
        # the right key from the wrong host: refused by the member's address
        right_key_wrong_host = encode(takeover, lab.key.encode())
        _send_from(lab, lab.client_netns, "198.18.2.50", n1.address, [right_key_wrong_host] * 20)
        _send_from(lab, lab.client_netns, "198.18.2.50", n1.address, [b"\x00" * 100] * 20)
        time.sleep(0.5)
    after = lab.vip_status(n1)
    refused = {k: v - refused_before.get(k, 0) for k, v in after["heartbeats_refused"].items()}
    assert refused.get("replay", 0) + refused.get("stale", 0) >= 20
    assert refused.get("bad_mac", 0) >= 40
    assert refused.get("unknown_sender", 0) >= 20
    assert refused.get("bad_magic", 0) >= 20
    # the victim's view: nothing moved
    assert after["role"] == "active" and after["transitions"] == before["transitions"]
    assert lab.vip_status(n2)["role"] == "standby"
    assert observer.holders_now() == frozenset({"n1"}) and observer.dual_owner_samples() == 0
    assert lab.client_mac_for_vip() == n1.mac


def test_failback_announces_and_every_client_follows(lab: ApLab) -> None:
    n1, n2 = start_pair(lab)
    lab.signal_node(n1, signal.SIGKILL)
    lab.wait_role(n2, "active")
    client_follows(lab, n2)
    with Observer(lab) as observer, ClientLoop(lab) as client:
        lab.start_node(n1, lab.node_config(n1, 200, etcd=lab.etcd_urls))
        lab.wait_role(n1, "active", 20)
        client_follows(lab, n1, 5)
        client.wait_served_by("n1")
    # a request in flight at the very instant of the handover can be lost: its socket is on
    # the node that let go (nothing moves established connections on one L2 segment)
    assert len(client.failures) <= 1, client.failures
    assert "n2" in client.served and client.served[-1] == "n1"
    assert observer.dual_owner_samples() == 0
    reasons = [t["reason"] for t in lab.vip_status(n2)["transitions"]]
    assert "preempted" in reasons


def test_unfenced_kill_fails_over_and_the_dead_nodes_address_goes_by_itself(
    bare_segment: ApLab,
) -> None:
    lab = bare_segment
    n1, n2 = start_pair(lab, fenced=False)
    lab.signal_node(n1, signal.SIGKILL)
    lab.wait_role(n2, "active")
    client_follows(lab, n2)
    wait_for(lambda: not lab.holds_vip(n1), 5, what="the dead node's address to expire")
    assert lab.client_get() == "n2"


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"vip": "198.18.3.100/24"}, "outside the subnets"),
        ({"key": "short"}, "at least 32 bytes"),
        ({"key": None}, "exactly one of key"),
        ({"priority": 255}, "vip_group.priority"),
        (
            {
                "members": [
                    {"id": "n1", "address": "198.18.2.1"},
                    {"id": "n1", "address": "198.18.2.2"},
                ]
            },
            "duplicate node id",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line_and_claims_nothing(
    bare_segment: ApLab, change: dict[str, object], words: str
) -> None:
    lab = bare_segment
    n1 = lab.nodes[0]
    config = lab.node_config(n1, 200)
    config["vip_group"].update(change)
    config["vip_group"] = {k: v for k, v in config["vip_group"].items() if v is not None}
    result = lab.run_node_once(n1, config)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in result.stderr
    assert not lab.holds_vip(n1)


# -- randomized fault injections, fixed seed, bounded ----------------------------------

FAULTS = ("kill", "freeze", "cut_link", "cut_heartbeats", "cut_store")


def _owner(lab: ApLab) -> Node | None:
    held = [n for n in lab.nodes if lab.holds_vip(n)]
    return held[0] if len(held) == 1 else None


def _wait_owner(lab: ApLab, timeout: float = 20.0) -> Node:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (owner := _owner(lab)) is not None:
            return owner
        time.sleep(0.05)
    views = []
    for node in lab.nodes:
        try:
            v = lab.vip_status(node)
            views.append(f"{node.name}: {v['role']} {v['reason']} {v['fencing']} {v['peers']}")
        except (OSError, ValueError, KeyError) as error:
            views.append(f"{node.name}: {error!r}")
    raise TimeoutError(f"no single owner: {views}")


@pytest.mark.timeout(420)
def test_randomized_faults_never_show_two_owners(lab: ApLab) -> None:
    """At least 50 injections (the issue), fixed seed, bounded: the loop stops at the time
    budget and the test then fails if fewer than 50 were done."""
    rng = random.Random(14)
    injections = int(os.environ.get("VIP_CHAOS_INJECTIONS", "50"))
    budget_s = float(os.environ.get("VIP_CHAOS_BUDGET_S", "300"))
    lab.arp_monitor = True
    start_pair(lab)
    done: list[str] = []
    started: list[float] = []  # when each injection began
    began = time.monotonic()
    with Observer(lab, arp=True) as observer:
        for _ in range(injections):
            if time.monotonic() - began > budget_s:
                break
            owner = _wait_owner(lab)
            victim = owner if rng.random() < 0.8 else rng.choice(lab.nodes)
            fault = rng.choice(FAULTS)
            hold = rng.uniform(0.2, 1.5)
            done.append(f"{fault} {victim.name} {hold:.1f}s")
            started.append(time.monotonic())
            if fault == "kill":
                lab.signal_node(victim, signal.SIGKILL)
                time.sleep(hold)
                priority = 200 if victim.name == "n1" else 100
                lab.start_node(victim, lab.node_config(victim, priority, etcd=lab.etcd_urls))
            elif fault == "freeze":
                lab.signal_node(victim, signal.SIGSTOP)
                time.sleep(hold)
                lab.signal_node(victim, signal.SIGCONT)
            elif fault == "cut_link":
                lab.cut_link(victim)
                time.sleep(hold)
                lab.heal_link(victim)
            elif fault == "cut_heartbeats":
                lab.cut_heartbeats(victim)
                time.sleep(hold)
                lab.heal_heartbeats(victim)
            else:
                lab.cut_store(victim)
                time.sleep(hold)
                lab.heal_store(victim)
            for node in lab.nodes:  # everyone back and talking before the next fault
                lab.wait_vip(node, "eligible", True, 20)
    print(f"{len(done)} fault injections in {time.monotonic() - began:.0f} s:", ", ".join(done))
    assert len(done) >= injections, f"only {len(done)} injections within {budget_s:.0f} s"
    # Which injection each two-owner sample fell in, and how far into it.
    injection = [max(bisect.bisect_right(started, t) - 1, 0) for t in observer.dual_times]
    during = [
        f"{done[i]} +{t - started[i]:.2f}s"
        for i, t in zip(injection, observer.dual_times, strict=True)
    ]
    if observer.dual_owner_samples():
        print(observer.logs_around_dual())  # what each node said around it
    assert observer.dual_owner_samples() == 0, (during, done)
    assert observer.dual_arp_answers() == 0, done
    assert len(observer.samples) > 100 * (time.monotonic() - began) * 0.3  # it did sample
    assert sum(1 for macs in observer.arp_answers if macs) > len(observer.arp_answers) / 2


def test_the_observer_sees_two_owners_when_there_are_two(bare_segment: ApLab) -> None:
    """The observer can fail: two addresses put there by hand are counted, in the kernels
    and in the ARP answers the client gets."""
    lab = bare_segment
    from tests.support.procs import run

    with Observer(lab, arp=True) as observer:
        for node in lab.nodes:
            run("ip", "-n", node.netns, "addr", "add", f"{VIP}/24", "dev", node.veth)
        time.sleep(0.3)
    assert observer.dual_owner_samples() > 5
    assert observer.dual_arp_answers() > 5


def test_sticky_clients_keep_their_backend_across_a_failover(
    request: pytest.FixtureRequest,
) -> None:
    """maglev on a header: both nodes compute the same table from the same backends."""
    cluster = request.getfixturevalue("etcd_cluster")
    lab = ApLab.create_segment(2, cluster.client_urls, backends=3, sticky_header="X-Key")
    try:
        n1, n2 = start_pair(lab)
        keys = [f"client-{i}" for i in range(60)]
        before = {key: lab.client_get_backend(key) for key in keys}
        assert len(set(before.values())) == 3
        lab.signal_node(n1, signal.SIGKILL)
        lab.wait_role(n2, "active")
        client_follows(lab, n2)
        after = {key: lab.client_get_backend(key) for key in keys}
        assert lab.client_get() == "n2"
        assert after == before
    finally:
        lab.close()


def test_sticky_clients_of_round_robin_keep_their_backend_through_the_session_table(
    request: pytest.FixtureRequest,
) -> None:
    """round_robin with `pool.sticky`: a key's backend is whatever the active's turn gave
    it, known only to the active's table; the heartbeats carry it to the standby, whose
    pool then gives every key its backend after a kill. (Without the table the standby's
    own turns would move about two keys in three.)"""
    cluster = request.getfixturevalue("etcd_cluster")
    lab = ApLab.create_segment(
        2, cluster.client_urls, backends=3, sticky_header="X-Key", sticky_algorithm="round_robin"
    )
    try:
        n1, n2 = start_pair(lab)
        keys = [f"client-{i}" for i in range(60)]
        before = {key: lab.client_get_backend(key) for key in keys}
        assert len(set(before.values())) == 3
        # a second round on the active: the table, not the turn, answers
        assert {key: lab.client_get_backend(key) for key in keys} == before
        wait_for(lambda: lab.vip_status(n2)["sessions"] >= len(keys), 10, what="table on n2")
        lab.signal_node(n1, signal.SIGKILL)
        lab.wait_role(n2, "active")
        client_follows(lab, n2)
        after = {key: lab.client_get_backend(key) for key in keys}
        assert lab.client_get() == "n2"
        assert after == before
    finally:
        lab.close()


_SESSION_PEER = """
import asyncio, json, sys
from edge.config import VipGroupConfig
from edge.state import NodeState
from edge.vip.extension import VipExtension
from edge.vip.sessions import SessionTable

config = VipGroupConfig.model_validate(json.loads(sys.argv[1]))
async def main():
    table = SessionTable()
    for i in range(int(sys.argv[2])):
        table.record(f"198.18.2.50:{10000 + i}", f"backend-{i % 3}")
    vip = VipExtension(config, config.node_id, lambda: NodeState.HEALTHY, sessions=table)
    await vip.start()
    try:
        for _ in range(150):
            await asyncio.sleep(0.1)
            status = vip.status()
            print(json.dumps({"role": status["role"], "sessions": status["sessions"]}), flush=True)
    finally:
        await vip.stop()
asyncio.run(main())
"""


def test_the_session_table_reaches_the_standby_through_real_heartbeats(
    bare_segment: ApLab,
) -> None:
    import json
    import subprocess
    import sys

    lab = bare_segment
    procs = []
    for node, priority, count in ((lab.nodes[0], 200, 1000), (lab.nodes[1], 100, 0)):
        group = lab.node_config(node, priority)["vip_group"]
        command = ["ip", "netns", "exec", node.netns, sys.executable, "-c", _SESSION_PEER]
        procs.append(lab.spawn([*command, json.dumps(group), str(count)], stdout=subprocess.PIPE))
    standby = procs[1]

    def reports() -> Iterator[dict[str, object]]:
        assert standby.stdout is not None
        for line in standby.stdout:  # log lines (stderr) are interleaved: skip them
            if line.startswith(b"{"):
                yield json.loads(line)

    seen: dict[str, object] = {}
    for seen in reports():
        if seen["sessions"] == 1000:
            break
    assert seen == {"role": "standby", "sessions": 1000}
    procs[0].kill()  # the active dies: the standby owns the VIP and the table
    for seen in reports():
        if seen["role"] == "active":
            break
    assert seen == {"role": "active", "sessions": 1000}


def test_sigterm_hands_the_vip_over_before_listeners_close(lab: ApLab) -> None:
    """A drain: the active lets go, the standby takes key and VIP, then the old active stops
    accepting and exits; a client sending requests all along follows, losing at most the
    one request in flight at the handover."""
    n1, n2 = start_pair(lab)
    with Observer(lab) as observer, ClientLoop(lab) as client:
        time.sleep(0.3)
        assert n1.process is not None
        n1.process.send_signal(signal.SIGTERM)
        assert n1.process.wait(timeout=30) == 0
        lab.wait_role(n2, "active")
        client.wait_served_by("n2")
    # a request in flight at the very instant of the handover can be lost: its socket is on
    # the node that let go (nothing moves established connections on one L2 segment)
    assert len(client.failures) <= 1, client.failures
    assert observer.dual_owner_samples() == 0
    assert not lab.holds_vip(n1)


def test_a_vip_left_on_the_interface_is_removed_at_start(lab: ApLab) -> None:
    """After a crash (or by hand) the address is there, forever: the next start removes it
    before it owns anything, and a standby never keeps one it finds."""
    from tests.support.procs import run

    n1, n2 = lab.nodes
    # preemption is decided by the active (it yields): no failback within the test
    lab.start_node(n2, lab.node_config(n2, 100, etcd=lab.etcd_urls, preempt_delay=30))
    lab.wait_role(n2, "active", 20)
    run("ip", "-n", n1.netns, "addr", "add", f"{VIP}/24", "dev", n1.veth)  # permanent
    with Observer(lab) as observer:
        lab.start_node(n1, lab.node_config(n1, 200, etcd=lab.etcd_urls, preempt_delay=30))
        lab.wait_vip(n1, "reason", "peer_active", 20)
        assert lab.vip_status(n1)["crash_leftover_removed"] is True
        run("ip", "-n", n1.netns, "addr", "add", f"{VIP}/24", "dev", n1.veth)  # again
        wait_for(lambda: not lab.holds_vip(n1), 2, what="the standby to drop a stray VIP")
    first_seen = observer.samples[0][0]
    assert observer.last_time_held_by("n1", before=first_seen + 60) is not None  # it was there
    assert lab.vip_status(n2)["role"] == "active" and not lab.holds_vip(n1)


def test_kill_9_the_guard_removes_the_vip_and_frees_the_key_at_once(lab: ApLab) -> None:
    """The agent is killed alone: its guard (a process of its own) sees the pipe close,
    removes the VIP from the kernel and revokes the lease, before the address lifetime
    (>= 1 s) or the lease (2 s) could have ended it."""
    n1, n2 = start_pair(lab)
    with Observer(lab) as observer:
        observer.wait_sees({"n1"})
        killed = time.monotonic()
        lab.signal_node(n1, signal.SIGKILL)
        lab.wait_role(n2, "active")
        client_follows(lab, n2)
        observer.wait_sees({"n2"})
    gone = observer.last_time_held_by("n1", before=time.monotonic())
    taken = observer.first_time_held_by("n2", after=killed)
    assert gone is not None and taken is not None and gone < taken
    # the kernel lifetime could not have removed it this early: the guard did
    assert gone - killed < 0.9, f"n1 held the VIP {gone - killed:.3f} s after the kill"
    assert observer.dual_owner_samples() == 0
    assert n1.log is not None
    assert "vip guard: fired (agent_gone" in n1.log.read_text(errors="replace")
    assert "revoked" in n1.log.read_text(errors="replace")
    fencing = lab.vip_status(n2)["fencing"]
    assert fencing["holds_key"]
    # the standby followed the key with its watch: the revoke reached it as an event
    assert fencing["watching"] and fencing["watch_events"] >= 2


def test_sigstop_of_the_agent_alone_the_guard_fires_and_the_woken_agent_reelects(
    lab: ApLab,
) -> None:
    n1, n2 = start_pair(lab, preempt_delay=30)
    with Observer(lab) as observer:
        observer.wait_sees({"n1"})
        frozen = time.monotonic()
        lab.signal_node(n1, signal.SIGSTOP)  # the agent's pid only, not its guard
        lab.wait_role(n2, "active")
        client_follows(lab, n2)
        observer.wait_sees({"n2"})
        gone = observer.last_time_held_by("n1", before=time.monotonic())
        assert gone is not None and gone - frozen < 0.9  # the guard, not the lifetime
        woke, woke_at = time.monotonic(), time.time()
        lab.signal_node(n1, signal.SIGCONT)
        lab.wait_role(n1, "standby")
        time.sleep(2.0)  # long enough for any wrong reclaim to show
        observer.wait_sampled_after(time.monotonic())
    outcome = check_the_woken_node(lab, observer, n1, n2, woke_at, woke)
    print("woken node:", outcome)
    assert observer.dual_owner_samples() == 0
    status = lab.vip_status(n1)
    assert status["guard"]["fired_total"] >= 1 and not status["guard"]["lost"]
    assert "guard_fired" in [t["reason"] for t in status["transitions"]]
    if outcome == "kept off":
        assert lab.vip_status(n2)["role"] == "active"
