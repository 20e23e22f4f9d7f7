"""The life cycle of one L4 flow, as a small pure state machine (no I/O).

Each direction is open, finished by its sender with the FIN still to pass on
(the backend connection is not up yet), or shut (FIN passed on). Whatever
order FIN, close and RST come in on either side, the flow ends with both
sockets closed: when both directions are shut, both are closed; when one side
is gone, the other is closed after what is queued for it (aborted instead
when the side that went reset); an RST is passed on as an RST.

`FlowState.on(event)` returns the actions for the driver (`l4.py`) to take.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Half(enum.StrEnum):
    OPEN = "open"
    FIN_PENDING = "fin_pending"  # the sender finished; its FIN waits for the peer to exist
    SHUT = "shut"  # the sender finished and its FIN was passed on


class Phase(enum.StrEnum):
    CONNECTING = "connecting"  # client accepted, backend connection not up yet
    OPEN = "open"
    CLOSED = "closed"  # both sockets closed or being closed
    RESET = "reset"  # ended by an RST (passed on) or an abort


class Event(enum.StrEnum):
    CONNECTED = "connected"  # the backend connection is up
    CONNECT_FAILED = "connect_failed"  # no backend could be reached
    CLIENT_FIN = "client_fin"
    BACKEND_FIN = "backend_fin"
    CLIENT_CLOSED = "client_closed"  # the client socket is gone (no error)
    BACKEND_CLOSED = "backend_closed"
    CLIENT_RESET = "client_reset"  # the client socket is gone with an error (RST)
    BACKEND_RESET = "backend_reset"
    IDLE = "idle"  # nothing moved either way for the L4 idle timeout


class Action(enum.StrEnum):
    SHUT_BACKEND = "shut_backend"  # pass the client's FIN on (write_eof)
    SHUT_CLIENT = "shut_client"
    CLOSE_CLIENT = "close_client"  # close once what is queued for it is written
    CLOSE_BACKEND = "close_backend"
    ABORT_CLIENT = "abort_client"  # close at once (RST)
    ABORT_BACKEND = "abort_backend"


_CLOSE_BOTH = (Action.CLOSE_CLIENT, Action.CLOSE_BACKEND)
_ABORT_BOTH = (Action.ABORT_CLIENT, Action.ABORT_BACKEND)


@dataclass(slots=True)
class FlowState:
    phase: Phase = Phase.CONNECTING
    inbound: Half = Half.OPEN  # client -> backend
    outbound: Half = Half.OPEN  # backend -> client

    @property
    def ended(self) -> bool:
        return self.phase in (Phase.CLOSED, Phase.RESET)

    def on(self, event: Event) -> tuple[Action, ...]:
        if self.ended:
            # Sockets already closing: an abort still wins over a graceful close.
            if event is Event.IDLE:
                return _ABORT_BOTH
            if event is Event.CLIENT_RESET:
                return (Action.ABORT_BACKEND,)
            if event is Event.BACKEND_RESET:
                return (Action.ABORT_CLIENT,)
            return ()
        if event is Event.CONNECTED:
            self.phase = Phase.OPEN
            if self.inbound is Half.FIN_PENDING:
                self.inbound = Half.SHUT
                return (Action.SHUT_BACKEND,)
            return ()
        if event is Event.CLIENT_FIN:
            if self.phase is Phase.CONNECTING:
                self.inbound = Half.FIN_PENDING
                return ()
            self.inbound = Half.SHUT
            if self.outbound is Half.SHUT:
                self.phase = Phase.CLOSED
                return (Action.SHUT_BACKEND, *_CLOSE_BOTH)
            return (Action.SHUT_BACKEND,)
        if event is Event.BACKEND_FIN:
            self.outbound = Half.SHUT
            if self.inbound is Half.SHUT:
                self.phase = Phase.CLOSED
                return (Action.SHUT_CLIENT, *_CLOSE_BOTH)
            return (Action.SHUT_CLIENT,)
        if event is Event.CLIENT_CLOSED:
            self.phase = Phase.CLOSED
            return (Action.CLOSE_BACKEND,)
        if event is Event.BACKEND_CLOSED:
            self.phase = Phase.CLOSED
            return (Action.CLOSE_CLIENT,)
        if event is Event.CLIENT_RESET:
            self.phase = Phase.RESET
            return (Action.ABORT_BACKEND,)
        if event is Event.BACKEND_RESET or event is Event.CONNECT_FAILED:
            self.phase = Phase.RESET
            return (Action.ABORT_CLIENT,)
        # IDLE
        self.phase = Phase.CLOSED
        return _CLOSE_BOTH
