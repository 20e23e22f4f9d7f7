"""The framing core, with h11 as the independent oracle: whatever the core accepts
is forwarded as exactly one message whose body is the one that came in, and
nothing after it. llhttp (what the proxy parses clients with) reads the client's
bytes first, as it does in the proxy."""

from __future__ import annotations

from dataclasses import dataclass, field

import h11
import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as note_case
from hypothesis import strategies as st

from edge.proxy.framing import (
    CHUNKED_PREAMBLE,
    HOP_BY_HOP,
    LAST_CHUNK,
    Body,
    Limits,
    Reason,
    Rejected,
    RequestPlan,
    ResponsePlan,
    chunk,
    parser_error_reason,
    plan_request,
    plan_response,
    simple_request,
)

VIA = b"\r\nVia: 1.1 edge-a1.site-a"
CLIENT = b"198.18.0.9"


def respond(head: bytes, **kw: bool) -> ResponsePlan:
    args = {"head_request": False, "client_http10": False, "keep_alive": True} | kw
    return plan_response(head, VIA, **args)


def request(headers: list[tuple[bytes, bytes]], method: bytes = b"GET") -> RequestPlan:
    return plan_request(method, b"/", "1.1", headers, CLIENT, VIA)


def refused(reason: Reason, call: object, *args: object, **kw: object) -> None:
    with pytest.raises(Rejected) as info:
        call(*args, **kw)  # type: ignore[operator]
    assert info.value.reason is reason


# -- the vectors of issue 9, at the core -------------------------------------------------


def test_connection_cannot_remove_content_length_so_the_body_stays_one_request() -> None:
    for connection in (b"Content-Length", b"keep-alive, Content-Length", b"content-length"):
        plan = request(
            [(b"Host", b"x"), (b"Connection", connection), (b"Content-Length", b"43")], b"POST"
        )
        assert (plan.body, plan.length) == (Body.LENGTH, 43)
        assert b"\r\nContent-Length: 43\r\n" in plan.head


def test_connection_cannot_remove_the_proxys_own_headers_or_host() -> None:
    plan = request([(b"Host", b"x"), (b"Connection", b"X-Forwarded-For, Via, Host")])
    assert b"\r\nX-Forwarded-For: 198.18.0.9\r\n" in plan.head
    assert plan.head.endswith(VIA + b"\r\n\r\n") and b"\r\nHost: x\r\n" in plan.head


def test_backend_connection_cannot_remove_its_framing() -> None:
    plan = respond(
        b"HTTP/1.1 200 OK\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked"
    )
    assert plan.body is Body.CHUNKED and b"\r\nTransfer-Encoding: chunked\r\n" in plan.head
    plan = respond(b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 3")
    assert b"\r\nContent-Length: 3\r\n" in plan.head


def test_backend_with_both_lengths_is_chunked_and_its_connection_not_reused() -> None:
    plan = respond(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked")
    assert plan.body is Body.CHUNKED and plan.to_client is Body.CHUNKED
    assert b"Content-Length" not in plan.head and not plan.upstream_reusable


def test_two_hosts_and_other_ambiguous_requests_are_refused() -> None:
    refused(Reason.DUPLICATE_HOST, request, [(b"Host", b"x"), (b"Host", b"y")])
    refused(Reason.MISSING_HOST, request, [])
    refused(Reason.BAD_HOST, request, [(b"Host", b"a b")])
    refused(
        Reason.CONTENT_LENGTH_WITH_TRANSFER_ENCODING,
        request,
        [(b"Host", b"x"), (b"Content-Length", b"4"), (b"Transfer-Encoding", b"chunked")],
    )
    refused(
        Reason.CONFLICTING_CONTENT_LENGTH,
        request,
        [(b"Host", b"x"), (b"Content-Length", b"4"), (b"Content-Length", b"5")],
    )
    for bad in (b"-1", b"+4", b"4 4", b"0x4", b"", b"9" * 19):
        refused(Reason.BAD_CONTENT_LENGTH, request, [(b"Host", b"x"), (b"Content-Length", bad)])
    for te in (b"chunked, chunked", b"chunked, gzip", b"chunked;x", b"", b","):
        with pytest.raises(Rejected) as info:
            request([(b"Host", b"x"), (b"Transfer-Encoding", te)])
        assert info.value.status == 400, te
    refused(
        Reason.UNSUPPORTED_TRANSFER_CODING,
        request,
        [(b"Host", b"x"), (b"Transfer-Encoding", b"gzip, chunked")],
    )
    refused(
        Reason.TRANSFER_ENCODING_ON_HTTP10,
        plan_request,
        b"POST",
        b"/",
        "1.0",
        [(b"Transfer-Encoding", b"chunked")],
        CLIENT,
        VIA,
    )
    refused(Reason.BAD_HEADER, request, [(b"Host", b"x"), (b"X-A", b"a\r\nX-Injected: 1")])
    refused(Reason.BAD_HEADER, request, [(b"Host", b"x"), (b"Bad Name", b"1")])
    refused(Reason.METHOD_NOT_SUPPORTED, request, [(b"Host", b"x")], b"CONNECT")


def test_identical_repeated_lengths_collapse_and_te_obfuscations_are_read_strictly() -> None:
    plan = request([(b"Host", b"x"), (b"Content-Length", b"4, 4")], b"POST")
    assert plan.head.count(b"Content-Length") == 1 and plan.length == 4
    for te in (b"chunked", b"Chunked", b" chunked ", b"\tCHUNKED"):
        assert request([(b"Host", b"x"), (b"Transfer-Encoding", te)], b"POST").body is Body.CHUNKED


def test_absolute_form_target_sets_host() -> None:
    plan = plan_request(
        b"GET", b"http://example.org:8080/a?b", "1.1", [(b"Host", b"other")], CLIENT, VIA
    )
    assert plan.head.startswith(b"GET /a?b HTTP/1.1\r\nHost: example.org:8080\r\n")
    assert b"other" not in plan.head
    refused(Reason.BAD_TARGET, plan_request, b"GET", b"ftp://x/", "1.1", [], CLIENT, VIA)


def test_limits() -> None:
    small = Limits(header_bytes=64, headers=3, request_line=32)
    with pytest.raises(Rejected) as info:
        plan_request(b"GET", b"/" + b"a" * 40, "1.1", [(b"Host", b"x")], CLIENT, VIA, small)
    assert info.value.status == 414
    with pytest.raises(Rejected) as info:
        plan_request(
            b"GET", b"/", "1.1", [(b"Host", b"x")] + [(b"A", b"1")] * 3, CLIENT, VIA, small
        )
    assert info.value.status == 431
    with pytest.raises(Rejected) as info:
        plan_request(b"GET", b"/", "1.1", [(b"Host", b"x"), (b"A", b"1" * 80)], CLIENT, VIA, small)
    assert info.value.status == 431


def test_response_heads() -> None:
    plan = respond(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5"
    )
    assert plan.head == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nVia: 1.1 edge-a1.site-a\r\n\r\n"
    assert (plan.body, plan.to_client, plan.keep_alive, plan.upstream_reusable) == (
        Body.LENGTH,
        Body.LENGTH,
        True,
        True,
    )
    plan = respond(b"HTTP/1.0 200 OK\r\nServer: x")
    assert plan.body is Body.UNTIL_CLOSE and plan.to_client is Body.CHUNKED
    assert not plan.upstream_reusable
    plan = respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", client_http10=True)
    assert plan.to_client is Body.UNTIL_CLOSE and not plan.keep_alive
    assert b"chunked" not in plan.head and b"Connection: close" in plan.head
    head = respond(b"HTTP/1.1 200 OK\r\nContent-Length: 9", head_request=True)
    assert head.body is Body.NONE and b"Content-Length: 9" in head.head
    assert b"Content-Length" not in respond(b"HTTP/1.1 204 No Content\r\nContent-Length: 3").head
    assert respond(b"HTTP/1.1 304 Not Modified\r\nETag: x").body is Body.NONE
    plan = respond(
        b"HTTP/1.1 200 OK\r\nConnection: X-Secret, close\r\nX-Secret: 1\r\nX-Kept: 2\r\nContent-Length: 0"
    )
    assert b"X-Secret" not in plan.head and b"X-Kept: 2" in plan.head
    assert not plan.upstream_reusable and plan.keep_alive
    assert respond(b"HTTP/1.1 100 Continue").status == 100


def test_bad_responses_are_refused_with_502() -> None:
    for bad in (
        b"HTTP/2 200 OK",
        b"SIP/2.0 200 OK",
        b"HTTP/1.1 abc OK",
        b"HTTP/1.1",
        b"HTTP/1.1 200 OK\r\nX: a\nSet-Cookie: evil",  # response splitting with a bare LF
        b"HTTP/1.1 200 OK\r\nX : a",
        b"HTTP/1.1 200 OK\r\n folded",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6",
        b"HTTP/1.1 200 OK\r\nContent-Length: -5",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x",  # nobody asked
    ):
        with pytest.raises(Rejected) as info:
            respond(bad)
        assert info.value.status == 502, bad


def test_parser_error_reasons() -> None:
    assert (
        parser_error_reason("Content-Length can't be present with Transfer-Encoding")
        is Reason.CONTENT_LENGTH_WITH_TRANSFER_ENCODING
    )
    assert parser_error_reason("Invalid header value char") is Reason.BAD_HEADER
    assert parser_error_reason("nonsense") is Reason.BAD_HEAD


# -- properties, with h11 as the oracle ------------------------------------------------

NAMES = [
    "Host",
    "Content-Length",
    "Transfer-Encoding",
    "Connection",
    "Keep-Alive",
    "TE",
    "Trailer",
    "Upgrade",
    "Proxy-Connection",
    "X-Forwarded-For",
    "Via",
    "Accept",
    "Cookie",
    "X-A",
    "content-length",
    "TRANSFER-ENCODING",
]
VALUES = [
    "x",
    "5",
    "0",
    "05",
    "5, 5",
    "3",
    "chunked",
    " chunked",
    "Chunked",
    "chunked, identity",
    "gzip, chunked",
    "identity",
    "close",
    "keep-alive",
    "Content-Length",
    "Transfer-Encoding",
    "keep-alive, Content-Length",
    "X-Forwarded-For, Via",
    "Host",
    "upgrade",
    "198.18.0.1",
    "a=b; c=d",
]
# Mostly harmless headers, so that accepted messages of every framing are common.
header = st.one_of(
    st.tuples(
        st.sampled_from(["Accept", "Cookie", "X-A", "Server"]), st.sampled_from(["x", "a=b"])
    ),
    st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES)),
)


@dataclass
class Parsed:
    method: bytes = b""
    url: bytes = b""
    version: str = ""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False
    upgrade: bool = False


class _Collector:
    def __init__(self, parsed: Parsed) -> None:
        self.p = parsed
        self.parser: httptools.HttpRequestParser | None = None

    def on_url(self, url: bytes) -> None:
        self.p.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.p.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self.p.method = self.parser.get_method()
        self.p.version = self.parser.get_http_version()
        self.p.upgrade = self.parser.should_upgrade()

    def on_body(self, body: bytes) -> None:
        self.p.body += body

    def on_message_complete(self) -> None:
        self.p.complete = True
        raise StopIteration  # only the first message matters


def llhttp_first_request(data: bytes) -> Parsed | None:
    parsed = Parsed()
    collector = _Collector(parsed)
    parser = httptools.HttpRequestParser(collector)
    collector.parser = parser
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        return None
    except httptools.HttpParserError:
        if not parsed.complete:
            return None
    return parsed if parsed.complete else None


def encode_body(plan_body: Body, body: bytes) -> bytes:
    if plan_body is Body.CHUNKED:
        return (chunk(body) if body else b"") + LAST_CHUNK
    return body


def h11_body(conn: h11.Connection) -> bytes:
    """The body of the message h11 is on, up to its end (which must come)."""
    body = b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Data):
            body += event.data
            continue
        assert isinstance(event, h11.EndOfMessage), event
        return body


def h11_one_request(data: bytes) -> tuple[h11.Request, bytes]:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    request = conn.next_event()
    assert isinstance(request, h11.Request), request
    body = h11_body(conn)
    assert conn.trailing_data == (b"", False)  # nothing after the one request
    return request, body


def _request_of(data: bytes) -> h11.Request:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    return event


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS"]),
    st.sampled_from([b"/p?q=1", b"/", b"http://h.example/x"]),
    st.sampled_from([b"1.1", b"1.0"]),
    st.lists(header, max_size=5),
    st.sampled_from(["length", "chunked", "none"]),
    st.binary(max_size=40),
    st.sampled_from([b"", b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n", b"0\r\n\r\n"]),
)
def test_every_accepted_request_goes_upstream_as_exactly_one_request(
    method: bytes,
    target: bytes,
    version: bytes,
    headers: list[tuple[str, str]],
    framing: str,
    body: bytes,
    after: bytes,
) -> None:
    pairs = [(b"Host", b"h.example")] + [(n.encode(), v.encode()) for n, v in headers]
    if framing == "length":
        pairs.append((b"Content-Length", b"%d" % len(body)))
        wire_body = body
    elif framing == "chunked":
        pairs.append((b"Transfer-Encoding", b"chunked"))
        wire_body = encode_body(Body.CHUNKED, body)
    else:
        wire_body = b""
    raw = b"%b %b HTTP/%b\r\n" % (method, target, version)
    raw += b"".join(b"%b: %b\r\n" % p for p in pairs) + b"\r\n" + wire_body + after
    parsed = llhttp_first_request(raw)
    if parsed is None:
        return  # llhttp refused it: the proxy answers 400
    try:
        plan = plan_request(parsed.method, parsed.url, parsed.version, parsed.headers, CLIENT, VIA)
    except Rejected:
        return
    if plan.upgrade != parsed.upgrade:
        return  # the client connection refuses this mismatch (400)
    note_case(f"forwarded, body {plan.body}")
    upstream = plan.head + encode_body(plan.body, parsed.body)
    req, got = h11_one_request(upstream)
    assert got == parsed.body
    names = [n.lower() for n, _ in req.headers]
    assert names.count(b"host") == 1
    assert names.count(b"content-length") + names.count(b"transfer-encoding") <= 1
    assert dict(req.headers)[b"x-forwarded-for"].endswith(CLIENT)
    assert dict(req.headers)[b"via"] == b"1.1 edge-a1.site-a"
    own = {b"transfer-encoding"} if plan.body is Body.CHUNKED else set()
    if plan.upgrade:
        own |= {b"connection", b"upgrade"}
    assert set(names) & HOP_BY_HOP <= own


STATUSES = [200, 200, 201, 404, 500, 204, 304, 100, 103]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(STATUSES),
    st.sampled_from([b"1.1", b"1.1", b"1.0"]),
    st.lists(header, max_size=4),
    st.sampled_from(["length", "chunked", "none"]),
    st.binary(max_size=40),
    st.sampled_from([b"GET", b"HEAD"]),
    st.booleans(),
)
def test_every_accepted_response_reaches_the_client_as_exactly_one_response(
    status: int,
    version: bytes,
    headers: list[tuple[str, str]],
    framing: str,
    body: bytes,
    method: bytes,
    client_http10: bool,
) -> None:
    pairs = [(n.encode(), v.encode()) for n, v in headers if n.lower() != "host"]
    if framing == "length":
        pairs.append((b"Content-Length", b"%d" % len(body)))
        wire_body = body
    elif framing == "chunked":
        pairs.append((b"Transfer-Encoding", b"chunked"))
        wire_body = encode_body(Body.CHUNKED, body)
    else:
        wire_body = body
    head = b"HTTP/%b %d Reason" % (version, status) + b"".join(b"\r\n%b: %b" % p for p in pairs)
    try:
        plan = respond(head, head_request=method == b"HEAD", client_http10=client_http10)
    except Rejected:
        return
    if plan.status < 200:
        names = {line.split(b":")[0].lower() for line in plan.head.split(b"\r\n")[1:]}
        assert not names & {b"content-length", b"transfer-encoding"}
        return
    note_case(f"forwarded, body {plan.body} to the client {plan.to_client}")
    # What the backend's bytes are, read by the plan (as the upstream connection does).
    if plan.body is Body.NONE:
        decoded = b""
    elif plan.body is Body.LENGTH:
        if len(wire_body) < plan.length:
            return  # a truncated body: the proxy breaks the client connection
        decoded = wire_body[: plan.length]
    elif plan.body is Body.UNTIL_CLOSE:
        decoded = wire_body
    else:
        decoded = _dechunk(wire_body)
        if decoded is None:
            return  # not valid chunked: the proxy breaks the client connection
    to_client = plan.head
    if plan.to_client is Body.CHUNKED:
        to_client += encode_body(Body.CHUNKED, decoded)
    elif plan.to_client is not Body.NONE:
        to_client += decoded
    conn = h11.Connection(h11.CLIENT)
    # h11 only speaks HTTP/1.1; a close-delimited answer reads the same to it.
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(to_client)
    if plan.to_client is Body.UNTIL_CLOSE:
        conn.receive_data(b"")
    response = conn.next_event()
    assert isinstance(response, h11.Response) and response.status_code == status
    assert h11_body(conn) == decoded
    assert conn.trailing_data[0] == b""  # nothing after the one response
    for name, value in response.headers:
        if name == b"transfer-encoding":
            assert value == b"chunked"
        elif name == b"connection":
            assert value == b"close"
        else:
            assert name not in HOP_BY_HOP
    assert dict(response.headers)[b"via"] == b"1.1 edge-a1.site-a"


def _dechunk(wire: bytes) -> bytes | None:
    out: list[bytes] = []

    class Sink:
        done = False

        def on_body(self, data: bytes) -> None:
            out.append(data)

        def on_message_complete(self) -> None:
            Sink.done = True

    parser = httptools.HttpResponseParser(Sink())
    try:
        parser.feed_data(CHUNKED_PREAMBLE + wire)
    except httptools.HttpParserError:
        return None
    return b"".join(out) if Sink.done else None


simple_name = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=10)
simple_header = st.tuples(
    st.one_of(simple_name, st.sampled_from(["Host", "Accept", "Cookie", "Te", "X-Forwarded-For"])),
    st.text("abcxyz0123 ,.=:", max_size=12).map(str.strip),
)


@settings(max_examples=400)
@given(st.lists(simple_header, max_size=8), st.sampled_from([b"GET", b"DELETE", b"OPTIONS"]))
def test_the_fast_path_decides_as_the_core_does(
    headers: list[tuple[str, str]], method: bytes
) -> None:
    pairs = [(n.encode(), v.encode()) for n, v in headers]
    raw = b"%b /p?q=1 HTTP/1.1" % method + b"".join(b"\r\n%b: %b" % p for p in pairs)
    if llhttp_first_request(raw + b"\r\n\r\n") is None:
        return
    fast = simple_request(raw, CLIENT, VIA)
    if fast is None:
        return  # not for the fast path: plan_request decides
    parsed = llhttp_first_request(raw + b"\r\n\r\n")
    assert parsed is not None
    slow = plan_request(parsed.method, parsed.url, parsed.version, parsed.headers, CLIENT, VIA)
    assert (fast.body, fast.keep_alive, fast.http_10, fast.upgrade) == (
        slow.body,
        slow.keep_alive,
        slow.http_10,
        slow.upgrade,
    )
    a, b = _request_of(fast.head), _request_of(slow.head)
    assert (a.method, a.target, a.headers) == (b.method, b.target, b.headers)


def test_the_fast_path_takes_the_common_request() -> None:
    plan = simple_request(b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAccept: */*", CLIENT, VIA)
    assert plan is not None
    assert plan.head == (
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAccept: */*\r\n"
        b"X-Forwarded-For: 198.18.0.9\r\nVia: 1.1 edge-a1.site-a\r\n\r\n"
    )
    for other in (
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b",
        b"GET / HTTP/1.1\r\nAccept: */*",
        b"GET / HTTP/1.0\r\nHost: a",
        b"GET http://a/ HTTP/1.1\r\nHost: a",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close",
        b"GET / HTTP/1.1\r\nHost: a b",
    ):
        assert simple_request(other, CLIENT, VIA) is None, other


def test_llhttp_refuses_exactly_the_header_bytes_the_core_refuses() -> None:
    """What lets the fast path skip checking header bytes: whatever byte a value holds,
    llhttp (which sees the head first) and `plan_request` agree."""
    for byte in range(256):
        if byte in (0x0D, 0x0A):
            continue  # line ends: llhttp refuses bare ones (the vectors test that)
        value = b"a" + bytes([byte]) + b"b"
        raw = b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + value + b"\r\n\r\n"
        accepted_by_llhttp = llhttp_first_request(raw) is not None
        try:
            plan_request(b"GET", b"/", "1.1", [(b"Host", b"x"), (b"X-A", value)], CLIENT, VIA)
            accepted_by_core = True
        except Rejected:
            accepted_by_core = False
        assert accepted_by_llhttp == accepted_by_core, hex(byte)
