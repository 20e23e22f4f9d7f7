"""The L7 HTTP/1.1 listener: keep-alive to clients, pooled keep-alive upstreams.

httptools parses both directions. Requests on one client connection are
handled in order (pipelined requests wait their turn); each goes to a backend
picked per request. Hop-by-hop headers are dropped both ways and the framing
is our own: Content-Length bodies pass through as they are, chunked or
EOF-delimited bodies are streamed re-chunked (or, for an HTTP/1.0 client,
delimited by closing). Everything the upstream sends in one read goes to the
client in one write.

Retries: a request that failed before any response byte arrived goes once to
another backend when it is idempotent and its body is still held (small
bodies are kept until the response starts), so a backend that dies does not
fail requests that can be retried elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import cast

import httptools

from edge.config import Algorithm, HashKeyKind
from edge.flows import Flow
from edge.pool import Backend
from edge.proxy.common import ProxyContext, connect_backend, set_nodelay, spawn
from edge.proxy.http1 import (
    LAST_CHUNK,
    Framing,
    HeadError,
    build_request_head,
    chunk,
    rewrite_request_head,
    rewrite_response_head,
    switching_protocols_head,
)

log = logging.getLogger(__name__)

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Request bodies up to this size are kept until the response starts, so the
# request can be retried on another backend.
RETRY_BODY_LIMIT = 64 * 1024
REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Payload Too Large",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


class Exchange:
    """One request and its response."""

    __slots__ = (
        "attempts",
        "backend",
        "body_buffer",
        "body_buffered_bytes",
        "chunked_request",
        "client_keep_alive",
        "head_bytes",
        "headers",
        "http_10",
        "method",
        "request_complete",
        "response_started",
        "retryable",
        "upgrade",
        "upstream",
        "url",
    )

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.method = ""
        self.http_10 = False
        self.client_keep_alive = True
        self.chunked_request = False
        self.head_bytes = b""
        self.body_buffer: list[bytes] = []
        self.body_buffered_bytes = 0
        self.request_complete = False
        self.response_started = False
        self.retryable = False
        self.upgrade = False
        self.attempts = 0
        self.backend: Backend | None = None
        self.upstream: L7UpstreamProtocol | None = None


class L7ClientProtocol(asyncio.Protocol):
    def __init__(self, ctx: ProxyContext, listener: str) -> None:
        self.ctx = ctx
        self._listener = listener
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._queue: deque[Exchange] = deque()
        self._parsing: Exchange | None = None
        self._head_size = 0
        # A protocol upgrade: set when the request was sent, the tunnel once it is up.
        self._upgrading = False
        self._tunnel: L7UpstreamProtocol | None = None
        self._tunnel_pending: list[bytes] = []
        self._light_parser: httptools.HttpRequestParser | None = None
        self._light_facts = _HeadFacts()
        # The raw fast path needs no parsed headers unless the hash key is a header.
        pool_cfg = ctx.config.pool
        self._fast_ok = (
            pool_cfg.algorithm is not Algorithm.MAGLEV
            or pool_cfg.hash_key.kind is HashKeyKind.CLIENT_ADDRESS
        )
        self._paused = False
        self._closing = False
        self._lost = False
        self.out: list[bytes] = []
        self.flow: Flow | None = None
        self.client_address = ""
        self.deadline = 0.0

    # -- connection --------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        ctx = self.ctx
        self.flow = ctx.accepted(self, self._listener, transport)
        self.client_address = self.flow.client_address
        self.deadline = time.monotonic() + ctx.config.timeouts.client_header
        ctx.sweeper.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._lost = True
        ctx = self.ctx
        ctx.sweeper.discard(self)
        ctx.connections.get(self._listener, set()).discard(self)
        if self.flow is not None:
            ctx.flows.close(self.flow)
        for ex in self._queue:
            upstream = ex.upstream
            if upstream is not None:
                # The client went away mid-response: the upstream connection
                # is in an unknown state, so it is not reused.
                upstream.abandon()
            self._release(ex)
        self._queue.clear()

    def data_received(self, data: bytes) -> None:
        if self.flow is not None:
            self.flow.bytes_in += len(data)
        if self._upgrading:
            self._tunnel_out(data)
            return
        if (
            self._parsing is None
            and not self._queue
            and self._fast_ok
            and data.endswith(b"\r\n\r\n")
            and data.find(b"\r\n\r\n") == len(data) - 4
        ):
            lowered = data.lower()
            if (
                b"\r\ncontent-length" not in lowered
                and b"\r\ntransfer-encoding" not in lowered
                and b"\r\nupgrade" not in lowered
            ):
                self._whole_request(data)
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade_requested(data[upgrade.args[0] :])
            return
        except httptools.HttpParserError as error:
            if self._head_size < 0:
                self._fail_parse(431)
            else:
                self._fail_parse(400, f"{error}\n".encode())
            return
        parsing = self._parsing
        if parsing is not None and not parsing.head_bytes:
            # A head still incomplete: bound what it may take (huge heads, slowloris).
            self._head_size += len(data)
            if self._head_size > self.ctx.config.limits.max_header_bytes:
                self._fail_parse(431)
                return
        self.flush()

    def eof_received(self) -> bool:
        tunnel = self._tunnel
        if tunnel is not None and tunnel.transport is not None:
            if tunnel.transport.can_write_eof():
                tunnel.transport.write_eof()
            return True
        # The client sent all it will send; answer what is in flight, then close.
        if not self._queue:
            return False
        self._closing = True
        return True

    def pause_writing(self) -> None:
        for ex in self._queue:
            if ex.upstream is not None and ex.upstream.transport is not None:
                ex.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        for ex in self._queue:
            if ex.upstream is not None and ex.upstream.transport is not None:
                ex.upstream.transport.resume_reading()

    def on_deadline(self) -> None:
        if self._queue and self._queue[0].head_bytes:
            return  # a request is in flight: the upstream deadline governs it
        if self._parsing is not None:
            self._fail_parse(408)
        elif self.transport is not None:
            self.transport.close()

    # -- protocol upgrades (WebSocket and the like) ---------------------------------
    def _upgrade_requested(self, early: bytes) -> None:
        """The parser stopped at an upgrade request: from here on, bytes are the new
        protocol's. They are held until the backend agrees (101), then tunnelled."""
        ex = self._queue[-1] if self._queue else None
        if ex is None or not ex.upgrade or not ex.head_bytes:
            self._fail_parse(501, b"CONNECT is not supported\n")
            return
        self._parsing = None
        ex.request_complete = True
        ex.retryable = False  # the client may already be speaking the new protocol
        self._upgrading = True
        self._tunnel_out(early)
        self.flush()

    def _tunnel_out(self, data: bytes) -> None:
        """Client bytes of an upgraded connection: to the backend, or held until the 101."""
        if not data:
            return
        upstream = self._tunnel
        if upstream is not None and upstream.transport is not None:
            upstream.transport.write(data)
            return
        self._tunnel_pending.append(data)
        if sum(map(len, self._tunnel_pending)) > self.ctx.config.limits.buffer_high_water:
            self._pause()

    def tunnel_established(self, upstream: L7UpstreamProtocol) -> None:
        self._tunnel = upstream
        self.deadline = 0.0
        if self._tunnel_pending and upstream.transport is not None:
            upstream.transport.write(b"".join(self._tunnel_pending))
            self._tunnel_pending.clear()
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def _whole_request(self, data: bytes) -> None:
        """Fast path: exactly one complete request without a body, nothing in flight.

        llhttp still validates it (a parser without callbacks), then the head is
        rewritten from the raw bytes instead of being rebuilt header by header.
        """
        light = self._light_parser
        facts = self._light_facts
        if light is None:
            light = self._light_parser = httptools.HttpRequestParser(facts)
            facts.parser = light
        try:
            light.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._light_parser = None
            self._fail_parse(501, b"protocol upgrade is not supported\n")
            return
        except httptools.HttpParserError as error:
            self._light_parser = None
            self._fail_parse(400, f"{error}\n".encode())
            return
        if len(data) > self.ctx.config.limits.max_header_bytes:
            self._fail_parse(431)
            return
        ex = Exchange()
        ex.method = facts.method
        ex.http_10 = facts.http_10
        ex.client_keep_alive = facts.keep_alive
        ex.request_complete = True
        ex.retryable = self.ctx.config.retry_idempotent and ex.method in IDEMPOTENT
        try:
            ex.head_bytes = rewrite_request_head(
                data[:-4], self.client_address.encode(), self.ctx.via_line
            ).data
        except HeadError as error:
            self._fail_parse(400, f"{error}\n".encode())
            return
        self._queue.append(ex)
        self.deadline = 0.0
        if self.flow is not None:
            self.flow.requests += 1
        self.dispatch(ex)
        self.flush()

    def close_when_idle(self, grace: float) -> None:
        if not self._queue and self._parsing is None:
            self.deadline = min(self.deadline or float("inf"), time.monotonic() + grace)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def flush(self) -> None:
        if self.out:
            transport = self.transport
            if transport is not None and not transport.is_closing():
                data = b"".join(self.out) if len(self.out) > 1 else self.out[0]
                if self.flow is not None:
                    self.flow.bytes_out += len(data)
                transport.write(data)
            self.out.clear()

    # -- request parsing (httptools callbacks) ----------------------------
    def on_message_begin(self) -> None:
        ex = Exchange()
        self._parsing = ex
        self._queue.append(ex)
        self.deadline = time.monotonic() + self.ctx.config.timeouts.client_header
        if len(self._queue) > 1 and not self._paused and self.transport is not None:
            # Pipelined: read no further until the earlier responses are out.
            self._paused = True
            self.transport.pause_reading()

    def on_url(self, url: bytes) -> None:
        assert self._parsing is not None
        self._parsing.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._parsing is not None
        self._parsing.headers.append((name, value))

    def on_headers_complete(self) -> None:
        ex = self._parsing
        assert ex is not None
        size = len(ex.url) + sum(len(n) + len(v) + 4 for n, v in ex.headers)
        if size > self.ctx.config.limits.max_header_bytes:
            # Bigger than allowed, though complete in this read: refuse it all the same.
            self._head_size = -1
            raise HeadError("request head too large")
        parser = self._parser
        ex.method = parser.get_method().decode("latin-1")
        ex.http_10 = parser.get_http_version() == "1.0"
        ex.client_keep_alive = parser.should_keep_alive()
        if parser.should_upgrade():
            ex.upgrade = True
            if ex.method == "CONNECT":
                return  # not a forward proxy: refused with 501 when the parser stops
        head = build_request_head(
            parser.get_method(),
            ex.url,
            ex.headers,
            self.client_address.encode(),
            self.ctx.via_line,
            upgrade=ex.upgrade,
        )
        ex.head_bytes = head.data
        ex.chunked_request = head.chunked
        self._head_size = 0
        ex.retryable = self.ctx.config.retry_idempotent and ex.method in IDEMPOTENT
        self.deadline = 0.0
        if self.flow is not None:
            self.flow.requests += 1
        if ex is self._queue[0]:
            self.dispatch(ex)

    def on_body(self, body: bytes) -> None:
        ex = self._parsing
        assert ex is not None
        data = chunk(body) if ex.chunked_request else body
        upstream = ex.upstream
        if ex.retryable and not ex.response_started:
            ex.body_buffer.append(data)
            ex.body_buffered_bytes += len(data)
            if ex.body_buffered_bytes > RETRY_BODY_LIMIT:
                ex.retryable = False
                if upstream is not None:
                    ex.body_buffer.clear()
        elif upstream is None:
            ex.body_buffer.append(data)
            ex.body_buffered_bytes += len(data)
        if upstream is not None and upstream.transport is not None:
            upstream.transport.write(data)
        elif ex.body_buffered_bytes > self.ctx.config.limits.buffer_high_water:
            self._pause()

    def on_message_complete(self) -> None:
        ex = self._parsing
        assert ex is not None
        self._parsing = None
        ex.request_complete = True
        if ex.chunked_request:
            on_wire = LAST_CHUNK
            if ex.upstream is not None and ex.upstream.transport is not None:
                ex.upstream.transport.write(on_wire)
            if ex.upstream is None or (ex.retryable and not ex.response_started):
                ex.body_buffer.append(on_wire)

    # -- dispatch ------------------------------------------------------------
    def _hash_key(self, ex: Exchange) -> bytes:
        key_cfg = self.ctx.config.pool.hash_key
        if key_cfg.kind is HashKeyKind.CLIENT_ADDRESS or key_cfg.name is None:
            return self.client_address.encode()
        wanted = key_cfg.name.lower().encode()
        if key_cfg.kind is HashKeyKind.HEADER:
            for name, value in ex.headers:
                if name.lower() == wanted:
                    return value
        else:
            for name, value in ex.headers:
                if name.lower() == b"cookie":
                    for part in value.split(b";"):
                        k, _, v = part.strip().partition(b"=")
                        if k.lower() == wanted:
                            return v
        return self.client_address.encode()

    def dispatch(self, ex: Exchange, exclude: Backend | None = None) -> None:
        if ex.upgrade and not ex.head_bytes:
            return  # CONNECT: answered with 501 when the parser reports the upgrade
        ctx = self.ctx
        pool = ctx.pool
        key = self._hash_key(ex) if pool.algorithm is Algorithm.MAGLEV else b""
        backend = pool.pick(key, exclude=exclude)
        if backend is None:
            self.local_response(ex, 503, b"no healthy backend\n")
            return
        ex.attempts += 1
        ex.backend = backend
        backend.active_connections += 1
        backend.requests_total += 1
        if self.flow is not None:
            self.flow.backend = backend.name
        upstream = ctx.idle_upstreams.acquire(backend)
        if upstream is not None:
            upstream.start(self, ex)
            return
        spawn(self._connect(ex, backend))

    async def _connect(self, ex: Exchange, backend: Backend) -> None:
        ctx = self.ctx
        upstream, detail = await connect_backend(
            lambda: L7UpstreamProtocol(backend, ctx), backend, ctx.config.timeouts.connect
        )
        if upstream is None:
            self.upstream_failed(ex, backend, detail, eject=True)
            return
        if self._lost or ex not in self._queue:
            upstream.release()
            return
        upstream.start(self, ex)

    def _release(self, ex: Exchange) -> None:
        if ex.backend is not None:
            ex.backend.active_connections -= 1
            ex.backend = None

    # -- called by the upstream side ----------------------------------------
    def upstream_failed(self, ex: Exchange, backend: Backend, detail: str, eject: bool) -> None:
        """The upstream broke before any response byte: retry elsewhere, or answer 502."""
        ex.upstream = None
        self._release(ex)
        backend.failures_total += 1
        if eject:
            self.ctx.on_passive_failure(backend, detail)
        if self._lost or ex not in self._queue:
            return
        # A retryable request still holds all of its body sent so far.
        if ex.retryable and ex.attempts < 2:
            self.dispatch(ex, exclude=backend)
            return
        self.local_response(ex, 502, b"backend failed\n")

    def local_response(self, ex: Exchange, status: int, body: bytes) -> None:
        """Answer a request ourselves (errors); the connection closes unless all is well."""
        close = status in (400, 408, 413, 431, 501) or not ex.request_complete
        head = (b"HTTP/1.1 %d %b\r\nContent-Type: text/plain\r\nContent-Length: %d%b%b\r\n\r\n") % (
            status,
            REASONS.get(status, b"Error"),
            len(body),
            self.ctx.via_line,
            b"\r\nConnection: close" if close else b"",
        )
        self.out.append(head + body)
        ex.response_started = True
        self.response_done(ex, keep_alive=not close)
        self.flush()

    def response_done(self, ex: Exchange, keep_alive: bool) -> None:
        self._release(ex)
        ex.upstream = None
        if self._queue and self._queue[0] is ex:
            self._queue.popleft()
        keep = keep_alive and ex.client_keep_alive and not self._closing and not ex.http_10
        if not keep:
            self.flush()
            self._closing = True
            if self.transport is not None:
                self.transport.close()
            return
        if self._queue:
            nxt = self._queue[0]
            if nxt.head_bytes:
                self.dispatch(nxt)
        else:
            idle = 1.0 if self.ctx.draining else self.ctx.config.timeouts.client_idle
            self.deadline = time.monotonic() + idle
        if self._paused and len(self._queue) <= 1:
            self._paused = False
            if self.transport is not None:
                self.transport.resume_reading()

    def keep_alive_allowed(self) -> bool:
        return not self._closing and not self.ctx.draining

    def _pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume_body(self) -> None:
        if self._paused and len(self._queue) <= 1 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def _fail_parse(self, status: int, body: bytes = b"") -> None:
        # Earlier pipelined requests are dropped with the connection.
        self._parsing = None
        self._closing = True
        self.out.append(
            b"HTTP/1.1 %d %b\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b"
            % (status, REASONS.get(status, b"Error"), len(body), body)
        )
        self.flush()
        if self.transport is not None:
            self.transport.close()


class L7UpstreamProtocol(asyncio.Protocol):
    """One keep-alive connection to a backend, carrying one request at a time."""

    def __init__(self, backend: Backend, ctx: ProxyContext) -> None:
        self.backend = backend
        self.ctx = ctx
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._client: L7ClientProtocol | None = None
        self._ex: Exchange | None = None
        self._awaiting_head = True
        self._head_buf = b""
        self._framing = Framing.LENGTH
        self._upstream_eof = False
        self._upstream_close = False
        # Body bytes still expected for a Content-Length response (-1: parser frames it).
        self._remaining = -1
        # After a 101: raw bytes both ways until either side closes.
        self._tunnel = False
        self._uses = 0
        self._write: Callable[[bytes], None] = _discard
        self.deadline = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        set_nodelay(transport)
        transport.set_write_buffer_limits(high=self.ctx.config.limits.buffer_high_water)
        self.ctx.sweeper.add(self)

    def start(self, client: L7ClientProtocol, ex: Exchange) -> None:
        """Send one request on this connection."""
        self._client = client
        self._ex = ex
        self._uses += 1
        self._awaiting_head = True
        ex.upstream = self
        self._write = client.out.append
        transport = self.transport
        assert transport is not None
        body = ex.body_buffer
        transport.write(ex.head_bytes + b"".join(body) if body else ex.head_bytes)
        if not ex.retryable and body:
            body.clear()
            ex.body_buffered_bytes = 0
            client.resume_body()
        self.deadline = time.monotonic() + self.ctx.config.timeouts.upstream_response

    def release(self) -> None:
        """Back to the idle pool, or closed."""
        self._client = None
        self._ex = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.backend.retired or not self.ctx.idle_upstreams.put(
            self.backend, self, self.ctx.config.limits.upstream_pool_size
        ):
            transport.close()
            return
        self.deadline = time.monotonic() + self.ctx.config.timeouts.upstream_idle

    def abandon(self) -> None:
        self._client = None
        self._ex = None
        if self.transport is not None:
            self.transport.close()

    def on_deadline(self) -> None:
        ex, client = self._ex, self._client
        if ex is not None and client is not None:
            if not ex.response_started:
                self._client = None
                self._ex = None
                client._release(ex)
                ex.upstream = None
                self.backend.failures_total += 1
                self.ctx.on_passive_failure(self.backend, "response timed out")
                client.local_response(ex, 504, b"backend timed out\n")
            elif client.transport is not None:
                client.transport.abort()
        if self.transport is not None:
            self.transport.abort()

    # -- reading the response ------------------------------------------------
    def data_received(self, data: bytes) -> None:
        ex = self._ex
        client = self._client
        if ex is None or client is None:
            # Bytes on an idle connection: the backend broke protocol.
            if self.transport is not None:
                self.transport.close()
            return
        if self._tunnel:
            client.out.append(data)
            client.flush()
            return
        if not ex.response_started:
            ex.response_started = True
            if ex.body_buffer:
                ex.body_buffer.clear()
                ex.body_buffered_bytes = 0
                client.resume_body()
        self.deadline = time.monotonic() + self.ctx.config.timeouts.upstream_response
        if self._awaiting_head:
            if self._head_buf:
                data = self._head_buf + data
                self._head_buf = b""
            rest = self._take_head(data, ex, client)
            if rest is None:
                client.flush()
                return
            data = rest
        if self._remaining >= 0:
            # Content-Length body: counted and passed on, no parser needed.
            remaining = self._remaining
            size = len(data)
            if size < remaining:
                self._remaining = remaining - size
                self._write(data)
            else:
                if size > remaining:
                    data = data[:remaining]
                    self._upstream_close = True  # it sent more than it announced
                if data:
                    self._write(data)
                self._finish(upstream_keep_alive=not self._upstream_close)
            client.flush()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            log.warning("backend %s sent a bad response: %s", self.backend.name, error)
            client.flush()
            self._fail_mid_response(f"bad response: {error}")
            return
        client.flush()

    def _take_head(self, data: bytes, ex: Exchange, client: L7ClientProtocol) -> bytes | None:
        """Rewrite the response head(s) at the start of `data`.

        Returns the bytes still to process (the body, or head and body when the
        chunked/EOF parser must see it), or None when nothing is left to do.
        """
        pos = 0
        while True:
            end = data.find(b"\r\n\r\n", pos)
            if end < 0:
                if len(data) - pos > self.ctx.config.limits.max_header_bytes:
                    self._fail_mid_response("response head too large")
                    return None
                self._head_buf = data[pos:]
                return None
            try:
                head = rewrite_response_head(
                    data[pos:end],
                    self.ctx.via_line,
                    head_request=ex.method == "HEAD",
                    client_http10=ex.http_10,
                    # An upgrade refused: the client may have sent bytes of the new
                    # protocol already, so its connection closes after the answer.
                    keep_alive=ex.client_keep_alive
                    and client.keep_alive_allowed()
                    and not ex.upgrade,
                )
            except HeadError as error:
                self._fail_mid_response(f"bad response: {error}")
                return None
            start, pos = pos, end + 4
            if head.status == 101 and ex.upgrade:
                # The backend switched protocols: pass its 101 on, then only bytes.
                client.out.append(switching_protocols_head(data[start:end], self.ctx.via_line))
                self._awaiting_head = False
                self._tunnel = True
                self.deadline = 0.0
                client.tunnel_established(self)
                rest = data[pos:]
                if rest:
                    client.out.append(rest)
                return None
            if head.status >= 200:
                break
            # 1xx (100 Continue, 103 Early Hints): passed on as is; the final
            # response follows on the same connection.
            if head.status != 101 and not ex.http_10:
                client.out.append(b"HTTP/1.1" + data[start + 8 : pos])
        self._awaiting_head = False
        self._framing = head.framing
        self._upstream_eof = head.upstream_eof
        self._upstream_close = head.upstream_close
        ex.client_keep_alive = head.keep_alive
        client.out.append(head.data)
        if head.status >= 500 and self.ctx.config.health.passive.eject_on_5xx:
            self.ctx.on_passive_failure(self.backend, f"answered HTTP {head.status}")
        if head.framing is Framing.NONE or (
            head.framing is Framing.LENGTH and head.content_length == 0
        ):
            if pos < len(data):
                self._upstream_close = True  # bytes after a body-less response
            self._finish(upstream_keep_alive=not self._upstream_close)
            return None
        if head.framing is Framing.LENGTH:
            self._remaining = head.content_length
            return data[pos:]
        # Chunked or EOF-delimited: the parser finds the end of the body.
        self._remaining = -1
        return data[start:]

    def on_body(self, body: bytes) -> None:
        if self._framing is Framing.CHUNKED:
            self._write(chunk(body))
        else:
            self._write(body)

    def on_message_complete(self) -> None:
        if self._ex is None:
            return
        if self._framing is Framing.CHUNKED:
            self._write(LAST_CHUNK)
        self._finish(upstream_keep_alive=self._parser.should_keep_alive())

    def _finish(self, upstream_keep_alive: bool) -> None:
        ex, client = self._ex, self._client
        assert ex is not None and client is not None
        self._ex = None
        self._client = None
        self._write = _discard
        self.deadline = 0.0
        self._remaining = -1
        reusable = upstream_keep_alive and ex.request_complete and not self._upstream_eof
        client.response_done(ex, keep_alive=ex.client_keep_alive)
        if reusable:
            self.release()
        elif self.transport is not None:
            self.transport.close()

    def _fail_mid_response(self, detail: str) -> None:
        ex, client = self._ex, self._client
        self._ex = None
        self._client = None
        if self.transport is not None:
            self.transport.abort()
        if ex is None or client is None:
            return
        self.backend.failures_total += 1
        self.ctx.on_passive_failure(self.backend, detail)
        if client.transport is not None:
            # Part of the response may be out: the client can only learn of the
            # failure by the connection breaking.
            client.transport.abort()

    def pause_writing(self) -> None:
        client = self._client
        if client is not None and client.transport is not None:
            client.transport.pause_reading()

    def resume_writing(self) -> None:
        client = self._client
        if client is not None and client.transport is not None:
            client.transport.resume_reading()

    def eof_received(self) -> bool:
        client = self._client
        if self._tunnel and client is not None and client.transport is not None:
            if client.transport.can_write_eof():
                client.transport.write_eof()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.ctx.sweeper.discard(self)
        self.ctx.idle_upstreams.remove(self.backend, self)
        ex, client = self._ex, self._client
        if ex is None or client is None:
            return
        self._ex = None
        self._client = None
        if self._tunnel:
            # The backend ended the upgraded connection: so does the client's.
            if client.transport is not None:
                if exc is None:
                    client.transport.close()
                else:
                    client.transport.abort()
            return
        if not ex.response_started:
            # A reused connection closed by the backend between requests is the
            # keep-alive race, not a broken backend: retry without ejecting.
            fresh = self._uses <= 1
            detail = f"connection lost: {exc}" if exc else "connection closed before response"
            client.upstream_failed(ex, self.backend, detail, eject=fresh or exc is not None)
            return
        self._ex, self._client = ex, client
        if self._upstream_eof and exc is None and not self._awaiting_head:
            if self._framing is Framing.CHUNKED:
                client.out.append(LAST_CHUNK)
            self._finish(upstream_keep_alive=False)
            client.flush()
            return
        self._fail_mid_response(f"connection lost mid-response: {exc or 'EOF'}")


def _discard(data: bytes) -> None:
    pass


class _HeadFacts:
    """The protocol of the validating parser: only what the head says, read while the
    parser is on it (after the message, llhttp has already reset its flags)."""

    def __init__(self) -> None:
        self.parser: httptools.HttpRequestParser | None = None
        self.method = ""
        self.http_10 = False
        self.keep_alive = True

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None
        self.method = parser.get_method().decode("latin-1")
        self.http_10 = parser.get_http_version() == "1.0"
        self.keep_alive = parser.should_keep_alive()
