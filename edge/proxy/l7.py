"""The L7 HTTP/1.1 listener: the client connection.

llhttp (httptools) parses requests; the framing core (`framing`) decides each
one: refused (answered in its turn, then the connection closes; never
forwarded), or forwarded with the head it builds and the body delimited as it
says. Requests on one connection are answered in order (pipelined ones wait
their turn: reading pauses); each is one `Exchange` with a backend picked per
request, carried by an `L7UpstreamProtocol` that talks back only through the
`ExchangeOwner` interface this class implements. Flow control: `ReadGate`.

Retries: an attempt that failed before any response byte arrived goes once to
another backend when `may_retry` says so. Passive health: at most one failure
per request is reported, and only the kinds that are evidence against the
backend (`exchange.EVIDENCE`).

Client timers, one meaning each: `client_header` for the head,
`client_body_idle` between body reads, `keep_alive_idle` between requests.
None of them counts against a backend.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import cast

import httptools

from edge.config import Algorithm, HashKeyKind
from edge.flows import Flow
from edge.pool import Backend
from edge.proxy import flow_control
from edge.proxy.common import ProxyContext, connect_backend, spawn
from edge.proxy.exchange import (
    EVIDENCE,
    RETRY_BODY_LIMIT,
    Exchange,
    ExchangeState,
    RequestState,
    Upstream,
    UpstreamFailure,
    may_retry,
)
from edge.proxy.flow_control import ReadGate
from edge.proxy.framing import (
    LAST_CHUNK,
    Body,
    Reason,
    Rejected,
    chunk,
    parser_error_reason,
    plan_request,
    simple_request,
)
from edge.proxy.upstream import L7UpstreamProtocol

log = logging.getLogger(__name__)

REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}
# Answers after which the client's connection is closed whatever else holds.
_CLOSING = frozenset({400, 408, 414, 431, 501, 505})
_TIMEOUTS = frozenset({UpstreamFailure.FIRST_BYTE_TIMEOUT, UpstreamFailure.READ_TIMEOUT})


class L7ClientProtocol(asyncio.Protocol):
    def __init__(self, ctx: ProxyContext, listener: str) -> None:
        self.ctx = ctx
        self._listener = listener
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._gate = ReadGate()
        self._queue: deque[Exchange] = deque()
        self._parsing: Exchange | None = None
        self._head_size = 0
        self._rejected: Rejected | None = None
        # No more requests are read (one was refused, or the client half-closed).
        self._input_done = False
        # A protocol upgrade: set when the request was sent, the tunnel once it is up.
        self._upgrading = False
        self._tunnel: Upstream | None = None
        self._tunnel_pending: list[bytes] = []
        self._light_parser: httptools.HttpRequestParser | None = None
        self._light_facts = _HeadFacts()
        # The raw fast path needs no parsed headers unless the hash key is a header.
        pool_cfg = ctx.config.pool
        self._fast_ok = (
            pool_cfg.algorithm is not Algorithm.MAGLEV and not pool_cfg.sticky
        ) or pool_cfg.hash_key.kind is HashKeyKind.CLIENT_ADDRESS
        self._closing = False
        self._lost = False
        self.out: list[bytes] = []
        self.flow: Flow | None = None
        self.client_address = b""
        self.deadline = 0.0

    # -- connection --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._gate.transport = self.transport
        ctx = self.ctx
        self.flow = ctx.accepted(self, self._listener, self.transport)
        self.client_address = self.flow.client_address.encode()
        self.deadline = time.monotonic() + ctx.config.timeouts.client_header
        ctx.sweeper.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._lost = True
        self._gate.transport = None
        ctx = self.ctx
        ctx.sweeper.discard(self)
        ctx.connections.get(self._listener, set()).discard(self)
        if self.flow is not None:
            ctx.flows.close(self.flow)
        for ex in self._queue:
            if ex.upstream is not None:
                # The client went away mid-exchange: that upstream connection is in
                # an unknown state, so it is not reused.
                ex.upstream.abandon()
                ex.upstream = None
            self._release(ex)
        self._queue.clear()
        self._parsing = None

    def data_received(self, data: bytes) -> None:
        if self.flow is not None:
            self.flow.bytes_in += len(data)
        if self._upgrading:
            self._tunnel_out(data)
            return
        if self._input_done:
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
                and self._whole_request(data)
            ):
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade_requested(data[upgrade.args[0] :])
            return
        except httptools.HttpParserError as error:
            rejected, self._rejected = self._rejected, None
            if rejected is not None:
                self._reject(rejected.status, rejected.reason, f"{rejected}\n".encode())
            else:
                self._reject(400, parser_error_reason(str(error)), f"{error}\n".encode())
            return
        parsing = self._parsing
        if parsing is not None and parsing.plan is None:
            # A head still incomplete: bound what it may take (huge heads, slowloris).
            self._head_size += len(data)
            if self._head_size > self.ctx.limits.header_bytes:
                self._reject(431, Reason.HEADERS_TOO_LARGE)
                return
        self.flush()

    def eof_received(self) -> bool:
        if self._tunnel is not None:
            self._tunnel.send_eof()
            return True
        # The client sent all it will send: answer what is in flight, then close.
        self._input_done = True
        if not self._queue:
            return False
        self._closing = True
        return True

    def pause_writing(self) -> None:
        """The client reads slower than we write: stop reading its backends."""
        for ex in self._queue:
            if ex.upstream is not None:
                ex.upstream.pause_reading()

    def resume_writing(self) -> None:
        for ex in self._queue:
            if ex.upstream is not None:
                ex.upstream.resume_reading()

    def on_deadline(self) -> None:
        timeouts = self.ctx.config.timeouts
        parsing = self._parsing
        if self._tunnel is not None or self._upgrading:
            self.deadline = 0.0
        elif parsing is not None and self._queue and self._queue[0] is not parsing:
            # An earlier request is still being answered: this one waits (we do not
            # read meanwhile), its clock starts again when its turn comes.
            self.deadline = time.monotonic() + timeouts.client_header
        elif parsing is not None and parsing.plan is None:
            self._reject(408, "header_timeout", b"request head not received in time\n")
        elif parsing is not None:
            # The body stalled: the client's doing, not the backend's.
            if parsing.started:
                self.abort()
            else:
                self.local_response(parsing, 408, b"request body stalled\n")
        elif not self._queue and self.transport is not None:
            self.transport.close()
        else:
            self.deadline = 0.0

    # -- protocol upgrades (WebSocket and the like) -----------------------------------------
    def _upgrade_requested(self, early: bytes) -> None:
        """The parser stopped at an upgrade request: from here on, bytes are the new
        protocol's. They are held until the backend agrees (101), then tunnelled."""
        ex = self._queue[-1] if self._queue else None
        if ex is None or ex.plan is None or not ex.plan.upgrade:
            self._reject(400, Reason.BAD_HEAD, b"unexpected protocol upgrade\n")
            return
        self._parsing = None
        ex.request = RequestState.COMPLETE
        ex.body_held = False  # the client may already be speaking the new protocol
        self._upgrading = True
        self._tunnel_out(early)
        if ex.upstream is not None:
            ex.upstream.request_sent()
        self.flush()

    def _tunnel_out(self, data: bytes) -> None:
        """Client bytes of an upgraded connection: to the backend, or held until the 101."""
        if not data:
            return
        if self._tunnel is not None:
            self._tunnel.send_body(data)
            return
        self._tunnel_pending.append(data)
        if sum(map(len, self._tunnel_pending)) > self.ctx.config.limits.buffer_high_water:
            self._gate.pause(flow_control.BACKLOG)

    # -- the fast path -------------------------------------------------------------------------
    def _whole_request(self, data: bytes) -> bool:
        """Exactly one complete request without a body, nothing in flight: llhttp
        validates it (a parser without callbacks), then the framing core's fast path
        takes it from the raw bytes. False when the fast path does not handle it."""
        light = self._light_parser
        facts = self._light_facts
        if light is None:
            light = self._light_parser = httptools.HttpRequestParser(facts)
            facts.parser = light
        try:
            light.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._light_parser = None
            self._reject(501, Reason.METHOD_NOT_SUPPORTED, b"CONNECT is not supported\n")
            return True
        except httptools.HttpParserError as error:
            self._light_parser = None
            self._reject(400, parser_error_reason(str(error)), f"{error}\n".encode())
            return True
        plan = simple_request(data[:-4], self.client_address, self.ctx.via_line, self.ctx.limits)
        if plan is None:
            return False
        ex = Exchange(facts.method, plan)
        ex.state = ExchangeState.QUEUED
        ex.request = RequestState.COMPLETE
        self._queue.append(ex)
        self.deadline = 0.0
        if self.flow is not None:
            self.flow.requests += 1
        self.dispatch(ex)
        self.flush()
        return True

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

    # -- request parsing (llhttp callbacks) ------------------------------------------------
    def on_message_begin(self) -> None:
        ex = Exchange()
        self._parsing = ex
        self._queue.append(ex)
        self._head_size = 0
        self.deadline = time.monotonic() + self.ctx.config.timeouts.client_header
        if len(self._queue) > 1:
            # Pipelined: read no further until the earlier responses are out.
            self._gate.pause(flow_control.PIPELINE)

    def on_url(self, url: bytes) -> None:
        assert self._parsing is not None
        self._parsing.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._parsing is not None
        self._parsing.headers.append((name, value))

    def on_headers_complete(self) -> None:
        ex = self._parsing
        assert ex is not None
        parser = self._parser
        method = parser.get_method()
        ex.method = method.decode("latin-1")
        try:
            plan = plan_request(
                method,
                ex.url,
                parser.get_http_version(),
                ex.headers,
                self.client_address,
                self.ctx.via_line,
                self.ctx.limits,
            )
            if plan.upgrade != parser.should_upgrade():
                raise Rejected(Reason.BAD_HEAD, 400, "ambiguous protocol upgrade")
        except Rejected as rejected:
            self._rejected = rejected  # reported when llhttp stops on the raised error
            raise
        ex.plan = plan
        ex.state = ExchangeState.QUEUED
        if plan.body is Body.NONE:
            self.deadline = 0.0
        else:
            self.deadline = time.monotonic() + self.ctx.config.timeouts.client_body_idle
        if self.flow is not None:
            self.flow.requests += 1
        if ex is self._queue[0]:
            self.dispatch(ex)

    def on_body(self, body: bytes) -> None:
        ex = self._parsing
        assert ex is not None
        self.deadline = time.monotonic() + self.ctx.config.timeouts.client_body_idle
        self._body_out(ex, chunk(body) if ex.body is Body.CHUNKED else body)

    def on_message_complete(self) -> None:
        ex = self._parsing
        assert ex is not None
        self._parsing = None
        self.deadline = 0.0
        ex.request = RequestState.COMPLETE
        if ex.body is Body.CHUNKED:
            self._body_out(ex, LAST_CHUNK)
        if ex.upstream is not None:
            ex.upstream.request_sent()

    def _body_out(self, ex: Exchange, data: bytes) -> None:
        """Request body bytes: to the backend when it is connected, and held for as long
        as a retry may still need them (or until it is connected)."""
        upstream = ex.upstream
        if upstream is not None:
            upstream.send_body(data)
            if not ex.body_held:
                return
            if not self._retry_possible(ex) or ex.body_buffered + len(data) > RETRY_BODY_LIMIT:
                self._drop_body(ex)
                return
        elif ex.started:
            return  # answered already (e.g. refused): the rest of the body goes nowhere
        ex.body_buffer.append(data)
        ex.body_buffered += len(data)
        if upstream is None and ex.body_buffered > self.ctx.config.limits.buffer_high_water:
            self._gate.pause(flow_control.BACKLOG)

    def _retry_possible(self, ex: Exchange) -> bool:
        return may_retry(
            ex.state,
            ex.method,
            ex.attempts,
            ex.body_held,
            self.ctx.config.retry_idempotent,
            UpstreamFailure.CLOSED_BEFORE_RESPONSE,
        )

    def _drop_body(self, ex: Exchange) -> None:
        ex.body_buffer.clear()
        ex.body_buffered = 0
        ex.body_held = False
        self._gate.resume(flow_control.BACKLOG)

    # -- dispatch ------------------------------------------------------------------------------
    def _hash_key(self, ex: Exchange) -> bytes:
        key_cfg = self.ctx.config.pool.hash_key
        if key_cfg.kind is HashKeyKind.CLIENT_ADDRESS or key_cfg.name is None:
            return self.client_address
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
        return self.client_address

    def dispatch(self, ex: Exchange, exclude: Backend | None = None) -> None:
        if ex.rejection is not None:
            status, _, detail = ex.rejection
            self.local_response(ex, status, detail)
            return
        ctx = self.ctx
        pool = ctx.pool
        keyed = pool.algorithm is Algorithm.MAGLEV or pool.affinity is not None
        key = self._hash_key(ex) if keyed else b""
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
            self._start(ex, upstream)
            return
        ex.state = ExchangeState.CONNECTING
        spawn(self._connect(ex, backend))

    async def _connect(self, ex: Exchange, backend: Backend) -> None:
        ctx = self.ctx
        upstream, detail = await connect_backend(
            lambda: L7UpstreamProtocol(backend, ctx),
            backend,
            ctx.config.timeouts.upstream_connect,
            ctx.vrf,
        )
        if ex.backend is not backend or ex.state is not ExchangeState.CONNECTING:
            if upstream is not None:
                upstream.release()  # the request is gone meanwhile
            return
        if upstream is None:
            self.upstream_failed(ex, UpstreamFailure.CONNECT_FAILED, detail)
            return
        if self._lost:
            upstream.release()
            return
        self._start(ex, upstream)

    def _start(self, ex: Exchange, upstream: L7UpstreamProtocol) -> None:
        upstream.start(self, ex)
        if ex.body_buffer and not self._retry_possible(ex):
            self._drop_body(ex)
        else:
            self._gate.resume(flow_control.BACKLOG)

    def _release(self, ex: Exchange) -> None:
        if ex.backend is not None:
            ex.backend.active_connections -= 1
            ex.backend = None

    def _report(
        self, ex: Exchange, backend: Backend, failure: UpstreamFailure, detail: str
    ) -> None:
        """At most one failure per request counts toward ejecting a backend."""
        backend.failures_total += 1
        if failure in EVIDENCE and not ex.reported and self.ctx.config.health.passive.enabled:
            ex.reported = True
            self.ctx.on_passive_failure(backend, f"{failure}: {detail}")

    # -- ExchangeOwner: what the upstream side may tell us -------------------------------
    def write(self, data: bytes) -> None:
        self.out.append(data)

    def keep_alive_allowed(self) -> bool:
        return not self._closing and not self.ctx.is_draining()

    def response_head(self, ex: Exchange, status: int) -> None:
        backend = ex.backend
        if backend is not None:
            if status in (502, 503, 504) and self.ctx.config.health.passive.eject_on_gateway_errors:
                self._report(ex, backend, UpstreamFailure.GATEWAY_ERROR, f"answered HTTP {status}")
            elif backend.outlier.consecutive:
                self.ctx.pool.passive_success(backend)
        if ex.body_buffer:
            self._drop_body(ex)

    def response_complete(self, ex: Exchange, keep_alive: bool) -> None:
        self._release(ex)
        ex.upstream = None
        ex.state = ExchangeState.DONE
        queue = self._queue
        if queue and queue[0] is ex:
            queue.popleft()
        # A response that came before its request was all read: the rest of that
        # request cannot be told from a next one without reading it, so we close.
        keep = keep_alive and ex.request is RequestState.COMPLETE and not self._closing
        if not keep:
            self.flush()
            self._closing = True
            if self.transport is not None:
                self.transport.close()
            return
        if queue:
            nxt = queue[0]
            if nxt.state is ExchangeState.QUEUED:
                self.dispatch(nxt)
            elif nxt.state is ExchangeState.PARSING:
                self.deadline = time.monotonic() + self.ctx.config.timeouts.client_header
        else:
            idle = 1.0 if self.ctx.is_draining() else self.ctx.config.timeouts.keep_alive_idle
            self.deadline = time.monotonic() + idle
        if len(queue) <= 1:
            self._gate.resume(flow_control.PIPELINE)

    def _attempt_failed(
        self, ex: Exchange, failure: UpstreamFailure, detail: str
    ) -> Backend | None:
        backend = ex.backend
        ex.upstream = None
        self._release(ex)
        if backend is not None:
            self._report(ex, backend, failure, detail)
        return backend

    def upstream_failed(self, ex: Exchange, failure: UpstreamFailure, detail: str) -> None:
        """The attempt failed before any response byte reached the client."""
        backend = self._attempt_failed(ex, failure, detail)
        if self._lost or ex not in self._queue:
            return
        if may_retry(
            ex.state,
            ex.method,
            ex.attempts,
            ex.body_held,
            self.ctx.config.retry_idempotent,
            failure,
        ):
            ex.state = ExchangeState.QUEUED
            self.dispatch(ex, exclude=backend)
            return
        if failure in _TIMEOUTS:
            self.local_response(ex, 504, b"backend timed out\n")
        else:
            self.local_response(ex, 502, b"backend failed\n")
        self.flush()

    def response_broken(self, ex: Exchange, failure: UpstreamFailure, detail: str) -> None:
        self._attempt_failed(ex, failure, detail)
        # Part of the response is out: the client can only learn by the connection breaking.
        self.flush()
        self.abort()

    def backend_rejected(self, reason: str) -> None:
        self.ctx.rejected("backend", reason)

    def tunnel_established(self, upstream: Upstream) -> None:
        self._tunnel = upstream
        self.deadline = 0.0
        if self._tunnel_pending:
            upstream.send_body(b"".join(self._tunnel_pending))
            self._tunnel_pending.clear()
        self._gate.resume(flow_control.BACKLOG)

    def tunnel_ended(self, clean: bool) -> None:
        if self.transport is not None:
            if clean:
                self.transport.close()
            else:
                self.transport.abort()

    def tunnel_eof(self) -> None:
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()

    def pause_reading(self) -> None:
        self._gate.pause(flow_control.PEER_FULL)

    def resume_reading(self) -> None:
        self._gate.resume(flow_control.PEER_FULL)

    # -- our own answers --------------------------------------------------------------------
    def local_response(self, ex: Exchange, status: int, body: bytes) -> None:
        """Answer a request ourselves (errors); the connection closes unless all is well."""
        if ex.upstream is not None:
            ex.upstream.abandon()
            ex.upstream = None
        close = (
            status in _CLOSING
            or ex.request is RequestState.RECEIVING
            or ex.plan is None
            or not ex.plan.keep_alive
            or not self.keep_alive_allowed()
        )
        head = (b"HTTP/1.1 %d %b\r\nContent-Type: text/plain\r\nContent-Length: %d%b%b\r\n\r\n") % (
            status,
            REASONS.get(status, b"Error"),
            len(body),
            self.ctx.via_line,
            b"\r\nConnection: close" if close else b"",
        )
        self.out.append(head + body)
        ex.state = ExchangeState.RESPONDING
        self.response_complete(ex, keep_alive=not close)
        self.flush()

    def _reject(self, status: int, reason: str, detail: bytes = b"") -> None:
        """A request refused by the framing core: never forwarded; answered in its turn
        (after the responses to earlier pipelined requests), then the connection closes."""
        self.ctx.rejected("client", reason)
        ex = self._parsing
        if ex is None:
            ex = Exchange()
            self._queue.append(ex)
        self._parsing = None
        self._input_done = True
        self._gate.pause(flow_control.BACKLOG)
        ex.rejection = (status, reason, detail)
        ex.state = ExchangeState.QUEUED
        ex.request = RequestState.COMPLETE
        if ex is self._queue[0]:
            self.dispatch(ex)
        self.flush()


class _HeadFacts:
    """The protocol of the validating parser: only what the head says, read while the
    parser is on it (after the message, llhttp has already reset its flags)."""

    def __init__(self) -> None:
        self.parser: httptools.HttpRequestParser | None = None
        self.method = ""

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None
        self.method = parser.get_method().decode("latin-1")
