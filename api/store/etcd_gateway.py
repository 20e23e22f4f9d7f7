"""A thin asyncio client of etcd's v3 JSON gateway (grpc-gateway over HTTP/1.1), on httpx.

Why not a gRPC client: see docs/design/etcd-client.md. What this module owns because of that
choice: failover between endpoints (sticky on the last one that answered, rotate on transport
errors, timeouts and 5xx) and watch resume from the next revision after a broken stream.

Gateway quirks handled here: keys and values are base64, int64s arrive as JSON strings,
fields with default values (0, false, empty) are omitted, and streamed messages are wrapped
in {"result": ...}.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

log = logging.getLogger(__name__)

#: gRPC codes that mean "try again, maybe elsewhere": DEADLINE_EXCEEDED, UNAVAILABLE.
_RETRYABLE_GRPC_CODES = {4, 14}
_CONNECTIONS = 16


class EtcdUnavailable(Exception):
    """No endpoint answered before the deadline."""


class EtcdError(Exception):
    """etcd answered with a non-retryable error."""


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
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self._current = 0
        self._request_timeout_s = request_timeout_s
        self._deadline_s = deadline_s
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
            try:
                async with self._slots:
                    response = await self._http.post(endpoint + path, json=body)
            except httpx.HTTPError as exc:
                last_error = f"{endpoint}: {type(exc).__name__}"
            else:
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
                await asyncio.sleep(min(0.05 * attempt, 0.3))

    # --- KV --------------------------------------------------------------------------

    async def range(
        self,
        key: bytes,
        *,
        prefix: bool = False,
        keys_only: bool = False,
        sort_create: str | None = None,
        limit: int = 0,
        min_create_revision: int = 0,
    ) -> tuple[int, list[KeyValue]]:
        """(store revision, key-values). Linearizable (the default), so reads see every
        acknowledged write."""
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
        reply = await self.call("/v3/kv/range", body)
        return int(reply["header"].get("revision", 0)), [
            KeyValue.from_json(kv) for kv in reply.get("kvs", [])
        ]

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

    async def watch_prefix(
        self, prefix: bytes, start_revision: int, *, deletes_only: bool = False
    ) -> AsyncIterator[tuple[int, list[WatchEvent]]]:
        """Yield (next revision to watch from, events) forever, resuming after failures.

        After a broken stream it resumes on the next endpoint from the revision after the
        last one seen, so no event is skipped. If that revision was compacted it resumes at
        the compaction point and yields an empty batch: the caller re-reads state anyway.
        """
        next_revision = start_revision
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
            try:
                async with self._http.stream(
                    "POST",
                    endpoint + "/v3/watch",
                    json=request,
                    timeout=httpx.Timeout(self._request_timeout_s, read=None),
                ) as response:
                    if response.status_code != 200:
                        raise EtcdError(f"watch: HTTP {response.status_code}")
                    async for line in response.aiter_lines():
                        if not line.strip():
                            continue
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
            except (httpx.HTTPError, EtcdError, ValueError, KeyError) as exc:
                log.info("etcd watch on %s broke (%s); resuming", endpoint, type(exc).__name__)
            self._rotate(index)
            await asyncio.sleep(0.05)
