"""The upstream side of L7: one keep-alive connection to a backend, one exchange at a time.

It reads the response, has the framing core decide its head, and streams the
body to the exchange's owner (the client connection) through `ExchangeOwner`,
delimited as that decision says: Content-Length bodies counted and passed as
they are, chunked bodies decoded by llhttp and re-chunked, close-delimited
bodies re-chunked (or, toward an HTTP/1.0 client, passed until the close).

Timers, one meaning each: the first byte must arrive within
`upstream_first_byte` of the request having been sent in full; after that,
each read within `upstream_read_idle` (not counted while the client is the
one not reading); idle pooled connections close after `upstream_idle`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from typing import cast

import httptools

from edge.pool import Backend
from edge.proxy import flow_control
from edge.proxy.common import ProxyContext, set_nodelay
from edge.proxy.exchange import (
    Exchange,
    ExchangeOwner,
    ExchangeState,
    RequestState,
    UpstreamFailure,
)
from edge.proxy.flow_control import ReadGate
from edge.proxy.framing import (
    CHUNKED_PREAMBLE,
    LAST_CHUNK,
    Body,
    Rejected,
    ResponsePlan,
    chunk,
    plan_response,
)

log = logging.getLogger(__name__)


class UpstreamState(enum.StrEnum):
    IDLE = "idle"  # in the pool, or just connected
    SENDING = "sending"  # request head sent, body still coming from the client
    WAITING = "waiting"  # request sent in full: the first-byte timer runs
    READING = "reading"  # response bytes are arriving
    TUNNEL = "tunnel"


class L7UpstreamProtocol(asyncio.Protocol):
    def __init__(self, backend: Backend, ctx: ProxyContext) -> None:
        self.backend = backend
        self.ctx = ctx
        self.transport: asyncio.Transport | None = None
        self.state = UpstreamState.IDLE
        self._gate = ReadGate()
        self._parser: httptools.HttpResponseParser | None = None
        self._owner: ExchangeOwner | None = None
        self._ex: Exchange | None = None
        self._head_buf = b""
        self._head_done = False  # the final head went to the client
        self._plan: ResponsePlan | None = None
        # Body bytes still expected for a Content-Length response.
        self._remaining = 0
        self.deadline = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._gate.transport = self.transport
        set_nodelay(self.transport)
        self.transport.set_write_buffer_limits(high=self.ctx.config.limits.buffer_high_water)
        self.ctx.sweeper.add(self)

    # -- driven by the client side (the `Upstream` protocol) ----------------------------
    def start(self, owner: ExchangeOwner, ex: Exchange) -> None:
        """Send one request (head and the body held so far) on this connection."""
        assert ex.plan is not None and self.transport is not None
        self._owner, self._ex = owner, ex
        self._head_done = False
        self._plan = None
        ex.upstream = self
        ex.state = ExchangeState.WAITING
        self.state = UpstreamState.SENDING
        self.deadline = 0.0
        body = ex.body_buffer
        self.transport.write(ex.plan.head + b"".join(body) if body else ex.plan.head)
        if ex.request is RequestState.COMPLETE:
            self.request_sent()

    def send_body(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def send_eof(self) -> None:
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()

    def request_sent(self) -> None:
        """The whole request is on its way: from now the backend has to answer."""
        if self.state is UpstreamState.SENDING:
            self.state = UpstreamState.WAITING
            self.deadline = time.monotonic() + self.ctx.config.timeouts.upstream_first_byte

    def pause_reading(self) -> None:
        """The client reads slower than this backend sends."""
        self._gate.pause(flow_control.PEER_FULL)
        if self.state is UpstreamState.READING:
            self.deadline = 0.0  # a slow reader is not the backend's fault

    def resume_reading(self) -> None:
        self._gate.resume(flow_control.PEER_FULL)
        if self.state is UpstreamState.READING:
            self.deadline = time.monotonic() + self.ctx.config.timeouts.upstream_read_idle

    def abandon(self) -> None:
        """The client is gone mid-exchange: this connection is in an unknown state."""
        self._owner = None
        self._ex = None
        if self.transport is not None:
            self.transport.close()

    def release(self) -> None:
        """Back to the idle pool, or closed."""
        self._owner = None
        self._ex = None
        self.state = UpstreamState.IDLE
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._gate.resume(flow_control.PEER_FULL)
        if self.backend.retired or not self.ctx.idle_upstreams.put(
            self.backend, self, self.ctx.config.limits.upstream_pool_size
        ):
            transport.close()
            return
        self.deadline = time.monotonic() + self.ctx.config.timeouts.upstream_idle

    def on_deadline(self) -> None:
        state = self.state
        if state is UpstreamState.WAITING:
            self._fail(UpstreamFailure.FIRST_BYTE_TIMEOUT, "no response in time")
        elif state is UpstreamState.READING:
            self._fail(UpstreamFailure.READ_TIMEOUT, "response stalled")
        elif self.transport is not None:
            self.transport.abort()

    # -- reading the response ------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        ex, owner = self._ex, self._owner
        if ex is None or owner is None:
            # Bytes on an idle connection: the backend broke protocol.
            if self.transport is not None:
                self.transport.abort()
            return
        if self.state is UpstreamState.TUNNEL:
            owner.write(data)
            owner.flush()
            return
        if self.state is not UpstreamState.READING:
            self.state = UpstreamState.READING
            if ex.state is ExchangeState.WAITING:
                ex.state = ExchangeState.RESPONDING  # no retry once the backend answers
        if not self._gate.paused:
            self.deadline = time.monotonic() + self.ctx.config.timeouts.upstream_read_idle
        if not self._head_done:
            if self._head_buf:
                data = self._head_buf + data
                self._head_buf = b""
            rest = self._take_head(data, ex, owner)
            if rest is None:
                owner.flush()
                return
            data = rest
        plan = self._plan
        assert plan is not None
        if plan.body is Body.LENGTH:
            # Counted and passed on as it is; no parser needed.
            remaining = self._remaining
            size = len(data)
            if size < remaining:
                self._remaining = remaining - size
                owner.write(data)
            else:
                owner.write(data[:remaining] if size > remaining else data)
                # Bytes beyond what it announced: the backend broke protocol.
                self._finish(ex, owner, plan, reusable=plan.upstream_reusable and size == remaining)
            owner.flush()
            return
        if plan.body is Body.UNTIL_CLOSE:
            if data:
                owner.write(chunk(data) if plan.to_client is Body.CHUNKED else data)
            owner.flush()
            return
        parser = self._parser
        assert parser is not None
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as error:
            owner.flush()
            self._fail(UpstreamFailure.BAD_RESPONSE, f"bad chunked body: {error}")
            return
        owner.flush()

    def _take_head(self, data: bytes, ex: Exchange, owner: ExchangeOwner) -> bytes | None:
        """Decide the response head(s) at the start of `data`; the body bytes that
        follow the final head, or None when nothing is left to do with this read."""
        assert ex.plan is not None
        limits = self.ctx.limits
        pos = 0
        while True:
            end = data.find(b"\r\n\r\n", pos)
            if end < 0:
                if len(data) - pos > limits.header_bytes:
                    owner.backend_rejected("headers_too_large")
                    self._fail(UpstreamFailure.BAD_RESPONSE, "response head too large")
                    return None
                self._head_buf = data[pos:]
                return None
            try:
                plan = plan_response(
                    data[pos:end],
                    self.ctx.via_line,
                    head_request=ex.method == "HEAD",
                    client_http10=ex.plan.http_10,
                    # An upgrade refused: the client may have sent bytes of the new
                    # protocol already, so its connection closes after the answer.
                    keep_alive=ex.plan.keep_alive and owner.keep_alive_allowed(),
                    upgrade=ex.plan.upgrade,
                    limits=limits,
                )
            except Rejected as rejected:
                owner.backend_rejected(rejected.reason)
                self._fail(UpstreamFailure.BAD_RESPONSE, f"bad response: {rejected}")
                return None
            pos = end + 4
            if plan.status == 101:
                # The backend switched protocols: its 101 goes on, then only bytes.
                owner.write(plan.head)
                self.state = UpstreamState.TUNNEL
                ex.state = ExchangeState.TUNNEL
                self.deadline = 0.0
                self._head_done = True
                owner.tunnel_established(self)
                if pos < len(data):
                    owner.write(data[pos:])
                owner.flush()
                return None
            if plan.status >= 200:
                break
            # 1xx (100 Continue, 103 Early Hints): passed on; the final answer follows.
            if not ex.plan.http_10:
                owner.write(plan.head)
        self._plan = plan
        self._head_done = True
        owner.response_head(ex, plan.status)
        if self._owner is None:
            return None
        owner.write(plan.head)
        if plan.body is Body.NONE or (plan.body is Body.LENGTH and plan.length == 0):
            # Bytes after a body-less response: the backend broke protocol.
            self._finish(ex, owner, plan, reusable=plan.upstream_reusable and pos == len(data))
            return None
        if plan.body is Body.LENGTH:
            self._remaining = plan.length
        elif plan.body is Body.CHUNKED:
            # llhttp decodes the chunks by our decision, not by its own reading of the head.
            self._parser = parser = httptools.HttpResponseParser(self)
            parser.feed_data(CHUNKED_PREAMBLE)
        return data[pos:]

    # llhttp callbacks (chunked bodies only).
    def on_body(self, body: bytes) -> None:
        owner, plan = self._owner, self._plan
        if owner is not None and plan is not None:
            owner.write(chunk(body) if plan.to_client is Body.CHUNKED else body)

    def on_message_complete(self) -> None:
        ex, owner, plan = self._ex, self._owner, self._plan
        if ex is None or owner is None or plan is None:
            # A second message in one response: the backend broke protocol.
            if self.transport is not None:
                self.transport.abort()
            return
        if plan.to_client is Body.CHUNKED:
            owner.write(LAST_CHUNK)
        self._finish(ex, owner, plan, reusable=plan.upstream_reusable)

    def _finish(
        self, ex: Exchange, owner: ExchangeOwner, plan: ResponsePlan, reusable: bool
    ) -> None:
        self._ex = None
        self._owner = None
        self.deadline = 0.0
        self._plan = None
        reusable = reusable and ex.request is RequestState.COMPLETE
        ex.state = ExchangeState.DONE
        owner.response_complete(ex, keep_alive=plan.keep_alive)
        if reusable:
            self.release()
        else:
            self.state = UpstreamState.IDLE
            if self.transport is not None:
                self.transport.close()

    def _fail(self, failure: UpstreamFailure, detail: str) -> None:
        ex, owner = self._ex, self._owner
        self._ex = None
        self._owner = None
        self.state = UpstreamState.IDLE
        if self.transport is not None:
            self.transport.abort()
        if ex is None or owner is None:
            return
        if self._head_done:
            owner.response_broken(ex, failure, detail)
        else:
            owner.upstream_failed(ex, failure, detail)

    # -- flow control and the end of the connection ----------------------------------------
    def pause_writing(self) -> None:
        if self._owner is not None:
            self._owner.pause_reading()

    def resume_writing(self) -> None:
        if self._owner is not None:
            self._owner.resume_reading()

    def eof_received(self) -> bool:
        if self.state is UpstreamState.TUNNEL and self._owner is not None:
            self._owner.tunnel_eof()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._gate.transport = None
        self.ctx.sweeper.discard(self)
        self.ctx.idle_upstreams.remove(self.backend, self)
        ex, owner, plan = self._ex, self._owner, self._plan
        self._ex = None
        self._owner = None
        if ex is None or owner is None:
            return
        if self.state is UpstreamState.TUNNEL:
            owner.tunnel_ended(clean=exc is None)
            return
        if not self._head_done:
            failure = (
                UpstreamFailure.RESET_BEFORE_RESPONSE
                if exc is not None
                else UpstreamFailure.CLOSED_BEFORE_RESPONSE
            )
            owner.upstream_failed(ex, failure, f"connection lost: {exc or 'closed'}")
            return
        if plan is not None and plan.body is Body.UNTIL_CLOSE and exc is None:
            if plan.to_client is Body.CHUNKED:
                owner.write(LAST_CHUNK)
            self._finish(ex, owner, plan, reusable=False)
            owner.flush()
            return
        owner.response_broken(
            ex, UpstreamFailure.LOST_MID_RESPONSE, f"connection lost mid-response: {exc or 'EOF'}"
        )
