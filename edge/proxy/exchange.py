"""One request and its response (the request cycle), and the narrow interface
between the upstream connection and the exchange it serves.

The state is explicit: the response side moves QUEUED -> CONNECTING ->
WAITING -> RESPONDING -> DONE (or TUNNEL after a 101); the request side is
RECEIVING until the client's body is complete. `may_retry` is pure.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Protocol

from edge.proxy.framing import Body, RequestPlan

if TYPE_CHECKING:
    from edge.pool import Backend

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Request bodies up to this size are held until the response starts, so the
# request can still be retried on another backend.
RETRY_BODY_LIMIT = 64 * 1024
MAX_ATTEMPTS = 2


class ExchangeState(enum.StrEnum):
    PARSING = "parsing"  # the request head is still arriving
    QUEUED = "queued"  # head complete: waits its turn (pipelining) or a backend
    CONNECTING = "connecting"  # a new backend connection is being opened
    WAITING = "waiting"  # the request went upstream; no response byte yet
    RESPONDING = "responding"  # response bytes flow to the client
    TUNNEL = "tunnel"  # after a 101: bytes both ways
    DONE = "done"


class RequestState(enum.StrEnum):
    RECEIVING = "receiving"  # body bytes still to come from the client
    COMPLETE = "complete"


class UpstreamFailure(enum.StrEnum):
    """How a backend failed one request. Only some of these say anything about the
    backend as a whole (`EVIDENCE`): the others are this request's failure."""

    CONNECT_FAILED = "connect_failed"
    FIRST_BYTE_TIMEOUT = "first_byte_timeout"
    BAD_RESPONSE = "bad_response"
    GATEWAY_ERROR = "gateway_error"  # it answered 5xx
    CLOSED_BEFORE_RESPONSE = "closed_before_response"
    RESET_BEFORE_RESPONSE = "reset_before_response"
    LOST_MID_RESPONSE = "lost_mid_response"
    READ_TIMEOUT = "read_timeout"


# What counts toward ejecting a backend (Envoy's consecutive gateway failures):
# it did not take the connection, did not answer in time, or answered garbage or 5xx.
# A backend closing or resetting a connection it had accepted fails that request
# only: keep-alive races and one client's odd request look exactly like that.
EVIDENCE = frozenset(
    {
        UpstreamFailure.CONNECT_FAILED,
        UpstreamFailure.FIRST_BYTE_TIMEOUT,
        UpstreamFailure.BAD_RESPONSE,
        UpstreamFailure.GATEWAY_ERROR,
    }
)


def may_retry(
    state: ExchangeState,
    method: str,
    attempts: int,
    body_held: bool,
    enabled: bool,
    failure: UpstreamFailure,
) -> bool:
    """Whether a failed attempt may go to another backend: nothing of the response
    reached the client, the request is idempotent, all of its body sent so far is
    still held, and it was not a timeout (the backend may still be doing it)."""
    return (
        enabled
        and state in (ExchangeState.CONNECTING, ExchangeState.WAITING, ExchangeState.QUEUED)
        and method in IDEMPOTENT
        and attempts < MAX_ATTEMPTS
        and body_held
        and failure is not UpstreamFailure.FIRST_BYTE_TIMEOUT
    )


class Upstream(Protocol):
    """What the client connection may ask of the upstream connection serving it."""

    def send_body(self, data: bytes) -> None: ...

    def send_eof(self) -> None: ...

    def request_sent(self) -> None: ...

    def abandon(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class Exchange:
    """One request and its response."""

    __slots__ = (
        "attempts",
        "backend",
        "body_buffer",
        "body_buffered",
        "body_held",
        "headers",
        "method",
        "plan",
        "rejection",
        "reported",
        "request",
        "state",
        "upstream",
        "url",
    )

    def __init__(self, method: str = "", plan: RequestPlan | None = None) -> None:
        self.state = ExchangeState.PARSING
        self.request = RequestState.RECEIVING
        self.method = method
        self.plan = plan
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        # The request body as sent upstream, while it may still be needed for a retry.
        self.body_buffer: list[bytes] = []
        self.body_buffered = 0
        self.body_held = True
        self.attempts = 0
        self.backend: Backend | None = None
        self.upstream: Upstream | None = None
        # Refused by the framing core: (status, reason, detail), answered in turn.
        self.rejection: tuple[int, str, bytes] | None = None
        # A failure of this request already counted toward ejecting a backend.
        self.reported = False

    @property
    def body(self) -> Body:
        return self.plan.body if self.plan is not None else Body.NONE

    @property
    def started(self) -> bool:
        """Some of the response went to the client."""
        return self.state in (ExchangeState.RESPONDING, ExchangeState.TUNNEL, ExchangeState.DONE)


class ExchangeOwner(Protocol):
    """All an upstream connection may tell the client side: the narrow interface
    between them. The upstream never touches the client's buffers or transport."""

    def write(self, data: bytes) -> None:
        """Bytes for the client, in order; sent at the next `flush`."""

    def flush(self) -> None: ...

    def keep_alive_allowed(self) -> bool: ...

    def response_head(self, ex: Exchange, status: int) -> None:
        """The backend's final answer was accepted; its head goes out next."""

    def response_complete(self, ex: Exchange, keep_alive: bool) -> None: ...

    def upstream_failed(self, ex: Exchange, failure: UpstreamFailure, detail: str) -> None:
        """The attempt failed before any response byte reached the client."""

    def response_broken(self, ex: Exchange, failure: UpstreamFailure, detail: str) -> None:
        """The response broke after it started: the client learns by the connection breaking."""

    def backend_rejected(self, reason: str) -> None:
        """The framing core refused the backend's answer (counted in metrics)."""

    def tunnel_established(self, upstream: Upstream) -> None: ...

    def tunnel_ended(self, clean: bool) -> None: ...

    def tunnel_eof(self) -> None: ...

    def pause_reading(self) -> None:
        """The backend reads slower than the client sends: stop reading the client."""

    def resume_reading(self) -> None: ...
