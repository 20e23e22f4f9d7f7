"""The L4 flow life cycle: whatever order FIN, close and RST come in, both sockets end
closed. Exhaustive over the orders of the primitive events, the sockets simulated."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from edge.proxy.exchange import ExchangeState, UpstreamFailure, may_retry
from edge.proxy.flow_control import BACKLOG, PEER_FULL, PIPELINE, ReadGate
from edge.proxy.l4_flow import Action, Event, FlowState, Half, Phase

# What a peer can do to its own socket.
PEER_EVENTS = [
    Event.CLIENT_FIN,
    Event.BACKEND_FIN,
    Event.CLIENT_RESET,
    Event.BACKEND_RESET,
    Event.CLIENT_CLOSED,
    Event.BACKEND_CLOSED,
]


class Sockets:
    """Two simulated sockets driven by a FlowState, as l4.py drives real ones."""

    def __init__(self) -> None:
        self.state = FlowState()
        self.client = "open"
        self.backend = "absent"
        self.fins: set[Event] = set()
        self.lost = False

    def deliver(self, event: Event) -> None:
        queue = [event]
        while queue:
            event = queue.pop(0)
            for action in self.state.on(event):
                if action in (Action.CLOSE_CLIENT, Action.ABORT_CLIENT) and self.client == "open":
                    self.client = "closed"
                    queue.append(Event.CLIENT_CLOSED)  # what connection_lost reports
                if (
                    action in (Action.CLOSE_BACKEND, Action.ABORT_BACKEND)
                    and self.backend == "open"
                ):
                    self.backend = "closed"
                    queue.append(Event.BACKEND_CLOSED)

    def peer(self, event: Event) -> bool:
        """A peer's doing; False when it cannot happen now."""
        client_side = event.value.startswith("client")
        if (self.client if client_side else self.backend) != "open" or event in self.fins:
            return False
        if event in (Event.CLIENT_FIN, Event.BACKEND_FIN):
            self.fins.add(event)
        else:
            self.lost = True
            if client_side:
                self.client = "closed"
            else:
                self.backend = "closed"
        self.deliver(event)
        return True

    def connect(self) -> None:
        if self.backend == "absent" and not self.state.ended:
            self.backend = "open"
            self.deliver(Event.CONNECTED)
        elif self.backend == "absent":
            self.backend = "closed"  # l4.py closes a connection that comes up too late

    def finished(self) -> bool:
        """Both peers are done with the flow: both FINs, or one side gone."""
        return self.lost or self.fins == {Event.CLIENT_FIN, Event.BACKEND_FIN}


def run(order: tuple[Event, ...], connect_at: int) -> Sockets:
    sockets = Sockets()
    for i, event in enumerate(order):
        if i == connect_at:
            sockets.connect()
        sockets.peer(event)
    if connect_at >= len(order):
        sockets.connect()
    return sockets


def test_every_order_of_fin_close_and_reset_closes_both_sockets() -> None:
    for n in range(1, 4):
        for order in itertools.permutations(PEER_EVENTS, n):
            for connect_at in range(n + 1):
                s = run(order, connect_at)
                if s.finished():
                    assert (s.client, s.backend) == ("closed", "closed"), (order, connect_at)
                    assert s.state.ended
                else:
                    assert not s.state.ended


@given(st.lists(st.sampled_from(PEER_EVENTS), max_size=12), st.integers(0, 12))
def test_any_event_sequence_leaves_nothing_open_once_the_flow_is_done(
    events: list[Event], connect_at: int
) -> None:
    s = run(tuple(events), connect_at)
    if s.finished():
        assert (s.client, s.backend) == ("closed", "closed")


def test_half_close_passes_the_fin_on_and_waits_for_the_other_side() -> None:
    state = FlowState()
    assert state.on(Event.CLIENT_FIN) == ()  # no backend yet: remembered
    assert state.inbound is Half.FIN_PENDING
    assert state.on(Event.CONNECTED) == (Action.SHUT_BACKEND,)
    assert state.on(Event.BACKEND_FIN) == (
        Action.SHUT_CLIENT,
        Action.CLOSE_CLIENT,
        Action.CLOSE_BACKEND,
    )
    assert state.phase is Phase.CLOSED


def test_resets_are_passed_on_and_idle_closes_then_aborts() -> None:
    state = FlowState(Phase.OPEN)
    assert state.on(Event.BACKEND_RESET) == (Action.ABORT_CLIENT,)
    state = FlowState(Phase.OPEN)
    assert state.on(Event.IDLE) == (Action.CLOSE_CLIENT, Action.CLOSE_BACKEND)
    assert state.on(Event.IDLE) == (Action.ABORT_CLIENT, Action.ABORT_BACKEND)


def test_may_retry() -> None:
    ok = (ExchangeState.WAITING, "GET", 1, True, True, UpstreamFailure.CLOSED_BEFORE_RESPONSE)
    assert may_retry(*ok)
    assert not may_retry(ExchangeState.RESPONDING, *ok[1:])  # the backend answered
    assert not may_retry(ok[0], "POST", *ok[2:])
    assert not may_retry(*ok[:2], 2, *ok[3:])  # one retry at most
    assert not may_retry(*ok[:3], False, *ok[4:])  # the body sent so far is gone
    assert not may_retry(*ok[:4], False, ok[5])  # retries switched off
    assert not may_retry(*ok[:5], UpstreamFailure.FIRST_BYTE_TIMEOUT)  # may still be running


class FakeTransport:
    def __init__(self) -> None:
        self.reading = True

    def pause_reading(self) -> None:
        assert self.reading
        self.reading = False

    def resume_reading(self) -> None:
        assert not self.reading
        self.reading = True

    def is_closing(self) -> bool:
        return False


@given(st.lists(st.tuples(st.booleans(), st.sampled_from([PIPELINE, BACKLOG, PEER_FULL]))))
def test_reading_resumes_only_when_no_reason_holds(steps: list[tuple[bool, int]]) -> None:
    gate = ReadGate()
    transport = FakeTransport()
    gate.transport = transport  # type: ignore[assignment]
    held: set[int] = set()
    for pause, reason in steps:
        if pause:
            gate.pause(reason)
            held.add(reason)
        else:
            gate.resume(reason)
            held.discard(reason)
        assert transport.reading == (not held)
