"""The L4 TCP listener: a byte proxy from each client connection to one backend.

BufferedProtocol reads into one shared buffer (callbacks never overlap on one
loop); the buffer is handed straight to the other side's `write`. When that
write could not finish at once the transport keeps a reference to the buffer,
so a fresh one is allocated for the next read. Client bytes that arrive before
the backend connection is up are kept and sent in one write when it is.

FIN, close and RST on either side go through the flow's pure state machine
(`l4_flow.FlowState`), which says what to pass on and when to close: every flow
ends with both sockets closed. A flow idle (no byte either way) for
`timeouts.l4_idle` is closed.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

from edge.flows import Flow
from edge.pool import Backend
from edge.proxy.common import ProxyContext, connect_backend, set_nodelay, spawn
from edge.proxy.l4_flow import Action, Event, FlowState

_READ_SIZE = 65536


class _SharedBuffer:
    buf = bytearray(_READ_SIZE)
    view = memoryview(buf)

    @classmethod
    def renew(cls) -> None:
        cls.buf = bytearray(_READ_SIZE)
        cls.view = memoryview(cls.buf)


class L4ClientProtocol(asyncio.BufferedProtocol):
    """The client side of one flow, and the driver of its `FlowState`."""

    __slots__ = (
        "_backend",
        "_ctx",
        "_flow",
        "_idle",
        "_listener",
        "_pending",
        "_state",
        "_transport",
        "_upstream",
        "deadline",
    )

    def __init__(self, ctx: ProxyContext, listener: str) -> None:
        self._ctx = ctx
        self._listener = listener
        self._transport: asyncio.Transport | None = None
        self._upstream: L4UpstreamProtocol | None = None
        self._pending: list[bytes] = []
        self._backend: Backend | None = None
        self._flow: Flow | None = None
        self._state = FlowState()
        self._idle = ctx.config.timeouts.l4_idle
        self.deadline = 0.0

    # -- the state machine's actions -------------------------------------------------
    def _on(self, event: Event) -> None:
        for action in self._state.on(event):
            upstream = self._upstream.transport if self._upstream is not None else None
            client = self._transport
            if action is Action.SHUT_BACKEND:
                if upstream is not None and upstream.can_write_eof() and not upstream.is_closing():
                    upstream.write_eof()
            elif action is Action.SHUT_CLIENT:
                if client is not None and client.can_write_eof() and not client.is_closing():
                    client.write_eof()
            elif action is Action.CLOSE_CLIENT:
                if client is not None:
                    client.close()
            elif action is Action.CLOSE_BACKEND:
                if upstream is not None:
                    upstream.close()
            elif action is Action.ABORT_CLIENT:
                if client is not None:
                    client.abort()
            elif upstream is not None:  # ABORT_BACKEND
                upstream.abort()

    @property
    def state(self) -> FlowState:
        return self._state

    # -- client side -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        transport = self._transport
        ctx = self._ctx
        self._flow = flow = ctx.accepted(self, self._listener, transport)
        self.deadline = time.monotonic() + self._idle
        ctx.sweeper.add(self)
        backend = ctx.pool.pick(flow.client_address.encode())
        if backend is None:
            self._on(Event.CONNECT_FAILED)
            return
        self._connect(backend, retry=True)

    def _connect(self, backend: Backend, retry: bool) -> None:
        self._backend = backend
        backend.active_connections += 1
        backend.connections_total += 1
        if self._flow is not None:
            self._flow.backend = backend.name
        spawn(self._open_upstream(backend, retry))

    async def _open_upstream(self, backend: Backend, retry: bool) -> None:
        ctx = self._ctx
        upstream, detail = await connect_backend(
            lambda: L4UpstreamProtocol(self), backend, ctx.config.timeouts.upstream_connect, ctx.vrf
        )
        if upstream is None:
            if self._backend is backend:  # not yet released by connection_lost
                backend.active_connections -= 1
                self._backend = None
            backend.failures_total += 1
            if ctx.config.health.passive.enabled:
                ctx.on_passive_failure(backend, detail)  # one per flow: the connect
            if self._state.ended:
                return
            # Nothing was sent yet: a new connection to another backend is safe.
            other = ctx.pool.pick(self._key(), exclude=backend) if retry else None
            if other is None:
                self._on(Event.CONNECT_FAILED)
                return
            self._connect(other, retry=False)
            return
        if self._state.ended and upstream.transport is not None:
            upstream.transport.close()

    def _key(self) -> bytes:
        return self._flow.client_address.encode() if self._flow else b""

    def get_buffer(self, sizehint: int) -> memoryview:
        return _SharedBuffer.view

    def buffer_updated(self, nbytes: int) -> None:
        upstream = self._upstream
        self.deadline = time.monotonic() + self._idle
        if self._flow is not None:
            self._flow.bytes_in += nbytes
        if upstream is None or upstream.transport is None:
            self._pending.append(bytes(_SharedBuffer.view[:nbytes]))
            if sum(map(len, self._pending)) > self._ctx.config.limits.buffer_high_water:
                assert self._transport is not None
                self._transport.pause_reading()
            return
        transport = upstream.transport
        transport.write(_SharedBuffer.view[:nbytes])
        if transport.get_write_buffer_size():
            _SharedBuffer.renew()

    def eof_received(self) -> bool:
        self._on(Event.CLIENT_FIN)
        return True  # half-close: the backend's answer may still come; the machine closes

    def connection_lost(self, exc: Exception | None) -> None:
        ctx = self._ctx
        self._on(Event.CLIENT_RESET if exc is not None else Event.CLIENT_CLOSED)
        self._transport = None
        ctx.connections.get(self._listener, set()).discard(self)
        if self._flow is not None:
            ctx.flows.close(self._flow)
        self._release_backend()
        self._forget_if_gone()

    def _forget_if_gone(self) -> None:
        """Both sockets are gone: nothing left to sweep."""
        if self._transport is None and (self._upstream is None or self._upstream.transport is None):
            self._ctx.sweeper.discard(self)
            self.deadline = 0.0

    def on_deadline(self) -> None:
        self._on(Event.IDLE)
        self.deadline = time.monotonic() + self._idle  # the abort if the close stalls

    def close_when_idle(self, grace: float) -> None:
        pass  # a byte stream has no idea of idle: it finishes or meets the drain deadline

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _release_backend(self) -> None:
        if self._backend is not None:
            self._backend.active_connections -= 1
            if self._flow is not None:
                self._backend.bytes_in += self._flow.bytes_in
                self._backend.bytes_out += self._flow.bytes_out
            self._backend = None

    def pause_writing(self) -> None:
        if self._upstream is not None and self._upstream.transport is not None:
            self._upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self._upstream is not None and self._upstream.transport is not None:
            self._upstream.transport.resume_reading()

    # -- called by the upstream side -------------------------------------------------
    def upstream_ready(self, upstream: L4UpstreamProtocol) -> None:
        self._upstream = upstream
        assert upstream.transport is not None
        if self._state.ended:
            upstream.transport.close()
            return
        if self._pending:
            upstream.transport.write(b"".join(self._pending))
            self._pending.clear()
            if self._transport is not None:
                self._transport.resume_reading()
        self._on(Event.CONNECTED)

    def upstream_data(self, view: memoryview) -> None:
        transport = self._transport
        self.deadline = time.monotonic() + self._idle
        if transport is None or transport.is_closing():
            return
        if self._flow is not None:
            self._flow.bytes_out += len(view)
        transport.write(view)
        if transport.get_write_buffer_size():
            _SharedBuffer.renew()

    def upstream_eof(self) -> bool:
        self._on(Event.BACKEND_FIN)
        return True

    def upstream_lost(self, exc: Exception | None) -> None:
        # A reset after the connection was up fails this flow only: not evidence
        # that the backend is down (its active checks say that).
        self._on(Event.BACKEND_RESET if exc is not None else Event.BACKEND_CLOSED)
        self._forget_if_gone()

    def upstream_pause(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def upstream_resume(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()


class L4UpstreamProtocol(asyncio.BufferedProtocol):
    __slots__ = ("_client", "started", "transport")

    def __init__(self, client: L4ClientProtocol) -> None:
        self._client = client
        self.transport: asyncio.Transport | None = None
        self.started = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        set_nodelay(transport)
        transport.set_write_buffer_limits(high=self._client._ctx.config.limits.buffer_high_water)
        self._client.upstream_ready(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _SharedBuffer.view

    def buffer_updated(self, nbytes: int) -> None:
        self._client.upstream_data(_SharedBuffer.view[:nbytes])

    def eof_received(self) -> bool:
        return self._client.upstream_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._client.upstream_lost(exc)

    def pause_writing(self) -> None:
        self._client.upstream_pause()

    def resume_writing(self) -> None:
        self._client.upstream_resume()
