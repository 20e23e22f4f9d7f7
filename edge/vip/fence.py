"""Fencing for an active-passive group: a lease-backed ownership key in etcd.

The key's mod revision when this node wrote it is the fencing token. The node keeps a
*conservative* lease deadline: the monotonic time at which it *sent* the last successful
grant or keep-alive, plus the TTL etcd answered. etcd counts the TTL from when it handled
the request (later), and a new etcd leader extends every lease, so the lease is alive in
the store at least until that deadline. The election releases the VIP a margin before it.

Why its own small client rather than the API's `EtcdGateway`: a fencing call must give up
inside one renewal period (a fraction of the lease), one attempt per endpoint, whereas the
API's gateway retries for seconds by design; and `edge` may not import `api` (import-linter
layers). The wire is the same: etcd's v3 JSON gateway over httpx (docs/design/etcd-client.md).

Besides its own key, the fence reports what the store showed of the ownership key and at
which revision (`FenceView.seen_revision`, `key_token`): every read, txn and the watch
(`watch()`: a v3 watch on the key, streamed) feed it, never backwards. That is what lets a
standby see within milliseconds that the active's key is gone (its guard revoked the lease,
it gave it back) and stop waiting out the dead interval (election rule 7).

The election holds a copy of the view, and it is told each new one the moment the fence
takes it (`on_view`): `release()` sets "not held" before its txn leaves. Were the copy
refreshed only when a round returned, a step taken while a release is in flight would
still see the key held with a fresh lease, and could claim on it just as the store hands
it to a peer.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx

from edge.vip.election import FenceView

log = logging.getLogger("edge.vip")
WATCH_RETRY_S = 0.2
#: A standby keeps a lease of its own alive (no key on it): acquiring then takes one round
#: trip, not a grant first, while its last keep-alive left at least the TTL minus this. The
#: txn goes out with a keep-alive of that lease alongside it: the key is taken with a lease
#: as fresh as the txn, not up to this much older (with the default 2 s TTL and 1.4 s
#: margin, an owner would keep only 0.2 s before LEASE_EXPIRING, less than one renewal
#: period: a new owner let go ~0.25 s after its claim).
LEASE_FRESH_S = 0.4


class FenceUnavailable(Exception):
    """No endpoint answered within the budget."""


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


class EtcdLeaseClient:
    """One attempt per endpoint, sticky on the last one that answered."""

    def __init__(self, endpoints: Sequence[str], request_timeout_s: float) -> None:
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self._current = 0
        self.request_timeout_s = request_timeout_s
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(request_timeout_s))
        # the watch stream: no read timeout (an idle key sends nothing)
        self._stream = httpx.AsyncClient(timeout=httpx.Timeout(request_timeout_s, read=None))

    async def close(self) -> None:
        await self._http.aclose()
        await self._stream.aclose()

    def stream(
        self, path: str, body: dict[str, Any]
    ) -> AbstractAsyncContextManager[httpx.Response]:
        """A streamed POST to the endpoint that answered last (a watch)."""
        return self._stream.stream("POST", self.endpoints[self._current] + path, json=body)

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        errors = []
        for attempt in range(len(self.endpoints)):
            index = (self._current + attempt) % len(self.endpoints)
            endpoint = self.endpoints[index]
            try:
                response = await self._http.post(endpoint + path, json=body)
            except httpx.HTTPError as error:
                errors.append(f"{endpoint}: {type(error).__name__}")
                continue
            if response.status_code == 200:
                self._current = index
                reply: dict[str, Any] = response.json()
                return reply
            errors.append(f"{endpoint}: HTTP {response.status_code}")
        raise FenceUnavailable("; ".join(errors))


class EtcdFence:
    """Holds, renews and gives back the group's ownership key."""

    def __init__(
        self,
        client: EtcdLeaseClient,
        key: str,
        node_id: str,
        lease_ttl_s: int,
        on_view: Callable[[FenceView], None] | None = None,
    ) -> None:
        """`on_view`: told every new view at once, before the next call goes out (the
        election's copy of it must never say "holds" once a release has begun)."""
        self.client = client
        self.on_view = on_view
        self.key = key
        self.node_id = node_id
        self.lease_ttl_s = lease_ttl_s
        self.lease_id = 0
        self._lease_deadline = 0.0  # conservative, of lease_id (held key or not)
        self._view = FenceView(reachable=False)
        self.owner: str | None = None  # who holds the key, as last read
        self.last_error: str | None = None
        # what the store showed of the key, true at seen_revision (0: never seen)
        self.seen_revision = 0
        self.key_token = 0
        self.watching = False  # a watch stream is open
        self.watch_events = 0

    @property
    def view(self) -> FenceView:
        return dataclasses.replace(
            self._view, seen_revision=self.seen_revision, key_token=self.key_token
        )

    @view.setter
    def view(self, view: FenceView) -> None:
        self._view = view
        if self.on_view is not None:
            self.on_view(self.view)

    def observe(self, revision: int, kv: dict[str, Any] | None) -> bool:
        """The key as the store showed it at `revision` (kv None: no key). True when that
        changed what is known (never goes back to an older revision)."""
        if revision < self.seen_revision:
            return False
        token = int(kv.get("mod_revision", 0)) if kv else 0
        changed = token != self.key_token
        self.seen_revision, self.key_token = revision, token
        self.owner = base64.b64decode(kv.get("value", "")).decode() if kv else None
        return changed

    def _observe_reply(self, reply: dict[str, Any], kvs: list[dict[str, Any]]) -> None:
        revision = int(reply.get("header", {}).get("revision", 0))
        if revision:
            self.observe(revision, kvs[0] if kvs else None)

    async def update(self, want_key: bool) -> FenceView:
        """One round: renew or acquire when wanted, give back when not."""
        try:
            if self.view.holds and not want_key:
                await self.release()
            elif self.view.holds:
                await self._renew()
            elif want_key:
                await self._acquire()
            else:
                await self._keepalive_or_grant()  # ready for a claim: one txn away
                kv = await self._read_owner()
                if kv is not None and self._on_our_lease(kv):
                    # a txn of ours that succeeded while its answer was lost (a cut): the
                    # key would live as long as this standby's lease; give it back
                    await self.release_lease()
                self.view = FenceView(reachable=True)
            self.last_error = None
        except (FenceUnavailable, KeyError, ValueError) as error:
            self.last_error = str(error) or type(error).__name__
            v = self.view
            self.view = FenceView(False, v.holds, v.token, v.lease_deadline)
        return self.view

    async def _keepalive_or_grant(self) -> float:
        """A live lease; returns its conservative deadline."""
        sent = time.monotonic()
        if self.lease_id:
            reply = await self.client.call("/v3/lease/keepalive", {"ID": str(self.lease_id)})
            ttl = int(reply.get("result", {}).get("TTL", 0))
            if ttl > 0:
                self._lease_deadline = sent + ttl
                return self._lease_deadline
        sent = time.monotonic()
        reply = await self.client.call("/v3/lease/grant", {"TTL": str(self.lease_ttl_s)})
        self.lease_id = int(reply["ID"])
        self._lease_deadline = sent + int(reply["TTL"])
        return self._lease_deadline

    def _lease_kept(self) -> bool:
        """The standby's lease was kept alive recently (it cannot have expired since)."""
        left = self._lease_deadline - time.monotonic()
        return bool(self.lease_id) and left >= self.lease_ttl_s - LEASE_FRESH_S

    async def _keepalive_alongside(self) -> float | None:
        """A keep-alive of the kept lease sent alongside a txn on it: its new conservative
        deadline, or None (no answer, no TTL: the txn's own outcome decides, and the
        deadline stays what the last keep-alive gave)."""
        lease, sent = self.lease_id, time.monotonic()
        try:
            reply = await self.client.call("/v3/lease/keepalive", {"ID": str(lease)})
        except FenceUnavailable:
            return None
        ttl = int(reply.get("result", {}).get("TTL", 0))
        if ttl <= 0 or lease != self.lease_id:
            return None
        self._lease_deadline = max(self._lease_deadline, sent + ttl)
        return self._lease_deadline

    async def _renew(self) -> None:
        deadline = await self._keepalive_or_grant()
        token = self.view.token
        reply = await self.client.call("/v3/kv/range", {"key": _b64(self.key)})
        kvs = reply.get("kvs", [])
        self._observe_reply(reply, kvs)
        mine = (
            bool(kvs)
            and int(kvs[0].get("mod_revision", 0)) == token
            and int(kvs[0].get("lease", 0)) == self.lease_id
        )
        self.owner = base64.b64decode(kvs[0].get("value", "")).decode() if kvs else None
        if mine:
            self.view = FenceView(True, True, token, deadline)
        else:  # the lease expired (a pause) or someone deleted the key: not ours any more
            self.view = FenceView(True)

    async def _acquire(self) -> None:
        alongside: asyncio.Task[float | None] | None = None
        if self._lease_kept():
            alongside = asyncio.ensure_future(self._keepalive_alongside())
        else:
            await self._keepalive_or_grant()
        try:
            reply = await self._take_key()
        finally:
            if alongside is not None:
                await alongside  # never raises: its outcome is in _lease_deadline
        # conservative: the last keep-alive sent that answered (the one alongside the txn,
        # when it did), never the time of the txn's answer
        deadline = self._lease_deadline
        if reply.get("succeeded"):
            token = int(reply["header"]["revision"])
            self.observe(token, {"mod_revision": token, "value": _b64(self.node_id)})
            self.owner = self.node_id
            self.view = FenceView(True, True, token, deadline)
            return
        kvs = (reply.get("responses") or [{}])[0].get("response_range", {}).get("kvs", [])
        self.owner = base64.b64decode(kvs[0].get("value", "")).decode() if kvs else None
        self._observe_reply(reply, kvs)
        if kvs and self._on_our_lease(kvs[0]):
            # an earlier txn of ours succeeded but its answer was lost: the key is ours
            self.view = FenceView(True, True, int(kvs[0]["mod_revision"]), deadline)
            return
        self.view = FenceView(True)

    async def _take_key(self) -> dict[str, Any]:
        """The txn: put the key on our lease if it does not exist, else read it."""
        key = _b64(self.key)
        return await self.client.call(
            "/v3/kv/txn",
            {
                "compare": [
                    {"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
                ],
                "success": [
                    {
                        "request_put": {
                            "key": key,
                            "value": _b64(self.node_id),
                            "lease": str(self.lease_id),
                        }
                    }
                ],
                "failure": [{"request_range": {"key": key}}],
            },
        )

    def _on_our_lease(self, kv: dict[str, Any]) -> bool:
        return bool(self.lease_id) and int(kv.get("lease", 0)) == self.lease_id

    async def release_lease(self) -> None:
        """Revoke our lease (and with it any key on it)."""
        if self.lease_id:
            lease, self.lease_id, self._lease_deadline = self.lease_id, 0, 0.0
            await self.client.call("/v3/lease/revoke", {"ID": str(lease)})

    async def _read_owner(self) -> dict[str, Any] | None:
        reply = await self.client.call("/v3/kv/range", {"key": _b64(self.key)})
        kvs: list[dict[str, Any]] = reply.get("kvs", [])
        self.owner = base64.b64decode(kvs[0].get("value", "")).decode() if kvs else None
        self._observe_reply(reply, kvs)
        return kvs[0] if kvs else None

    async def watch(self, on_change: Callable[[], None]) -> None:
        """Follow the key until cancelled: read it, then stream its changes from the next
        revision (an etcd watch over the JSON gateway); `on_change` when the key's holder
        changed. Any error: the next endpoint, after WATCH_RETRY_S."""
        key = _b64(self.key)
        while True:
            try:
                reply = await self.client.call("/v3/kv/range", {"key": key})
                kvs = reply.get("kvs", [])
                revision = int(reply["header"]["revision"])
                if self.observe(revision, kvs[0] if kvs else None):
                    on_change()
                body = {"create_request": {"key": key, "start_revision": str(revision + 1)}}
                async with self.client.stream("/v3/watch", body) as response:
                    if response.status_code != 200:
                        raise FenceUnavailable(f"watch: HTTP {response.status_code}")
                    self.watching = True
                    async for line in response.aiter_lines():
                        if self._watch_message(line):
                            on_change()
            except (httpx.HTTPError, FenceUnavailable, KeyError, ValueError) as error:
                log.debug("fence watch: %s", error)
            finally:
                self.watching = False
            await asyncio.sleep(WATCH_RETRY_S)

    def _watch_message(self, line: str) -> bool:
        """One streamed watch response; True when it changed the key's holder."""
        if not line.strip():
            return False
        result = json.loads(line).get("result", {})
        if result.get("canceled") or int(result.get("compact_revision", 0) or 0):
            raise FenceUnavailable("watch canceled")
        changed = False
        for event in result.get("events", []):
            kv = event.get("kv", {})
            self.watch_events += 1
            gone = event.get("type") == "DELETE"
            changed |= self.observe(int(kv.get("mod_revision", 0)), None if gone else kv)
        return changed

    def lost(self) -> None:
        """The VIP guard revoked our lease (the key went with it): hold nothing."""
        self.lease_id, self._lease_deadline = 0, 0.0
        self.view = FenceView(self.view.reachable)

    async def release(self) -> None:
        """Delete the key only if it is still the one we wrote (its token), then revoke."""
        token = self.view.token
        self.view = FenceView(self.view.reachable)
        key = _b64(self.key)
        if token:
            await self.client.call(
                "/v3/kv/txn",
                {
                    "compare": [
                        {"key": key, "target": "MOD", "result": "EQUAL", "mod_revision": str(token)}
                    ],
                    "success": [{"request_delete_range": {"key": key}}],
                    "failure": [],
                },
            )
        await self.release_lease()
        self.view = FenceView(True)
