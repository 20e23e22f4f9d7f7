"""The table of established client flows, and a stream of their accept/close events.

Cheap to update on the data path (a dict insert and delete per connection) and
to query. Subscribers get events through bounded queues: a slow subscriber
loses events (and is told how many) rather than slowing the proxy. A later
capability shares this table between edges so that flows re-hashed by a
router reach their owner; active-passive mode hands its sticky part to a standby.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

FlowKey = tuple[str, int, str]  # client address, client port, listener name


@dataclass(slots=True)
class Flow:
    client_address: str
    client_port: int
    listener: str
    backend: str
    started: float = field(default_factory=time.monotonic)
    bytes_in: int = 0  # client -> backend
    bytes_out: int = 0  # backend -> client
    requests: int = 0

    @property
    def key(self) -> FlowKey:
        return (self.client_address, self.client_port, self.listener)

    def snapshot(self, now: float | None = None) -> dict[str, object]:
        age = (now if now is not None else time.monotonic()) - self.started
        return {
            "client": f"{self.client_address}:{self.client_port}",
            "listener": self.listener,
            "backend": self.backend,
            "age_s": round(age, 3),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "requests": self.requests,
        }


@dataclass(frozen=True, slots=True)
class FlowEvent:
    kind: Literal["accept", "close"]
    flow: dict[str, object]
    at: float = field(default_factory=time.monotonic)  # when it happened (for sync lag)


class FlowSubscription:
    def __init__(self, table: FlowTable, maxsize: int) -> None:
        self._table = table
        self.queue: asyncio.Queue[FlowEvent] = asyncio.Queue(maxsize)
        self.dropped = 0

    def close(self) -> None:
        self._table._subscribers.discard(self)

    def __enter__(self) -> FlowSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FlowTable:
    def __init__(self) -> None:
        self._flows: dict[FlowKey, Flow] = {}
        self._subscribers: set[FlowSubscription] = set()
        self.accepted_total = 0
        self.closed_total = 0

    def __len__(self) -> int:
        return len(self._flows)

    def __iter__(self) -> Iterator[Flow]:
        return iter(list(self._flows.values()))

    def get(self, key: FlowKey) -> Flow | None:
        return self._flows.get(key)

    def open(self, client_address: str, client_port: int, listener: str, backend: str) -> Flow:
        flow = Flow(client_address, client_port, listener, backend)
        self._flows[flow.key] = flow
        self.accepted_total += 1
        if self._subscribers:
            self._publish("accept", flow)
        return flow

    def close(self, flow: Flow) -> None:
        if self._flows.pop(flow.key, None) is None:
            return
        self.closed_total += 1
        if self._subscribers:
            self._publish("close", flow)

    def count_by_listener(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for flow in self._flows.values():
            counts[flow.listener] = counts.get(flow.listener, 0) + 1
        return counts

    def subscribe(self, maxsize: int = 10000) -> FlowSubscription:
        sub = FlowSubscription(self, maxsize)
        self._subscribers.add(sub)
        return sub

    def _publish(self, kind: Literal["accept", "close"], flow: Flow) -> None:
        event = FlowEvent(kind, flow.snapshot())
        for sub in self._subscribers:
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:
                sub.dropped += 1
