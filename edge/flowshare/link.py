"""The streams among peers: TCP between the edges' own addresses, length-prefixed frames.

Each node keeps one outbound connection per peer carrying its own flows (a snapshot on
every connect, then deltas, a heartbeat when idle or unanswered), and reads the peer's
acks and keepalives on it; it serves inbound connections from its peers, applies their
frames and acks each one, and answers each heartbeat at once. A stream the keepalive
rule (`keepalive`) finds dead is aborted: the sender reconnects with a snapshot. A
frame that fails `wire.decode` or the replay check, or whose sender is not the peer at
that address, is counted, logged (rate-limited) and ignored; a stream that stops making
sense (a length beyond the bound) is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from edge.flowshare import keepalive, wire
from edge.flowshare.barrier import Attempt, on_attempt
from edge.flowshare.keepalive import Stream, Verdict
from edge.flowshare.wire import (
    Ack,
    Delta,
    FlowKey,
    Frame,
    FrameError,
    Keepalive,
    Op,
    Verifier,
)

log = logging.getLogger("edge.flowshare.link")

_LENGTH = struct.Struct("!I")
RECONNECT_S = (0.1, 1.0)
MAX_QUEUED = 10_000  # frames waiting for one peer
CONNECT_TIMEOUT_S = 2.0
DIRECT_WRITE_BYTES = 64 * 1024  # beyond this much unsent, frames wait in the queue


def _timed_out(error: OSError | TimeoutError) -> bool:
    return isinstance(error, TimeoutError) or error.errno in (errno.ETIMEDOUT, errno.EHOSTUNREACH)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if size > wire.MAX_FRAME:
        raise FrameError(f"a frame of {size} bytes announced (at most {wire.MAX_FRAME})")
    return await reader.readexactly(size)


def no_delay(writer: asyncio.StreamWriter, user_timeout_ms: int = 0) -> None:
    """Frames are small and latency is the point: no Nagle. With `user_timeout_ms`, the
    kernel aborts the stream when what it sent stays unacknowledged that long (a peer that
    vanished without a RST: a killed container, a cut link; TCP's own retries would keep
    the stream "up", and the peer without our flows, for many minutes). The heartbeats
    keep something in flight."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if user_timeout_ms:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout_ms)


def framed(data: bytes) -> bytes:
    return _LENGTH.pack(len(data)) + data


@dataclass
class Identity:
    me: str
    boot: int
    key: bytes


class Refusals:
    """Refused frames by reason; logs the first of each reason and then every 100th."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def __call__(self, origin: str, reason: str) -> None:
        self.counts[reason] += 1
        if self.counts[reason] % 100 == 1:
            log.warning("flowshare: refused a frame from %s: %s", origin, reason)


class Outbound:
    """This node's flows to one peer."""

    def __init__(
        self,
        ident: Identity,
        peer: str,
        address: tuple[str, int],
        local_address: str,
        snapshot: Callable[[], list[FlowKey]],
        verifier: Verifier,
        refused: Refusals,
        on_ack: Callable[[str, Ack], None],
        timeout_s: float,
    ) -> None:
        self.ident, self.peer, self.address = ident, peer, address
        self.timeout_s = timeout_s  # no answer this long: the stream is dead
        self.local_address = local_address
        self._snapshot, self._verifier, self._refused = snapshot, verifier, refused
        self._on_ack = on_ack
        self.seq = 0  # last data seq used on this stream
        self.acked = 0
        self.holding = 0  # what the peer says it holds from us
        self.connected = False
        self.attempt = Attempt.NOT_TRIED  # the stream's last attempt (edge.flowshare.barrier)
        self.connect_seq = 0  # the last seq of the snapshot sent on the latest connect
        self.failed_at: float | None = None  # monotonic, when `attempt` last became a failure
        self._sent_since_heartbeat = False
        self._heard_since_heartbeat = False
        self.waiting_since: float | None = None  # monotonic; see keepalive.outbound
        self.connects = 0
        self.dead_streams = 0  # streams the keepalive found dead (and aborted)
        #: streams that ended on an unexpected error (logged with its traceback), after
        #: which the sender reconnected: before, such an error ended the sender silently
        self.stream_errors = 0
        self._writer: asyncio.StreamWriter | None = None
        self._writer_idle = False  # the writer task waits for the queue (see _emit)
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _frame(self, body: wire.Body) -> bytes:
        self.seq += 1
        frame = Frame(self.ident.me, self.peer, self.ident.boot, self.seq, now_ms(), body)
        return framed(wire.encode(frame, self.ident.key))

    def send_delta(self, events: list[tuple[Op, FlowKey]]) -> int | None:
        """Queues a delta; its seq, or None while disconnected (the next connect sends a
        snapshot, which includes these events)."""
        if not self.connected:
            return None
        if self._queue.qsize() > MAX_QUEUED:  # a peer this far behind gets a snapshot
            while not self._queue.empty():
                if not self._queue.get_nowait():  # the stream ended meanwhile
                    self._queue.put_nowait(b"")
                    return None
            self._queue_snapshot()
            return self.seq
        for start in range(0, len(events), wire.MAX_FLOWS_PER_FRAME):
            self._emit(self._frame(Delta(tuple(events[start : start + wire.MAX_FLOWS_PER_FRAME]))))
        return self.seq

    def _emit(self, data: bytes) -> None:
        """A frame goes out at once when the writer task is idle and nothing waits before
        it (seq order holds: every earlier frame is in the transport already); otherwise
        it waits in the queue for the writer."""
        writer = self._writer
        if (
            writer is None
            or not self._writer_idle
            or not self._queue.empty()
            or writer.transport.is_closing()
            or writer.transport.get_write_buffer_size() > DIRECT_WRITE_BYTES
        ):
            self._queue.put_nowait(data)
            return
        writer.write(data)
        self._sent_since_heartbeat = True
        if self.waiting_since is None:
            self.waiting_since = time.monotonic()

    def send_snapshot(self) -> int | None:
        if not self.connected:
            return None
        self._queue_snapshot()
        return self.seq

    def _queue_snapshot(self) -> None:
        keys = self._snapshot()
        head = (self.ident.me, self.peer, self.ident.boot, now_ms())
        for frame in wire.snapshot_frames(keys, head, self.seq + 1):
            self.seq = frame.seq
            self._queue.put_nowait(framed(wire.encode(frame, self.ident.key)))

    async def _run(self) -> None:
        backoff = RECONNECT_S[0]
        while True:
            self.attempt = on_attempt(self.attempt)
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(*self.address, local_addr=(self.local_address, 0)),
                    CONNECT_TIMEOUT_S,
                )
            except (OSError, TimeoutError) as error:
                self._failed(Attempt.TIMED_OUT if _timed_out(error) else Attempt.REFUSED)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_S[1])
                continue
            backoff = RECONNECT_S[0]
            acks: asyncio.Task[None] | None = None
            try:
                no_delay(writer, int(self.timeout_s * 1000))
                self.connects += 1
                self._queue = asyncio.Queue()
                self.waiting_since, self._writer = None, writer
                self.connected, self.attempt = True, Attempt.CONNECTED
                self._queue_snapshot()
                self.connect_seq = self.seq
                acks = asyncio.get_running_loop().create_task(self._read_acks(reader))
                await self._write(writer)
            except (OSError, ConnectionError):
                pass
            except Exception:  # a stream never ends its sender for good: log, start over
                self.stream_errors += 1
                log.exception(
                    "flowshare: stream to %s (%s) failed: reconnecting", self.peer, self.address[0]
                )
            finally:
                self.connected, self._writer = False, None
                if self.attempt is Attempt.CONNECTED:  # not found dead by the keepalive
                    self.attempt = Attempt.CLOSED
                if acks is not None:
                    acks.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await acks
                writer.close()
            await asyncio.sleep(RECONNECT_S[0])

    def _failed(self, attempt: Attempt) -> None:
        if not self.attempt.failed:
            self.failed_at = time.monotonic()
        self.attempt = attempt

    def heartbeat(self) -> None:
        """An empty delta when nothing was sent (peers see us live) or nothing was heard
        (the peer is asked to answer) since the last call."""
        wanted = keepalive.wants_heartbeat(self._sent_since_heartbeat, self._heard_since_heartbeat)
        if self.connected and self._queue.empty() and wanted:
            self._queue.put_nowait(self._frame(Delta(())))
        self._sent_since_heartbeat = self._heard_since_heartbeat = False

    def check(self, now: float) -> Verdict:
        """The keepalive rule at monotonic `now`; a dead stream is aborted (the writer
        ends, the stream reconnects and starts over with a snapshot)."""
        verdict = keepalive.outbound(now, self.waiting_since, self.timeout_s)
        if verdict.stream is Stream.DEAD and self.connected and self._writer is not None:
            self.dead_streams += 1
            log.warning(
                "flowshare: stream to %s (%s) %s: reconnecting", self.peer, self.address[0], verdict
            )
            self.connected, self.waiting_since = False, None
            self._failed(Attempt.DEAD)
            self._writer.transport.abort()
            self._queue.put_nowait(b"")
        return verdict

    async def _write(self, writer: asyncio.StreamWriter) -> None:
        # One writer, frames in seq order (no wait_for on the queue: on 3.11 its timeout
        # can race a completed get, and a frame would go out after a later one).
        # A closing transport ends the stream before the ack reader says so: uvloop (the
        # agent's loop) raises RuntimeError on a write to a closed handle, where asyncio's
        # own loop drops it. The lab's edge-b1 kill did that on edge-b2's stream to it: a
        # heartbeat queued after the reset was written to the closed handle.
        while True:
            self._writer_idle = True
            try:
                data = await self._queue.get()
            finally:
                self._writer_idle = False
            if not data or writer.transport.is_closing():  # b"": the ack reader saw the end
                return
            writer.write(data)
            while not self._queue.empty():
                if not (data := self._queue.get_nowait()) or writer.transport.is_closing():
                    return
                writer.write(data)
            self._sent_since_heartbeat = True
            if self.waiting_since is None:
                self.waiting_since = time.monotonic()
            await writer.drain()

    async def _read_acks(self, reader: asyncio.StreamReader) -> None:
        try:
            await self._take_acks(reader)
        finally:
            self._queue.put_nowait(b"")

    async def _take_acks(self, reader: asyncio.StreamReader) -> None:
        origin = f"{self.peer} ({self.address[0]})"
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                try:
                    frame = wire.decode(await read_frame(reader), self.ident.key)
                    if frame.sender != self.peer or not isinstance(frame.body, Ack | Keepalive):
                        raise FrameError("not an ack or keepalive from this peer")
                    self._verifier.check(frame, now_ms())
                except FrameError as error:
                    self._refused(origin, str(error))
                    if str(error).startswith("a frame of"):
                        return
                    continue
                self.waiting_since, self._heard_since_heartbeat = None, True
                if isinstance(frame.body, Keepalive):
                    continue
                self.acked = max(self.acked, frame.body.acked)
                self.holding = frame.body.holding
                self._on_ack(self.peer, frame.body)


# frame, new incarnation -> (flows held from its sender, flush round the ack must wait for)
DataHandler = Callable[[Frame, bool], tuple[int, int]]


class Inbound:
    """Peers' flows to this node: serves their streams, applies and acks each frame."""

    def __init__(
        self,
        ident: Identity,
        bind: tuple[str, int],
        peers: dict[str, str],
        verifier: Verifier,
        refused: Refusals,
        on_data: DataHandler,
        flushed: Callable[[int], Awaitable[None]],
        timeout_s: float,
    ) -> None:
        self.ident, self.bind, self.peers = ident, bind, peers
        self.timeout_s = timeout_s  # a stream silent this long is dead
        self._verifier, self._refused, self._on_data = verifier, refused, on_data
        self._flushed = flushed
        self._server: asyncio.Server | None = None
        self._ack_seq: dict[str, int] = {}
        self.last_heard: dict[str, float] = {}  # monotonic
        self.frames: Counter[str] = Counter()
        self.dead_streams: Counter[str] = Counter()  # by peer address
        self._handlers: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._stream_heard: dict[asyncio.StreamWriter, float] = {}  # monotonic

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, *self.bind, reuse_address=True)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        # Closing the streams ends their handlers (cancelling a handler task of
        # start_server makes asyncio log its CancelledError as an error).
        for writer in list(self._handlers.values()):
            writer.close()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=2.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers[task] = writer
        address = str(writer.get_extra_info("peername")[0])
        no_delay(writer)
        self._stream_heard[writer] = time.monotonic()
        try:
            await self._stream(address, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self._handlers.pop(task, None)
            self._stream_heard.pop(writer, None)
            writer.close()

    def check(self, now: float) -> None:
        """The keepalive rule at monotonic `now` for every stream served: a silent one (its
        sender frozen, or replaced by a new process whose stream is another one) is
        aborted, so nothing waits on it."""
        for writer, heard in list(self._stream_heard.items()):
            verdict = keepalive.inbound(now, heard, self.timeout_s)
            if verdict.stream is Stream.DEAD:
                address = str(writer.get_extra_info("peername")[0])
                self.dead_streams[address] += 1
                log.warning("flowshare: stream from %s %s: closed", address, verdict)
                del self._stream_heard[writer]
                writer.transport.abort()

    async def _stream(
        self, address: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        acks: asyncio.Queue[tuple[str, int, int, int]] = asyncio.Queue()
        acker = asyncio.get_running_loop().create_task(self._ack(acks, writer))
        try:
            await self._read(address, reader, writer, acks)
        finally:
            acker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await acker

    async def _read(
        self,
        address: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        acks: asyncio.Queue[Any],
    ) -> None:
        while True:
            try:
                data = await read_frame(reader)
            except FrameError as error:
                self._refused(address, str(error))
                return
            try:
                frame = wire.decode(data, self.ident.key)
                if self.peers.get(frame.sender) != address:
                    raise FrameError(f"sender {frame.sender!r} is not the peer at {address}")
                if wire.channel(frame.kind) != "data":
                    raise FrameError("an ack or keepalive on a data stream")
                fresh = self._verifier.is_new_incarnation(frame)
                self._verifier.check(frame, now_ms())
            except FrameError as error:
                self._refused(address, str(error))
                continue
            self.frames[frame.sender] += 1
            self.last_heard[frame.sender] = self._stream_heard[writer] = time.monotonic()
            if isinstance(frame.body, Delta) and not frame.body.events:  # a heartbeat
                self._answer(writer, frame.sender, Keepalive(frame.seq))
            holding, flush_round = self._on_data(frame, fresh)
            if flush_round == 0 and acks.empty():
                # The map holds everything received so far: the ack goes now (cumulative,
                # so an older one the acker still sends later changes nothing).
                self._answer(writer, frame.sender, Ack(frame.seq, holding))
            else:
                acks.put_nowait((frame.sender, frame.seq, holding, flush_round))

    async def _ack(
        self, acks: asyncio.Queue[tuple[str, int, int, int]], writer: asyncio.StreamWriter
    ) -> None:
        """Acks are cumulative: once the map holds what came in, the newest seq is acked."""
        while True:
            items = [await acks.get()]
            while not acks.empty():
                items.append(acks.get_nowait())
            await self._flushed(max(item[3] for item in items))
            sender, acked, holding, _ = items[-1]
            self._answer(writer, sender, Ack(acked, holding))
            await writer.drain()

    def _answer(self, writer: asyncio.StreamWriter, sender: str, body: Ack | Keepalive) -> None:
        """Acks and keepalives share one seq per sender: allocated and written in one step."""
        if writer.transport.is_closing():  # the stream ends (uvloop raises on a closed one)
            return
        seq = self._ack_seq.get(sender, 0) + 1
        self._ack_seq[sender] = seq
        frame = Frame(self.ident.me, sender, self.ident.boot, seq, now_ms(), body)
        writer.write(framed(wire.encode(frame, self.ident.key)))
