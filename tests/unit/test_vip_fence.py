"""EtcdFence against a scripted store and a fake clock: the lease a key is taken with.

A standby keeps a lease of its own alive and takes the key on it in one round trip. The
key must be taken with a lease as fresh as the txn: with the default TTL (2 s) and margin
(1.4 s) an owner keeps the VIP only while more than the margin is left, so a lease kept
alive up to LEASE_FRESH_S (0.4 s) earlier left a new owner 0.2 s, less than one renewal
period, and it let go ~0.25 s after its claim (LEASE_EXPIRING, seen in the netns tests).
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from edge.vip import fence as fence_module
from edge.vip.election import MIN_LEASE_MARGIN_S, Action, Election, ElectionConfig, Reason
from edge.vip.fence import EtcdFence, EtcdLeaseClient, FenceUnavailable

TTL = 2
KEY = "/t/g1/owner"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class ScriptedStore:
    """Answers the fence's calls as one etcd would; each call advances the clock by the
    round trip. `fail` names paths that get no answer."""

    def __init__(self, clock: Clock, rtt: float = 0.01) -> None:
        self.clock, self.rtt = clock, rtt
        self.revision = 10
        self.leases: dict[int, float] = {}  # id -> expiry (store time = the fake clock)
        self.key: dict[str, Any] | None = None
        self.calls: list[str] = []
        self.fail: set[str] = set()
        self.gates: dict[str, asyncio.Event] = {}  # calls on these paths wait for the event

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(path)
        await asyncio.sleep(0)  # in flight: another call may start meanwhile
        if path in self.gates:
            await self.gates[path].wait()
        self.clock.now += self.rtt / 2  # the store handles it half way
        if path in self.fail:
            raise FenceUnavailable(f"{path}: timeout")
        header = {"revision": str(self.revision)}
        try:
            if path == "/v3/lease/grant":
                lease = 1000 + len(self.leases)
                self.leases[lease] = self.clock.now + TTL
                return {"header": header, "ID": str(lease), "TTL": str(TTL)}
            if path == "/v3/lease/keepalive":
                lease = int(body["ID"])
                if self.leases.get(lease, 0) <= self.clock.now:
                    return {"result": {"ID": str(lease)}}  # expired: no TTL
                self.leases[lease] = self.clock.now + TTL
                return {"result": {"ID": str(lease), "TTL": str(TTL)}}
            if path == "/v3/kv/range":
                return {"header": header, "kvs": [self.key] if self.key else []}
            if path == "/v3/lease/revoke":
                lease = int(body["ID"])
                self.leases.pop(lease, None)
                if self.key is not None and int(self.key["lease"]) == lease:
                    self.key = None
                    self.revision += 1
                return {"header": header}
            if path == "/v3/kv/txn" and "request_delete_range" in body["success"][0]:
                wanted = int(body["compare"][0]["mod_revision"])
                if self.key is not None and int(self.key["mod_revision"]) == wanted:
                    self.key = None
                    self.revision += 1
                    return {"header": {"revision": str(self.revision)}, "succeeded": True}
                return {"header": header, "succeeded": False}
            if path == "/v3/kv/txn":
                if self.key is None:
                    self.revision += 1
                    put = body["success"][0]["request_put"]
                    self.key = {
                        "key": put["key"],
                        "value": put["value"],
                        "mod_revision": str(self.revision),
                        "lease": put["lease"],
                    }
                    return {"header": {"revision": str(self.revision)}, "succeeded": True}
                ranged = {"response_range": {"kvs": [self.key]}}
                return {"header": header, "succeeded": False, "responses": [ranged]}
            raise AssertionError(f"unexpected call {path}")
        finally:
            self.clock.now += self.rtt / 2


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(fence_module.time, "monotonic", fake)
    return fake


def make(store: ScriptedStore) -> EtcdFence:
    return EtcdFence(cast(EtcdLeaseClient, store), KEY, "n2", TTL)


async def test_a_key_is_taken_with_a_lease_as_fresh_as_the_txn(clock: Clock) -> None:
    store = ScriptedStore(clock)
    fence = make(store)
    await fence.update(want_key=False)  # a standby: a lease of its own, kept alive
    assert fence.lease_id and not fence.view.holds
    clock.now += fence_module.LEASE_FRESH_S - 0.05  # kept, but not just now
    store.calls.clear()
    sent = clock.now
    view = await fence.update(want_key=True)
    assert view.holds and view.token == store.revision
    # one round trip: the txn, with the keep-alive alongside it (no grant, no range first)
    assert sorted(store.calls) == ["/v3/kv/txn", "/v3/lease/keepalive"]
    # the deadline counts from this keep-alive's send, not from the earlier one ...
    assert view.lease_deadline >= sent + TTL
    # ... so a new owner has the whole TTL minus the margin before it must let go
    assert view.lease_deadline - clock.now > TTL - MIN_LEASE_MARGIN_S - 0.05
    # and it is conservative: the store's lease outlives it
    assert store.leases[fence.lease_id] >= view.lease_deadline


async def test_a_keepalive_lost_beside_the_txn_leaves_the_older_deadline(clock: Clock) -> None:
    store = ScriptedStore(clock)
    fence = make(store)
    await fence.update(want_key=False)
    kept_until = store.leases[fence.lease_id]
    clock.now += 0.2
    store.fail.add("/v3/lease/keepalive")
    view = await fence.update(want_key=True)
    assert view.holds  # the txn decides
    assert view.lease_deadline <= kept_until  # never later than what the store granted


async def test_a_lease_not_kept_recently_is_renewed_before_the_txn(clock: Clock) -> None:
    store = ScriptedStore(clock)
    fence = make(store)
    await fence.update(want_key=False)
    clock.now += fence_module.LEASE_FRESH_S + 0.1
    store.calls.clear()
    sent = clock.now
    view = await fence.update(want_key=True)
    assert store.calls == ["/v3/lease/keepalive", "/v3/kv/txn"]
    assert view.holds and view.lease_deadline == pytest.approx(sent + TTL)


async def test_a_held_key_is_not_taken_and_the_lease_stays_kept(clock: Clock) -> None:
    store = ScriptedStore(clock)
    other = make(store)
    await other.update(want_key=True)
    assert other.view.holds
    fence = EtcdFence(cast(EtcdLeaseClient, store), KEY, "n1", TTL)
    await fence.update(want_key=False)
    clock.now += 0.1
    view = await fence.update(want_key=True)
    assert not view.holds and fence.owner == "n2"
    assert view.key_token == other.view.token


async def test_no_claim_on_a_key_that_is_being_given_back(clock: Clock) -> None:
    """The election is told "not held" the moment a release begins, before its txn leaves:
    a step taken while the txn is in flight (the fence loop and the election run side by
    side) must not claim on the key that the store is about to hand to a peer. Before, the
    election kept the view of the last finished round (held, a fresh lease) until the
    release returned, and a node that let go and was at once elected again (healthy again,
    the higher peer gone) put the VIP back while a peer took the key: two owners, and a
    long overlap when that node then froze (the randomized netns test)."""
    store = ScriptedStore(clock)
    election = Election(ElectionConfig("n2", 100, fenced=True))
    fence = EtcdFence(cast(EtcdLeaseClient, store), KEY, "n2", TTL, on_view=election.fence_changed)

    async def fence_round(want: bool) -> None:  # what the extension's fence loop does
        election.fence_changed(await fence.update(want))

    await fence_round(False)
    assert election.step(clock.now, True).reason is Reason.LISTENING
    for _ in range(4):  # a tick every advert interval until the dead interval is out
        clock.now += 0.1
        decision = election.step(clock.now, True)
    assert decision.reason is Reason.WAITING_FOR_KEY
    await fence_round(True)
    assert election.step(clock.now, True).action is Action.CLAIM
    released = election.step(clock.now, False)  # unhealthy for a moment
    assert released.action is Action.RELEASE and not released.want_key
    gate = store.gates["/v3/kv/txn"] = asyncio.Event()
    giving_back = asyncio.ensure_future(fence_round(False))
    for _ in range(3):
        await asyncio.sleep(0)
    assert store.calls[-1] == "/v3/kv/txn" and not giving_back.done()  # in flight
    again = election.step(clock.now + 0.01, True)  # healthy again, nobody else claims
    assert again.action is Action.STANDBY and again.reason is Reason.WAITING_FOR_KEY
    gate.set()
    await giving_back
    assert store.key is None and not fence.view.holds
