"""A thin asyncio client of etcd's v3 JSON gateway (grpc-gateway over HTTP/1.1), on httpx.

Why not a gRPC client: see docs/design/etcd-client.md. What this module owns because of that
choice: failover between endpoints (sticky on the last one that answered, rotate on transport
errors, timeouts and 5xx) and watch resume from the next revision after a broken stream.

Watches are checked for a silent member: a stream that has carried nothing for
`watch_probe_s` makes the member answer a status request within the request timeout, or the
watch moves to the next member (a SIGSTOPped or hung etcd keeps the TCP connection open and
says nothing; a healthy idle stream says nothing either, so silence alone proves nothing).
Watches also ask for a leader (`hasleader` metadata): a member cut off from the quorum ends
the stream instead of holding it open. Reconnects back off exponentially with jitter.

Every request is logged at DEBUG (endpoint, path, outcome, duration), never above.

Gateway quirks handled here: keys and values are base64, int64s arrive as JSON strings,
fields with default values (0, false, empty) are omitted, and streamed messages are wrapped
in {"result": ...}.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

import httpx

log = logging.getLogger(__name__)

#: gRPC codes that mean "try again, maybe elsewhere": DEADLINE_EXCEEDED, UNAVAILABLE.
_RETRYABLE_GRPC_CODES = {4, 14}
_CONNECTIONS = 16
#: gRPC metadata through the gateway: a watch on a member without a leader is cancelled.
_REQUIRE_LEADER = {"Grpc-Metadata-hasleader": "true"}
#: Reconnect back-off of a broken watch: first retry at once (another member), then doubling.
WATCH_BACKOFF_FIRST_S = 0.05
WATCH_BACKOFF_MAX_S = 2.0


def backoff_s(failures: int, first_s: float, max_s: float) -> float:
    """Exponential back-off with full jitter over the upper half: [d/2, d], d = first * 2^n."""
    ceiling = min(max_s, first_s * 2 ** min(failures, 30))
    return random.uniform(ceiling / 2, ceiling)


class EtcdUnavailable(Exception):
    """No endpoint answered before the deadline."""


class EtcdError(Exception):
    """etcd answered with a non-retryable error."""


class SilentMember(Exception):
    """The member carrying a watch stopped answering."""


def b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that selects every key starting with `prefix`."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


class RangeOptions(TypedDict, total=False):
    """`range_request`'s options, for `range`."""

    prefix: bool
    keys_only: bool
    sort_create: str | None
    limit: int
    min_create_revision: int
    min_mod_revision: int


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int

    @classmethod
    def from_json(cls, kv: dict[str, Any]) -> KeyValue:
        return cls(
            key=unb64(kv["key"]),
            value=unb64(kv.get("value", "")),
            create_revision=int(kv.get("create_revision", 0)),
            mod_revision=int(kv.get("mod_revision", 0)),
            lease=int(kv.get("lease", 0)),
        )


def range_kvs(response: dict[str, Any]) -> list[KeyValue]:
    """The key-values of one range's answer within a transaction's responses."""
    return [KeyValue.from_json(kv) for kv in response.get("response_range", {}).get("kvs", [])]


@dataclass(frozen=True, slots=True)
class WatchEvent:
    deleted: bool
    kv: KeyValue


class EtcdGateway:
    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        request_timeout_s: float = 0.5,
        deadline_s: float = 5.0,
        watch_probe_s: float = 1.0,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self._current = 0
        self._request_timeout_s = request_timeout_s
        self._deadline_s = deadline_s
        self._watch_probe_s = watch_probe_s
        #: watched prefix -> the endpoint whose stream carries it now (for operators, tests)
        self.watching: dict[bytes, str] = {}
        #: watch streams moved off a member that went silent
        self.silent_member_failovers = 0
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(request_timeout_s),
            limits=httpx.Limits(
                max_connections=_CONNECTIONS, max_keepalive_connections=_CONNECTIONS
            ),
        )
        # Requests queue here, not in httpcore's pool, whose bookkeeping costs (queued
        # requests x connections) with a poll() per connection on every request (measured:
        # most of the API's CPU under 250 heartbeats/s with 64-256 connections). A few
        # connections suffice: etcd answers in milliseconds. Watches hold a connection each
        # and take no slot.
        self._slots = asyncio.Semaphore(_CONNECTIONS - 4)

    async def close(self) -> None:
        await self._http.aclose()

    def _rotate(self, failed: int) -> None:
        # Only move on if nobody else already did, so concurrent failures rotate once.
        if self._current == failed:
            self._current = (failed + 1) % len(self.endpoints)

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to the first endpoint that answers, rotating on failure until the deadline.

        Every caller must make its request safe to repeat: a request that timed out may
        still have been applied (writes here are compare-and-swap transactions).
        """
        deadline = time.monotonic() + self._deadline_s
        attempt = 0
        last_error = "no attempt"
        while True:
            index = self._current
            endpoint = self.endpoints[index]
            started = time.monotonic()
            try:
                async with self._slots:
                    response = await self._http.post(endpoint + path, json=body)
            except httpx.HTTPError as exc:
                last_error = f"{endpoint}: {type(exc).__name__}"
                log.debug(
                    "etcd %s%s: %s after %.1f ms",
                    endpoint,
                    path,
                    type(exc).__name__,
                    (time.monotonic() - started) * 1000,
                )
            else:
                log.debug(
                    "etcd %s%s: HTTP %d in %.1f ms",
                    endpoint,
                    path,
                    response.status_code,
                    (time.monotonic() - started) * 1000,
                )
                if response.status_code == 200:
                    result: dict[str, Any] = response.json()
                    return result
                try:
                    error = response.json()
                except ValueError:
                    error = {}
                code = int(error.get("code", 0)) if isinstance(error, dict) else 0
                message = error.get("error", response.text) if isinstance(error, dict) else ""
                if response.status_code < 500 and code not in _RETRYABLE_GRPC_CODES:
                    raise EtcdError(f"{endpoint}{path}: {message}")
                last_error = f"{endpoint}: {message}"
            self._rotate(index)
            attempt += 1
            if time.monotonic() >= deadline:
                raise EtcdUnavailable(f"etcd unavailable: {last_error}")
            if attempt % len(self.endpoints) == 0:
                # Every endpoint failed once: an election is likely in progress.
                rounds = attempt // len(self.endpoints) - 1
                await asyncio.sleep(backoff_s(rounds, 0.05, 0.3))

    # --- KV --------------------------------------------------------------------------

    @staticmethod
    def range_request(
        key: bytes,
        *,
        prefix: bool = False,
        keys_only: bool = False,
        sort_create: str | None = None,
        limit: int = 0,
        min_create_revision: int = 0,
        min_mod_revision: int = 0,
    ) -> dict[str, Any]:
        """The body of a RangeRequest (for `range`, or one of `ranges`)."""
        body: dict[str, Any] = {"key": b64(key)}
        if prefix:
            body["range_end"] = b64(prefix_end(key))
        if keys_only:
            body["keys_only"] = True
        if sort_create:
            body["sort_target"] = "CREATE"
            body["sort_order"] = sort_create
        if limit:
            body["limit"] = str(limit)
        if min_create_revision:
            body["min_create_revision"] = str(min_create_revision)
        if min_mod_revision:
            body["min_mod_revision"] = str(min_mod_revision)
        return body

    async def range(
        self, key: bytes, **options: Unpack[RangeOptions]
    ) -> tuple[int, list[KeyValue]]:
        """(store revision, key-values). Linearizable (the default), so reads see every
        acknowledged write. `options`: as `range_request`'s."""
        body = self.range_request(key, **options)
        reply = await self.call("/v3/kv/range", body)
        return int(reply["header"].get("revision", 0)), [
            KeyValue.from_json(kv) for kv in reply.get("kvs", [])
        ]

    async def ranges(self, *requests: dict[str, Any]) -> tuple[int, list[list[KeyValue]]]:
        """Several ranges (`range_request` bodies) as one read-only transaction: one round
        trip, every answer at the same store revision, linearizable like `range`."""
        _, revision, responses = await self.txn(
            [], [{"request_range": request} for request in requests], []
        )
        return revision, [range_kvs(response) for response in responses]

    async def txn(
        self,
        compare: list[dict[str, Any]],
        success: list[dict[str, Any]],
        failure: list[dict[str, Any]],
    ) -> tuple[bool, int, list[dict[str, Any]]]:
        """(succeeded, store revision after, responses of the branch taken)."""
        reply = await self.call(
            "/v3/kv/txn", {"compare": compare, "success": success, "failure": failure}
        )
        return (
            bool(reply.get("succeeded", False)),
            int(reply["header"].get("revision", 0)),
            list(reply.get("responses", [])),
        )

    # --- leases ----------------------------------------------------------------------

    async def lease_grant(self, ttl_s: int) -> int:
        reply = await self.call("/v3/lease/grant", {"TTL": str(ttl_s)})
        return int(reply["ID"])

    async def lease_keepalive(self, lease: int) -> int:
        """Remaining TTL after the refresh; 0 when the lease no longer exists."""
        reply = await self.call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(reply.get("result", {}).get("TTL", 0))

    # --- watch -----------------------------------------------------------------------

    async def _member_answers(self, endpoint: str) -> bool:
        try:
            response = await self._http.post(endpoint + "/v3/maintenance/status", json={})
        except httpx.HTTPError as exc:
            log.debug("etcd %s status probe: %s", endpoint, type(exc).__name__)
            return False
        return response.status_code == 200

    async def _lines(self, response: httpx.Response, endpoint: str) -> AsyncIterator[str]:
        """The stream's lines; raises SilentMember when the stream has been quiet for
        `watch_probe_s` and its member does not answer a status request either."""
        queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for line in response.aiter_lines():
                    queue.put_nowait(line)
            except BaseException as exc:  # handed to the reader, which raises it
                queue.put_nowait(exc)
                return
            queue.put_nowait(None)

        reader = asyncio.create_task(pump(), name="etcd-watch-reader")
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), self._watch_probe_s)
                except TimeoutError:
                    if await self._member_answers(endpoint):
                        continue
                    raise SilentMember(endpoint) from None
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def watch_prefix(
        self, prefix: bytes, start_revision: int, *, deletes_only: bool = False
    ) -> AsyncIterator[tuple[int, list[WatchEvent]]]:
        """Yield (next revision to watch from, events) forever, resuming after failures.

        After a broken or silent stream it resumes on the next endpoint from the revision
        after the last one seen, so no event is skipped. If that revision was compacted it
        resumes at the compaction point and yields an empty batch: the caller re-reads state
        anyway. An empty batch is also yielded after each failover (events may have been
        missed while the member was silent).
        """
        next_revision = start_revision
        failures = 0
        while True:
            index = self._current
            endpoint = self.endpoints[index]
            create: dict[str, Any] = {
                "key": b64(prefix),
                "range_end": b64(prefix_end(prefix)),
                "start_revision": str(next_revision),
            }
            if deletes_only:
                create["filters"] = ["NOPUT"]
            request = {"create_request": create}
            self.watching[prefix] = endpoint
            try:
                async with self._http.stream(
                    "POST",
                    endpoint + "/v3/watch",
                    json=request,
                    headers=_REQUIRE_LEADER,
                    timeout=httpx.Timeout(self._request_timeout_s, read=None),
                ) as response:
                    if response.status_code != 200:
                        raise EtcdError(f"watch: HTTP {response.status_code}")
                    log.debug("etcd %s watch on %r from %d", endpoint, prefix, next_revision)
                    async for line in self._lines(response, endpoint):
                        if not line.strip():
                            continue
                        failures = 0
                        message = json.loads(line).get("result", {})
                        if message.get("canceled"):
                            compacted = int(message.get("compact_revision", 0))
                            if compacted:
                                next_revision = compacted
                                yield next_revision, []
                            break
                        events = [
                            WatchEvent(
                                deleted=e.get("type") == "DELETE", kv=KeyValue.from_json(e["kv"])
                            )
                            for e in message.get("events", [])
                        ]
                        if events:
                            next_revision = max(e.kv.mod_revision for e in events) + 1
                            yield next_revision, events
            except SilentMember:
                self.silent_member_failovers += 1
                log.warning("etcd watch on %s: member silent; moving to the next one", endpoint)
            except (httpx.HTTPError, EtcdError, ValueError, KeyError) as exc:
                log.debug("etcd watch on %s broke (%s); resuming", endpoint, type(exc).__name__)
            self.watching.pop(prefix, None)
            self._rotate(index)
            await asyncio.sleep(backoff_s(failures, WATCH_BACKOFF_FIRST_S, WATCH_BACKOFF_MAX_S))
            failures += 1
            yield next_revision, []  # resumed: whatever was missed is re-read by the caller
