"""`anycast-edge witness`: a member of an active-passive group that only votes.

It never owns the VIP and needs no interface, proxy or store: it hears the members'
heartbeats (the same authenticated datagrams, unicast) and sends its own every
`advert_interval`, carrying its vote (edge.vip.quorum). With it, a pair without a store
keeps one owner through a heartbeat cut between the two nodes: only the one the witness
(or the peer) grants holds a majority. Put it where both nodes reach it by another path
than their direct link, e.g. a third host on the segment's router.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import Any

from edge.config import WitnessConfig
from edge.state import NodeState
from edge.vip.heartbeat import Counter, Heartbeat, HeartbeatRefused, Receiver, encode
from edge.vip.quorum import Vote, Voter

log = logging.getLogger("edge.vip.witness")

#: The priority a witness puts on the wire (it is never a candidate: eligible is False).
WITNESS_PRIORITY = 1


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, witness: Witness) -> None:
        self.witness = witness

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.witness.received(data, str(addr[0]))

    def error_received(self, exc: Exception) -> None:
        log.debug("witness socket: %s", exc)


class Witness:
    def __init__(self, config: WitnessConfig) -> None:
        self.config = config
        self.members = {m.id: m.address for m in config.members}
        self.address = self.members[config.node_id]
        self.key = config.shared_key()
        self.receiver = Receiver(
            self.key, config.group, self.members, config.node_id, config.replay_window
        )
        self.voter = Voter.of_group(config.node_id, config, time.monotonic())
        self.counter = Counter()
        self.vote = Vote(None)
        self.transport: asyncio.DatagramTransport | None = None
        self.accepted = 0

    def received(self, packet: bytes, source: str) -> None:
        try:
            beat = self.receiver.accept(packet, time.time_ns(), source)
        except HeartbeatRefused as refused:
            log.debug("heartbeat from %s refused: %s", source, refused)
            return
        self.accepted += 1
        self.voter.heard(
            beat.node_id, beat.priority, beat.eligible, beat.active, beat.counter, time.monotonic()
        )

    def beat(self) -> None:
        vote = self.voter.vote(time.monotonic())
        if vote.candidate != self.vote.candidate:
            log.info(
                "witness %s of %s: votes for %s",
                self.config.node_id,
                self.config.group,
                vote.candidate or "nobody",
            )
        self.vote = vote
        packet = encode(
            Heartbeat(
                node_id=self.config.node_id,
                group=self.config.group,
                priority=WITNESS_PRIORITY,
                health=NodeState.HEALTHY,
                active=False,
                eligible=False,
                term=0,
                token=0,
                counter=self.counter.next(time.time_ns()),
                voting=True,
                vote_for=vote.candidate,
                vote_echo=vote.echo,
            ),
            self.key,
        )
        if self.transport is not None:
            for member, address in self.members.items():
                if member != self.config.node_id:
                    self.transport.sendto(packet, (address, self.config.port))

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self), local_addr=(self.address, self.config.port)
        )
        log.info(
            "witness %s of group %s on %s:%d (hold %.2f s)",
            self.config.node_id,
            self.config.group,
            self.address,
            self.config.port,
            self.config.quorum_hold,
        )
        try:
            while not stop.is_set():
                self.beat()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.config.advert_interval)
        finally:
            self.transport.close()


async def run_witness(config: WitnessConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await Witness(config).run(stop)
    except OSError as error:
        log.error("witness: cannot listen on %s: %s", config.node_id, error.strerror)
        return 1
    return 0
