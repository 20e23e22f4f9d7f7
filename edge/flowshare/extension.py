"""Flow sharing as an agent extension: start, stop, status, and the step a planned change
awaits before the node stops accepting (peers hold this node's current flows).

The extension subscribes to the agent's FlowTable (its accept/close stream), sends this
node's flows to every peer, keeps what the peers own in a `Directory`, and keeps the nft
map equal to the directory's answer. Forwarding is all or nothing: a missing nft or
kernel feature is one line at start and the node serves without forwarding (status says
so); whatever it installed goes on stop, and leftovers of a crashed run go on start.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from contract.schemas import FlowSharePeerReport, FlowShareReport
from edge.config import FlowShareConfig, NodeConfig
from edge.flows import FlowEvent, FlowSubscription, FlowTable
from edge.flowshare import barrier, kernel, render
from edge.flowshare.kernel import KernelError
from edge.flowshare.link import Identity, Inbound, Outbound, Refusals
from edge.flowshare.table import Directory, map_changes
from edge.flowshare.wire import Ack, Delta, FlowKey, Frame, Op, Snapshot, Verifier, flow_key
from edge.ports import ExtensionSetupError, NodeControl
from edge.state import Transition

log = logging.getLogger("edge.flowshare")

MAX_BATCH = 50_000
LAG_SAMPLES = 10_000
BATCH_GIVE_UP_S = 10.0
COUNTERS_EVERY_S = 1.0  # the packet counters in /status are read this often
SLOWEST = 5
INLINE_CHANGES = 256  # map updates up to this many elements run on the event loop


class Forwarding(enum.StrEnum):
    ON = "on"
    OFF = "off"  # flowshare.forwarding: false
    UNAVAILABLE = "unavailable"  # a kernel feature is missing: serving without it


@dataclass(frozen=True, slots=True)
class BarrierReport:
    """Which peers acknowledged holding this node's flows as of the barrier."""

    acked: tuple[str, ...]
    missing: tuple[str, ...]
    waited_s: float

    def __str__(self) -> str:
        missing = f", missing {', '.join(self.missing)}" if self.missing else ""
        return f"{len(self.acked)} peers hold our flows after {self.waited_s:.3f} s{missing}"


class FlowShareExtension:
    name = "flowshare"

    def __init__(self, config: NodeConfig) -> None:
        assert config.flowshare is not None, "built only with a flowshare: section"
        cfg: FlowShareConfig = config.flowshare
        self.me = config.node.name
        if self.me in {peer.name for peer in cfg.peers}:
            raise ExtensionSetupError(f"flowshare.peers: {self.me!r} is this node itself")
        self.cfg = cfg
        self._flows: FlowTable | None = None  # the node's, from start() on
        self.vips = render.shared_vips(config)
        self.marks = render.peer_marks(cfg)
        self.plan = render.routing(cfg, self.vips.values())
        self.overlay = render.overlay(cfg)
        self._overlay_up = False
        self.directory = Directory()
        self.installed: dict[FlowKey, int] = {}
        self.forwarding = Forwarding.ON if cfg.forwarding else Forwarding.OFF
        self.unavailable: str | None = None
        self.counters: dict[str, int] = {}
        self.lags_ms: deque[float] = deque(maxlen=LAG_SAMPLES)
        self.sysctl = kernel.SysctlKeeper(cfg.runtime_dir / f"flowshare-{self.me}.json")
        self._pending: set[FlowKey] = set()
        self._map_lock = asyncio.Lock()
        self._flush_wanted = asyncio.Event()
        self._rounds_started = self._rounds_done = 0  # map flush rounds
        self._round_done = asyncio.Condition()
        # batch -> (first accept, peers yet to ack, when it was handed to the streams)
        self._batches: dict[int, tuple[float, set[str], float]] = {}
        # The slowest batches: (lag ms, of it before the streams had it ms, last peer to
        # ack, s since start), for /status: where a lag comes from.
        self._slowest: list[tuple[float, float, str, float]] = []
        self._started_at = time.monotonic()
        self._batch_seqs: dict[str, deque[tuple[int, int]]] = {p.name: deque() for p in cfg.peers}
        self._next_batch = 0
        self._dropped_seen = 0
        self._sub: FlowSubscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.ident = Identity(self.me, time.time_ns(), cfg.secret())
        self.verifier = Verifier(self.me, int(cfg.replay_window * 1000))
        self.refused = Refusals()
        self.outbound = {
            peer.name: Outbound(
                self.ident,
                peer.name,
                (peer.address, cfg.port),
                cfg.local_address,
                self._own_keys,
                self.verifier,
                self.refused,
                self._on_ack,
                cfg.peer_timeout,
            )
            for peer in cfg.peers
        }
        self.inbound = Inbound(
            self.ident,
            (cfg.local_address, cfg.port),
            {peer.name: peer.address for peer in cfg.peers},
            self.verifier,
            self.refused,
            self._on_data,
            self._wait_flushed,
            cfg.peer_timeout,
        )

    # -- life cycle ------------------------------------------------------------------------
    async def start(self, node: NodeControl) -> None:
        """Raises OSError with a clear line when the stream's address cannot be bound.
        Returns once this node holds its peers' flows (bounded): the composition root
        starts this extension before the announcer, so a joining node announces only then."""
        self._flows = node.flows
        await self._remove_leftovers()
        if self.overlay is not None:
            try:
                await asyncio.to_thread(kernel.install_overlay, self.overlay)
                self._overlay_up = True
            except (KernelError, NetlinkError, OSError) as error:
                await self._remove_overlay()
                self.forwarding, self.unavailable = Forwarding.UNAVAILABLE, str(error)
                log.error("flowshare: no overlay, serving without flow sharing: %s", error)
                return  # the peers' addresses live on the overlay: nothing to share over
        if self.forwarding is Forwarding.ON:
            await self._install()
        self._sub = node.flows.subscribe(maxsize=100_000)
        self.directory.mine = set(self._own_keys())
        try:
            await self.inbound.start()
        except OSError as error:
            await self.stop()
            raise OSError(
                f"flowshare: cannot listen on {self.cfg.local_address}:{self.cfg.port}: "
                f"{error.strerror}"
            ) from None
        for link in self.outbound.values():
            link.start()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._read_flows()),
            loop.create_task(self._flusher()),
            loop.create_task(self._tick()),
        ]
        missing = await self.wait_peers_synced()
        if missing:
            log.warning("flowshare: serving without the flows of %s", ", ".join(missing))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._sub is not None:
            self._sub.close()
        for link in self.outbound.values():
            await link.stop()
        await self.inbound.stop()
        if self.forwarding is Forwarding.ON:
            await self._remove()
        await self._remove_overlay()

    async def _remove_overlay(self) -> None:
        if self.overlay is None:
            return
        try:
            await asyncio.to_thread(kernel.remove_overlay, self.overlay)
        except NetlinkError as error:
            log.error("flowshare: removing the overlay %s: %s", self.overlay.device, error)
        self._overlay_up = False

    def on_transition(self, transition: Transition) -> None:
        """Nothing: the route changes a transition causes are held through `hold`."""

    async def before_stop_accepting(self) -> bool:
        """Before the listeners close (and the withdraw): peers hold this node's flows.
        It moves no traffic itself."""
        await self.hold("stop accepting")
        return False

    async def hold(self, change: str) -> None:
        """The `BeforeRouteChange` the announcer awaits before a planned change goes out:
        every peer acknowledged this node's current flows, and this node holds every
        peer's; bounded by `barrier_timeout`, after which the change proceeds and the log
        names the peers that were missing."""
        if self.overlay is not None and not self._overlay_up:
            log.warning("flowshare before %s: not sharing (no overlay)", change)
            return
        report = await self.hold_current_flows()
        unsynced = await self.wait_peers_synced(
            max(0.0, self.cfg.barrier_timeout - report.waited_s)
        )
        level = logging.WARNING if report.missing or unsynced else logging.INFO
        without = f"; without the flows of {', '.join(unsynced)}" if unsynced else ""
        log.log(level, "flowshare before %s: %s%s", change, report, without)

    async def hold_current_flows(self, bound_s: float | None = None) -> BarrierReport:
        """Returns once every peer that can answer acknowledged this node's flows as of now
        (bounded by `bound_s`, default flowshare.barrier_timeout); the report names who did
        not. A peer connected now must acknowledge what was sent up to now; one not
        connected yet (a fresh start) the snapshot its next connect sends; one whose
        stream tried and failed is not waited for (`edge.flowshare.barrier`)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._publish_pending()
        at_start = {
            name: (link.connected, link.seq, link.connects) for name, link in self.outbound.items()
        }

        def done(name: str) -> bool:
            link = self.outbound[name]
            connected, seq, connects = at_start[name]
            if link.connects > connects:  # reconnected since: its snapshot has our flows
                return link.acked >= link.connect_seq
            return connected and link.acked >= seq

        deadline = started + (bound_s if bound_s is not None else self.cfg.barrier_timeout)
        while True:
            peers = {n: self._barrier_peer(n, done(n)) for n in self.outbound}
            if not barrier.waiting_for(peers) or loop.time() >= deadline:
                break
            await asyncio.sleep(0.002)
        acked = tuple(n for n, peer in peers.items() if peer.done)
        return BarrierReport(acked, tuple(barrier.missing(peers)), loop.time() - started)

    async def wait_peers_synced(self, bound_s: float | None = None) -> list[str]:
        """Before this node announces (a join) and before a planned change: waits until
        this node holds the snapshot of every peer that can answer (bounded); returns the
        peers whose flows it does not hold."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (bound_s if bound_s is not None else self.cfg.barrier_timeout)
        while True:
            peers = {
                n: self._barrier_peer(n, self.directory.table(n).floor >= 0) for n in self.outbound
            }
            if not barrier.waiting_for(peers) or loop.time() >= deadline:
                return barrier.missing(peers)
            await asyncio.sleep(0.01)

    def _barrier_peer(self, name: str, done: bool) -> barrier.Peer:
        link = self.outbound[name]
        heard = self.inbound.last_heard.get(name)
        since = heard is not None and link.failed_at is not None and heard > link.failed_at
        return barrier.Peer(link.attempt, done, since)

    # -- views -------------------------------------------------------------------------------
    def degraded_reason(self) -> str | None:
        return None  # forwarding covers planned changes only; it never takes a node out

    def in_sync(self) -> bool:
        """Every connected peer acknowledged everything sent to it."""
        return all(link.acked >= link.seq for link in self.outbound.values() if link.connected)

    def _synced(self, peer: str) -> bool:
        """The peer acknowledged everything sent to it and this node holds its flows."""
        link = self.outbound[peer]
        table = self.directory.table(peer)
        return (
            link.connected
            and link.acked >= link.seq
            and table.floor >= 0
            and peer in self.directory.live
        )

    def _lag_ms(self, peer: str, now: float) -> float:
        """How long the oldest batch of our flows has waited for the peer's ack."""
        for _, batch in self._batch_seqs[peer]:
            entry = self._batches.get(batch)
            if entry is not None:
                return max(0.0, (now - entry[0]) * 1000)
        return 0.0

    def report(self) -> FlowShareReport:
        """The heartbeat's flow-sharing report, for the GSLB's weight-change gate."""
        sharing = bool(self._tasks) and (self.overlay is None or self._overlay_up)
        now = time.monotonic()
        peers = [
            FlowSharePeerReport(
                peer=name, synced=self._synced(name), lag_ms=round(self._lag_ms(name, now), 3)
            )
            for name in self.outbound
        ]
        return FlowShareReport(forwarding=str(self.forwarding), peers=peers if sharing else [])

    def status(self) -> dict[str, Any]:
        lags = sorted(self.lags_ms)
        return {
            "forwarding": str(self.forwarding),
            "unavailable": self.unavailable,
            "overlay": None
            if self.overlay is None
            else {"device": self.overlay.device, "vni": self.overlay.vni, "up": self._overlay_up},
            "own_flows": len(self.directory.mine),
            "map_size": len(self.installed),
            "in_sync": self.in_sync(),
            "sync_lag_ms": {
                "samples": len(lags),
                "p50": round(statistics.median(lags), 3) if lags else None,
                "p99": round(lags[int(0.99 * (len(lags) - 1))], 3) if lags else None,
                "slowest": [
                    {
                        "lag": round(lag, 1),
                        "before_sent": round(local, 1),
                        "last_ack_from": last,
                        "at_s": round(at, 1),
                    }
                    for lag, local, last, at in self._slowest
                ],
            },
            "peers": {
                name: {
                    "connected": link.connected,
                    "attempt": str(link.attempt),
                    "synced": self._synced(name),
                    "connects": link.connects,
                    "dead_streams": link.dead_streams,
                    "stream_errors": link.stream_errors,
                    "live": name in self.directory.live,
                    "flows_held": len(self.directory.table(name)),
                    "frames_received": self.inbound.frames[name],
                    "sent_seq": link.seq,
                    "acked_seq": link.acked,
                    "holds_of_ours": link.holding,
                    "packets_forwarded": self.counters.get(f"to {name}", 0),
                }
                for name, link in self.outbound.items()
            },
            "packets_moved": self.counters.get("moved", 0),
            "packets_from_peers": self.counters.get("from peers", 0),
            "loop_drops": self.counters.get("loop", 0),
            "refused_frames": dict(self.refused.counts),
        }

    # -- own flows -> peers --------------------------------------------------------------------
    def _key(self, client: str, client_port: int, listener: str) -> FlowKey | None:
        vip = self.vips.get(listener)
        if vip is None:
            return None
        try:
            return flow_key(client, client_port, vip[0], vip[1])
        except ValueError:
            return None

    def _own_keys(self) -> list[FlowKey]:
        assert self._flows is not None, "asked once started"
        keys = (self._key(f.client_address, f.client_port, f.listener) for f in self._flows)
        return [key for key in keys if key is not None]

    async def _read_flows(self) -> None:
        assert self._sub is not None
        while True:
            first = await self._sub.queue.get()
            self._publish([first, *self._take_queued()])

    def _take_queued(self) -> list[FlowEvent]:
        assert self._sub is not None
        events: list[FlowEvent] = []
        while len(events) < MAX_BATCH and not self._sub.queue.empty():
            events.append(self._sub.queue.get_nowait())
        return events

    def _publish_pending(self) -> None:
        events = self._take_queued()
        if events:
            self._publish(events)

    def _publish(self, events: list[FlowEvent]) -> None:
        assert self._sub is not None
        ops: list[tuple[Op, FlowKey]] = []
        for event in events:
            client, _, port = str(event.flow["client"]).rpartition(":")
            key = self._key(client, int(port), str(event.flow["listener"]))
            if key is None:
                continue
            if event.kind == "accept":
                ops.append((Op.ACCEPT, key))
                self.directory.mine.add(key)
            else:
                ops.append((Op.CLOSE, key))
                self.directory.mine.discard(key)
            self._pending.add(key)
        if self._sub.dropped > self._dropped_seen:  # events lost: the table itself repairs
            self._dropped_seen = self._sub.dropped
            self.directory.mine = set(self._own_keys())
            for link in self.outbound.values():
                link.send_snapshot()
        if ops:
            self._track_batch(min(e.at for e in events), ops)
        self._flush_wanted.set()

    def _track_batch(self, first_at: float, ops: list[tuple[Op, FlowKey]]) -> None:
        batch = self._next_batch = self._next_batch + 1
        sent: set[str] = set()
        for name, link in self.outbound.items():
            seq = link.send_delta(ops)
            if seq is not None:
                sent.add(name)
                self._batch_seqs[name].append((seq, batch))
        if sent:
            self._batches[batch] = (first_at, sent, time.monotonic())

    def _on_ack(self, peer: str, ack: Ack) -> None:
        pending = self._batch_seqs[peer]
        now = time.monotonic()
        while pending and pending[0][0] <= ack.acked:
            _, batch = pending.popleft()
            entry = self._batches.get(batch)
            if entry is None:
                continue
            entry[1].discard(peer)
            if not entry[1]:
                del self._batches[batch]
                lag = (now - entry[0]) * 1000
                self.lags_ms.append(lag)
                if len(self._slowest) < SLOWEST or lag > self._slowest[-1][0]:
                    local = (entry[2] - entry[0]) * 1000
                    self._slowest.append((lag, local, peer, entry[0] - self._started_at))
                    self._slowest = sorted(self._slowest, reverse=True)[:SLOWEST]

    # -- peers' flows -> the map -------------------------------------------------------------------
    def _on_data(self, frame: Frame, new_incarnation: bool) -> tuple[int, int]:
        """Applies a peer's frame; returns what it holds from that peer and the flush round
        after which the kernel's map has it (the ack waits for that round)."""
        table = self.directory.table(frame.sender)
        changed = table.clear() if new_incarnation else set()
        if isinstance(frame.body, Delta):
            changed |= table.apply_delta(frame.seq, frame.body)
        elif isinstance(frame.body, Snapshot):
            changed |= table.apply_snapshot(frame.body)
        changed |= self.directory.set_live(frame.sender, True)
        if not changed or self.forwarding is not Forwarding.ON:
            return len(table), 0
        self._pending |= changed
        if self._flush_inline():
            return len(table), 0  # the kernel's map holds it already: ack at once
        self._flush_wanted.set()
        return len(table), self._rounds_started + 1

    def _flush_inline(self) -> bool:
        """Everything pending into the map now, on the loop, when no flush round is running
        and it is small: the ack then needs no trip through the flusher task (under a burst
        of accepts every loop iteration is long). False leaves it to the flusher."""
        if self._map_lock.locked() or len(self._pending) > INLINE_CHANGES:
            return False
        wanted = {
            key: self.marks[peer] if peer is not None else None
            for key, peer in self.directory.forwarded(self._pending).items()
        }
        deletes, adds = map_changes(self.installed, wanted)
        if deletes or adds:
            try:
                if kernel.nft_now(render.element_commands(deletes, adds)) is None:
                    return False  # the context is busy (a thread's call)
            except KernelError:
                return False  # the flusher retries and rebuilds the table if need be
            for key in deletes:
                self.installed.pop(key, None)
            self.installed.update(adds)
        self._pending = set()
        return True

    async def _wait_flushed(self, flush_round: int) -> None:
        async with self._round_done:
            await self._round_done.wait_for(lambda: self._rounds_done >= flush_round)

    async def _flusher(self) -> None:
        while True:
            await self._flush_wanted.wait()
            self._flush_wanted.clear()
            self._rounds_started += 1
            flush_round = self._rounds_started
            try:
                await self._flush_map()
            finally:
                self._rounds_done = flush_round
                async with self._round_done:
                    self._round_done.notify_all()

    async def _flush_map(self) -> None:
        async with self._map_lock:
            keys, self._pending = self._pending, set()
            if self.forwarding is not Forwarding.ON or not keys:
                return
            wanted = {
                key: self.marks[peer] if peer is not None else None
                for key, peer in self.directory.forwarded(keys).items()
            }
            deletes, adds = map_changes(self.installed, wanted)
            if not deletes and not adds:
                return
            try:
                await kernel.nft(
                    render.element_commands(deletes, adds),
                    inline=len(deletes) + len(adds) <= INLINE_CHANGES,
                )
            except KernelError as error:
                log.warning("flowshare: map update failed (%s); rebuilding the table", error)
                await self._rebuild_map()
                return
            for key in deletes:
                self.installed.pop(key, None)
            self.installed.update(adds)

    async def _rebuild_map(self) -> None:
        desired = {key: self.marks[peer] for key, peer in self.directory.desired().items()}
        script = render.ruleset(self.cfg, self.vips.values()) + render.element_commands([], desired)
        try:
            await kernel.nft(script)
        except KernelError as error:
            log.error("flowshare: cannot rebuild the table: %s", error)
            return
        self.installed = desired

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        next_snapshot = loop.time() + self.cfg.snapshot_interval
        next_counters = loop.time()
        while True:
            await asyncio.sleep(self.cfg.heartbeat_interval)
            now = time.monotonic()
            self.inbound.check(now)
            for link in self.outbound.values():
                link.check(now)
                link.heartbeat()
            for name in self.outbound:
                heard = self.inbound.last_heard.get(name)
                live = heard is not None and now - heard <= self.cfg.peer_timeout
                self._pending |= self.directory.set_live(name, live)
            self._flush_wanted.set()
            if loop.time() >= next_snapshot:
                next_snapshot = loop.time() + self.cfg.snapshot_interval
                for link in self.outbound.values():
                    link.send_snapshot()
            old = [b for b, entry in self._batches.items() if now - entry[0] > BATCH_GIVE_UP_S]
            for batch in old:
                del self._batches[batch]
            for seqs in self._batch_seqs.values():  # a peer that never acked: forget
                while seqs and seqs[0][1] not in self._batches:
                    seqs.popleft()
            if self.forwarding is Forwarding.ON and loop.time() >= next_counters:
                next_counters = loop.time() + COUNTERS_EVERY_S
                with contextlib.suppress(KernelError, ValueError):
                    self.counters = await kernel.table_counters()

    # -- kernel ------------------------------------------------------------------------
    async def _install(self) -> None:
        sysctls = render.sysctls(self.cfg)
        ruleset = render.ruleset(self.cfg, self.vips.values())
        problem = await asyncio.to_thread(kernel.probe, self.cfg.peer_interface, sysctls)
        if problem is None and not self.vips:
            problem = "no listener is bound to one IPv4 address (nothing to forward)"
        if problem is None:
            try:
                await kernel.nft(ruleset, check=True)
            except KernelError as error:
                problem = str(error)
        if problem is None:
            try:
                self.sysctl.apply(sysctls)
                await asyncio.to_thread(kernel.install_routing, self.plan)
                await kernel.nft(ruleset)
            except (KernelError, NetlinkError, OSError) as error:
                problem = f"installing failed, everything removed again: {error}"
                await self._remove()
        if problem is not None:
            self.forwarding, self.unavailable = Forwarding.UNAVAILABLE, problem
            log.error("flowshare: forwarding unavailable, serving without it: %s", problem)

    async def _remove(self) -> None:
        with contextlib.suppress(KernelError):
            await kernel.delete_table()
        try:
            await asyncio.to_thread(kernel.remove_routing, self.plan)
        except NetlinkError as error:
            log.error("flowshare: removing rules and routes: %s", error)
        self.sysctl.restore()
        self.installed = {}

    async def _remove_leftovers(self) -> None:
        found: list[str] = []
        with contextlib.suppress(KernelError):
            if await kernel.delete_table():
                found.append(f"nft table {render.TABLE}")
        with contextlib.suppress(NetlinkError):
            if await asyncio.to_thread(kernel.remove_routing, self.plan):
                found.append("ip rules and routes")
        if self.sysctl.restore():
            found.append("sysctls")
        if self.overlay is not None:
            with contextlib.suppress(NetlinkError):
                if await asyncio.to_thread(kernel.remove_overlay, self.overlay):
                    found.append(f"overlay {self.overlay.device}")
        if found:
            log.warning("flowshare: removed leftovers of an earlier run: %s", ", ".join(found))
