"""The L4 TCP listener: a byte proxy from each client connection to one backend.

BufferedProtocol reads into one shared buffer (callbacks never overlap on one
loop); the buffer is handed straight to the other side's `write`. When that
write could not finish at once the transport keeps a reference to the buffer,
so a fresh one is allocated for the next read. Client bytes that arrive before
the backend connection is up are kept and sent in one write when it is.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

from edge.flows import Flow
from edge.pool import Backend
from edge.proxy.common import ProxyContext, connect_backend, set_nodelay, spawn

_READ_SIZE = 65536


class _SharedBuffer:
    buf = bytearray(_READ_SIZE)
    view = memoryview(buf)

    @classmethod
    def renew(cls) -> None:
        cls.buf = bytearray(_READ_SIZE)
        cls.view = memoryview(cls.buf)


class L4ClientProtocol(asyncio.BufferedProtocol):
    __slots__ = (
        "_backend",
        "_closed",
        "_ctx",
        "_eof_pending",
        "_flow",
        "_listener",
        "_pending",
        "_transport",
        "_upstream",
    )

    def __init__(self, ctx: ProxyContext, listener: str) -> None:
        self._ctx = ctx
        self._listener = listener
        self._transport: asyncio.Transport | None = None
        self._upstream: L4UpstreamProtocol | None = None
        self._pending: list[bytes] = []
        self._backend: Backend | None = None
        self._flow: Flow | None = None
        self._closed = False
        self._eof_pending = False

    # -- client side -------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        transport = self._transport
        ctx = self._ctx
        self._flow = flow = ctx.accepted(self, self._listener, transport)
        backend = ctx.pool.pick(flow.client_address.encode())
        if backend is None:
            transport.abort()
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
            lambda: L4UpstreamProtocol(self), backend, ctx.config.timeouts.connect
        )
        if upstream is None:
            if self._backend is backend:  # not yet released by connection_lost
                backend.active_connections -= 1
                self._backend = None
            backend.failures_total += 1
            ctx.on_passive_failure(backend, detail)
            if self._closed:
                return
            # Nothing was sent yet: a new connection to another backend is safe.
            other = ctx.pool.pick(self._key(), exclude=backend) if retry else None
            if other is None:
                assert self._transport is not None
                self._transport.abort()
                return
            self._connect(other, retry=False)
            return
        if self._closed:
            if upstream.transport is not None:
                upstream.transport.close()
            return
        self._upstream = upstream

    def _key(self) -> bytes:
        return self._flow.client_address.encode() if self._flow else b""

    def get_buffer(self, sizehint: int) -> memoryview:
        return _SharedBuffer.view

    def buffer_updated(self, nbytes: int) -> None:
        upstream = self._upstream
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
        upstream = self._upstream
        if upstream is not None and upstream.transport is not None:
            if upstream.transport.can_write_eof():
                upstream.transport.write_eof()
        else:
            self._eof_pending = True  # passed on once the backend connection is up
        return True  # half-close: keep sending the backend's answer

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        ctx = self._ctx
        ctx.connections.get(self._listener, set()).discard(self)
        if self._flow is not None:
            ctx.flows.close(self._flow)
        upstream = self._upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.close()
        self._release_backend()

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

    # -- called by the upstream side --------------------------------------
    def upstream_ready(self, upstream: L4UpstreamProtocol) -> None:
        self._upstream = upstream
        assert upstream.transport is not None
        if self._pending:
            upstream.transport.write(b"".join(self._pending))
            self._pending.clear()
            assert self._transport is not None
            self._transport.resume_reading()
        if self._eof_pending and upstream.transport.can_write_eof():
            upstream.transport.write_eof()

    def upstream_data(self, view: memoryview) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._flow is not None:
            self._flow.bytes_out += len(view)
        transport.write(view)
        if transport.get_write_buffer_size():
            _SharedBuffer.renew()

    def upstream_eof(self) -> bool:
        transport = self._transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()
            return True
        return False

    def upstream_lost(self, exc: Exception | None) -> None:
        if exc is not None and self._backend is not None:
            self._backend.failures_total += 1
            self._ctx.on_passive_failure(self._backend, f"connection reset: {exc}")
        if self._transport is not None:
            self._transport.close()

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
