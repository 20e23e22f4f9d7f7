"""HTTP/1.1 framing for the proxy, requests and responses alike. Pure: no I/O.

Every message the proxy forwards is decided here and nowhere else (RFC 9112
§6-7, RFC 9110 §7.6.1):

- how its body is delimited as it arrives (`Body`: Content-Length n, chunked,
  until the sender closes, none);
- the head it is forwarded with. The framing header in that head is always
  the proxy's own, written from the same decision that forwards the body, so a
  forwarded message is delimited exactly as its body is sent: Content-Length
  bodies pass as they are under our `Content-Length: n`, anything else is
  re-chunked under our `Transfer-Encoding: chunked` (or, toward an HTTP/1.0
  client, delimited by closing);
- or its rejection (`Rejected`, with a `Reason`): 400 toward a client (never
  forwarded, connection closed), 502 for a backend (its connection closed).

Hop-by-hop headers go both ways, with the headers a Connection header names,
except the ones that can never be connection options: the framing headers,
Host, and the headers the proxy writes itself (X-Forwarded-For, Via). A client
naming one of those in Connection changes nothing.

Both a request with Content-Length and Transfer-Encoding (how smuggling
starts) and any doubt about a request's length are rejected. A response with
both is forwarded as chunked with its Content-Length dropped, as RFC 9112 §6.3
(3) requires of an intermediary that forwards it; the backend connection is
then not reused, since what it sent is suspect.

The fast path (`simple_request`) takes the common body-less request from its
raw bytes; it returns None for anything it does not handle, and property tests
prove it builds what `plan_request` does.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Never removed because a Connection header names them.
PROTECTED = frozenset(
    {b"content-length", b"transfer-encoding", b"host", b"x-forwarded-for", b"via"}
)
# Connection tokens that are options, not header names.
_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade", b""})


class Body(enum.StrEnum):
    NONE = "none"
    LENGTH = "length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until_close"


class Reason(enum.StrEnum):
    """Why a message was rejected; counted in /metrics."""

    BAD_HEAD = "bad_head"
    BAD_VERSION = "bad_version"
    BAD_TARGET = "bad_target"
    BAD_HEADER = "bad_header"
    BAD_CONTENT_LENGTH = "bad_content_length"
    CONFLICTING_CONTENT_LENGTH = "conflicting_content_length"
    CONTENT_LENGTH_WITH_TRANSFER_ENCODING = "content_length_with_transfer_encoding"
    BAD_TRANSFER_ENCODING = "bad_transfer_encoding"
    UNSUPPORTED_TRANSFER_CODING = "unsupported_transfer_coding"
    TRANSFER_ENCODING_ON_HTTP10 = "transfer_encoding_on_http10"
    MISSING_HOST = "missing_host"
    DUPLICATE_HOST = "duplicate_host"
    BAD_HOST = "bad_host"
    HEADERS_TOO_LARGE = "headers_too_large"
    TOO_MANY_HEADERS = "too_many_headers"
    REQUEST_LINE_TOO_LONG = "request_line_too_long"
    METHOD_NOT_SUPPORTED = "method_not_supported"
    BAD_STATUS = "bad_status"
    UNEXPECTED_SWITCH = "unexpected_switch"


class Rejected(ValueError):
    def __init__(self, reason: Reason, status: int, detail: str = "") -> None:
        super().__init__(detail or str(reason))
        self.reason = reason
        self.status = status


@dataclass(frozen=True, slots=True)
class Limits:
    header_bytes: int = 65536
    headers: int = 100
    request_line: int = 8192


# -- shared rules -------------------------------------------------------------------

_MAX_LENGTH_DIGITS = 18
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# reg-name / IP-literal, optional port (RFC 3986 §3.2.2); no userinfo, no spaces.
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+;=%-]*)(?::[0-9]*)?")


def _content_length(values: Sequence[bytes], status: int) -> int:
    """One length from every Content-Length value; identical repeats collapse."""
    if len(values) == 1:
        item = values[0].strip(b" \t")
        if item.isdigit() and len(item) <= _MAX_LENGTH_DIGITS:
            return int(item)
    length = -1
    for value in values:
        for part in value.split(b","):
            item = part.strip(b" \t")
            if not item.isdigit() or len(item) > _MAX_LENGTH_DIGITS:
                raise Rejected(Reason.BAD_CONTENT_LENGTH, status)
            if length >= 0 and int(item) != length:
                raise Rejected(Reason.CONFLICTING_CONTENT_LENGTH, status)
            length = int(item)
    return length


def _chunked(values: Sequence[bytes], status: int, unsupported: int) -> None:
    """Transfer-Encoding must be exactly `chunked` (the only coding we forward)."""
    codings = [c.strip(b" \t").lower() for v in values for c in v.split(b",")]
    if codings == [b"chunked"]:
        return
    if not codings or any(not c or not _TOKEN.fullmatch(c) for c in codings):
        raise Rejected(Reason.BAD_TRANSFER_ENCODING, status)
    if codings[-1] != b"chunked" or codings.count(b"chunked") > 1:
        raise Rejected(Reason.BAD_TRANSFER_ENCODING, status)
    raise Rejected(Reason.UNSUPPORTED_TRANSFER_CODING, unsupported)


def _connection_tokens(values: Sequence[bytes]) -> set[bytes]:
    return {t.strip(b" \t").lower() for v in values for t in v.split(b",")}


def _framing_header(body: Body, length: int) -> bytes:
    if body is Body.LENGTH:
        return b"\r\nContent-Length: %d" % length
    if body is Body.CHUNKED:
        return b"\r\nTransfer-Encoding: chunked"
    return b""


# -- requests -------------------------------------------------------------------------


class RequestPlan(NamedTuple):  # a tuple: cheapest to build on the hot path
    head: bytes  # the head sent upstream, ending in CRLF CRLF
    body: Body  # NONE, LENGTH or CHUNKED: how the client delimits it, and how we forward it
    length: int  # with LENGTH
    keep_alive: bool  # the client's connection may carry another request
    http_10: bool
    upgrade: bool  # a protocol upgrade (Upgrade kept, `Connection: Upgrade` sent)


def plan_request(
    method: bytes,
    target: bytes,
    version: str,
    headers: Sequence[tuple[bytes, bytes]],
    client_address: bytes,
    via: bytes,
    limits: Limits = Limits(),
) -> RequestPlan:
    """Decide a parsed request: its framing and the head sent upstream, or `Rejected`.

    `via` is the complete Via header line to add, starting with CRLF.
    """
    if len(method) + len(target) + 10 > limits.request_line:
        raise Rejected(Reason.REQUEST_LINE_TOO_LONG, 414)
    if len(headers) > limits.headers:
        raise Rejected(Reason.TOO_MANY_HEADERS, 431)
    if version not in ("1.1", "1.0"):
        raise Rejected(Reason.BAD_VERSION, 505)
    if method == b"CONNECT":
        raise Rejected(Reason.METHOD_NOT_SUPPORTED, 501, "CONNECT is not supported")
    http_10 = version == "1.0"
    lengths: list[bytes] = []
    codings: list[bytes] = []
    connection: list[bytes] = []
    hosts: list[bytes] = []
    forwarded: list[bytes] = []
    upgrade_values: list[bytes] = []
    size = 0
    for name, value in headers:
        size += len(name) + len(value) + 4
        if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
            raise Rejected(Reason.BAD_HEADER, 400)
        lname = name.lower()
        if lname == b"content-length":
            lengths.append(value)
        elif lname == b"transfer-encoding":
            codings.append(value)
        elif lname == b"connection":
            connection.append(value)
        elif lname == b"host":
            hosts.append(value.strip(b" \t"))
        elif lname == b"x-forwarded-for":
            forwarded.append(value.strip(b" \t"))
        elif lname == b"upgrade":
            upgrade_values.append(value)
    if size > limits.header_bytes:
        raise Rejected(Reason.HEADERS_TOO_LARGE, 431)
    # The target: origin-form, `*` for OPTIONS, or absolute-form whose authority
    # then replaces Host (RFC 9112 §3.2.2, §3.2.4).
    if target[:1] != b"/" and not (target == b"*" and method == b"OPTIONS"):
        target, authority = _absolute_form(target)
        hosts = [authority]
    if len(hosts) > 1:
        raise Rejected(Reason.DUPLICATE_HOST, 400)
    if not hosts and not http_10:
        raise Rejected(Reason.MISSING_HOST, 400)
    if hosts and not _HOST.fullmatch(hosts[0]):
        raise Rejected(Reason.BAD_HOST, 400)
    if codings:
        if http_10:
            raise Rejected(Reason.TRANSFER_ENCODING_ON_HTTP10, 400)
        if lengths:
            raise Rejected(Reason.CONTENT_LENGTH_WITH_TRANSFER_ENCODING, 400)
        _chunked(codings, 400, 501)
        body, length = Body.CHUNKED, 0
    elif lengths:
        # Content-Length: 0 is forwarded as it is (some backends want a length on POST).
        length = _content_length(lengths, 400)
        body = Body.LENGTH
    else:
        body, length = Body.NONE, 0
    tokens = _connection_tokens(connection)
    upgrade = b"upgrade" in tokens and bool(upgrade_values)
    if upgrade and (body is Body.CHUNKED or length):
        # After the head the bytes are the new protocol's: a body would be ambiguous.
        raise Rejected(Reason.BAD_HEAD, 400, "protocol upgrade with a body")
    keep_alive = not http_10 and b"close" not in tokens and not upgrade
    named = tokens - _OPTIONS - PROTECTED
    # HTTP/1.1 upstream needs a Host: empty when an HTTP/1.0 client sent none.
    parts = [method, b" ", target, b" HTTP/1.1\r\nHost: ", hosts[0] if hosts else b""]
    for name, value in headers:
        lname = name.lower()
        if lname in _REQUEST_OWN or lname in named:
            if upgrade and lname == b"upgrade":
                parts += (b"\r\n", name, b": ", value)
            continue
        parts += (b"\r\n", name, b": ", value)
    if upgrade:
        parts.append(b"\r\nConnection: Upgrade")
    parts.append(_framing_header(body, length))
    forwarded.append(client_address)
    parts += (b"\r\nX-Forwarded-For: ", b", ".join(forwarded), via, b"\r\n\r\n")
    return RequestPlan(b"".join(parts), body, length, keep_alive, http_10, upgrade)


# Headers of a request that the plan writes itself or drops.
_REQUEST_OWN = HOP_BY_HOP | {b"content-length", b"host", b"x-forwarded-for"}


def _absolute_form(target: bytes) -> tuple[bytes, bytes]:
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise Rejected(Reason.BAD_TARGET, 400)
    slash = rest.find(b"/")
    authority, path = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
    if not authority or b"@" in authority:
        raise Rejected(Reason.BAD_TARGET, 400)
    return path, authority


# In a lowercased head: the header lines the fast path leaves to `plan_request`
# (framing, hop-by-hop, forwarding), and Host, which it must see exactly once.
_NOT_SIMPLE = re.compile(
    rb"\r\n(?:content-length|transfer-encoding|connection|keep-alive|proxy-|te|trailer|"
    rb"upgrade|x-forwarded-for|(host))"
)


def simple_request(
    head: bytes, client_address: bytes, via: bytes, limits: Limits = Limits()
) -> RequestPlan | None:
    """The fast path: a raw HTTP/1.1 head without the final CRLF CRLF, with one Host,
    an origin-form target and no framing, hop-by-hop or forwarding header. None when
    it is anything else (then `plan_request` decides).

    The head must have been accepted by llhttp first: llhttp refuses exactly the
    header bytes `plan_request` refuses (a unit test proves it), which this function
    then need not look at again.
    """
    line_end = head.find(b"\r\n")
    if (
        line_end < 0
        or line_end + 10 > limits.request_line
        or len(head) > limits.header_bytes
        or head.count(b"\r\n") > limits.headers
        or head[line_end - 9 : line_end] != b" HTTP/1.1"
        or head[head.find(b" ") + 1 : head.find(b" ") + 2] != b"/"
    ):
        return None
    host_at = -1
    for match in _NOT_SIMPLE.finditer(head.lower()):
        if match.group(1) is None or host_at >= 0:
            return None
        host_at = match.start()
    if host_at < 0 or head[host_at + 6 : host_at + 7] != b":":
        return None
    host_end = head.find(b"\r\n", host_at + 7)
    if host_end < 0:
        host_end = len(head)
    host = head[host_at + 7 : host_end].strip(b" \t")
    if not _HOST.fullmatch(host):
        return None
    data = b"".join(
        (
            head[:line_end],
            b"\r\nHost: ",
            host,
            head[line_end:host_at],
            head[host_end:],
            b"\r\nX-Forwarded-For: ",
            client_address,
            via,
            b"\r\n\r\n",
        )
    )
    return RequestPlan(data, Body.NONE, 0, True, False, False)


# -- responses ------------------------------------------------------------------------

_FIELD_LINE = rb"\r\n[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t \x21-\x7e\x80-\xff]*"
_RESPONSE_HEAD = re.compile(
    rb"HTTP/1\.[01] [1-9][0-9][0-9](?: [\t \x21-\x7e\x80-\xff]*)?(?:" + _FIELD_LINE + rb")*"
)
# The lines of a (validated, lowercased) response head that framing and hop-by-hop
# handling must see; spans are the same in the original head.
_NOTABLE_LINE = re.compile(
    rb"\r\n(content-length|" + b"|".join(re.escape(h) for h in sorted(HOP_BY_HOP)) + rb"):([^\r]*)"
)


class ResponsePlan(NamedTuple):
    status: int
    head: bytes  # the head for the client, ending in CRLF CRLF
    body: Body  # how the backend delimits the body
    length: int  # with LENGTH
    to_client: Body  # how we delimit it toward the client (UNTIL_CLOSE: by closing)
    keep_alive: bool  # the client's connection stays open after this response
    upstream_reusable: bool  # the backend connection may carry another request


def plan_response(
    head: bytes,
    via: bytes,
    *,
    head_request: bool,
    client_http10: bool,
    keep_alive: bool,
    upgrade: bool = False,
    limits: Limits = Limits(),
) -> ResponsePlan:
    """Decide a raw response head (status line and header lines, without the final
    CRLF CRLF): its framing and the head for the client, or `Rejected` (502).

    `keep_alive`: the client's connection may stay open as far as the client and the
    proxy are concerned. `upgrade`: the request asked for a protocol switch.
    """
    if len(head) > limits.header_bytes:
        raise Rejected(Reason.HEADERS_TOO_LARGE, 502)
    if not _RESPONSE_HEAD.fullmatch(head):
        raise Rejected(Reason.BAD_HEAD, 502)
    if head.count(b"\r\n") > limits.headers:
        raise Rejected(Reason.TOO_MANY_HEADERS, 502)
    status = int(head[9:12])
    http_10 = head[7:8] == b"0"
    if status > 599:
        raise Rejected(Reason.BAD_STATUS, 502)
    if status == 101:
        if not upgrade or http_10:
            raise Rejected(Reason.UNEXPECTED_SWITCH, 502)
        # Kept as sent (its Upgrade and Connection are the point), framing removed.
        kept = b"".join(m.group(0) for m in _LINE.finditer(head) if not _is_framing(m.group(0)))
        data = b"HTTP/1.1" + head[8 : head.find(b"\r\n") if b"\r\n" in head else len(head)]
        return ResponsePlan(
            status, data + kept + via + b"\r\n\r\n", Body.NONE, 0, Body.NONE, False, False
        )
    lengths: list[bytes] = []
    codings: list[bytes] = []
    tokens: set[bytes] = _NO_TOKENS
    line_end = head.find(b"\r\n")
    if line_end < 0:
        line_end = len(head)
    parts = [b"HTTP/1.1", head[8:line_end]]
    last = line_end
    for match in _NOTABLE_LINE.finditer(head.lower()):
        name, value = match.groups()
        if name == b"content-length":
            lengths.append(value)
        elif name == b"transfer-encoding":
            codings.append(value)
        elif name == b"connection":
            if b"," in value or tokens:
                tokens = tokens | _connection_tokens((value,))
            else:
                tokens = {value.strip(b" \t")}  # lowercased already
        start, end = match.span()
        parts.append(head[last:start])
        last = end
    parts.append(head[last:])
    reusable = b"close" not in tokens and (not http_10 or b"keep-alive" in tokens)
    length = 0
    if status < 200 or head_request or status in (204, 304):
        body = to_client = _NONE
        if lengths and not codings and status >= 200 and status != 204:
            # A HEAD or 304 answer may say how long the body would be.
            parts.append(b"\r\nContent-Length: %d" % _content_length(lengths, 502))
    else:
        if codings:
            if http_10:
                raise Rejected(Reason.TRANSFER_ENCODING_ON_HTTP10, 502)
            _chunked(codings, 502, 502)
            body = _CHUNKED
            # RFC 9112 §6.3 (3): chunked wins and Content-Length is dropped; what
            # else this backend connection carries is suspect, so it is not reused.
            reusable = reusable and not lengths
        elif lengths:
            length = _content_length(lengths, 502)
            body = _LENGTH
        else:
            body = _UNTIL_CLOSE
            reusable = False
        if body is _LENGTH:
            to_client = _LENGTH
            parts.append(b"\r\nContent-Length: %d" % length)
        elif client_http10:
            to_client = _UNTIL_CLOSE
        else:
            to_client = _CHUNKED
            parts.append(b"\r\nTransfer-Encoding: chunked")
    client_keep = keep_alive and not client_http10 and to_client is not _UNTIL_CLOSE
    if status >= 200 and not client_keep:
        parts.append(b"\r\nConnection: close")
    parts.append(via)
    data = b"".join(parts)
    if tokens and not tokens <= _OPTIONS and (named := tokens - _OPTIONS - PROTECTED):
        data = _drop_named(data, named)
    return ResponsePlan(status, data + b"\r\n\r\n", body, length, to_client, client_keep, reusable)


_NO_TOKENS: set[bytes] = set()
_NONE, _LENGTH, _CHUNKED, _UNTIL_CLOSE = Body.NONE, Body.LENGTH, Body.CHUNKED, Body.UNTIL_CLOSE


_LINE = re.compile(rb"\r\n[^\r]*")


def _is_framing(line: bytes) -> bool:
    name = line[2:].split(b":", 1)[0].lower()
    return name in (b"content-length", b"transfer-encoding")


def _drop_named(head: bytes, named: set[bytes]) -> bytes:
    """Remove the header lines a Connection header named (rare: not the fast path)."""
    lines = head.split(b"\r\n")
    kept = [lines[0]] + [ln for ln in lines[1:] if ln.split(b":", 1)[0].lower() not in named]
    return b"\r\n".join(kept)


# llhttp's own refusals of a request, by the words of its message.
_PARSER_REASONS = (
    (
        "Content-Length can't be present with Transfer-Encoding",
        Reason.CONTENT_LENGTH_WITH_TRANSFER_ENCODING,
    ),
    ("Duplicate Content-Length", Reason.CONFLICTING_CONTENT_LENGTH),
    ("Content-Length", Reason.BAD_CONTENT_LENGTH),
    ("Transfer-Encoding", Reason.BAD_TRANSFER_ENCODING),
    ("header", Reason.BAD_HEADER),
    ("version", Reason.BAD_VERSION),
    ("URL", Reason.BAD_TARGET),
    ("method", Reason.METHOD_NOT_SUPPORTED),
)


def parser_error_reason(message: str) -> Reason:
    """The metric reason for a request llhttp refused."""
    lowered = message.lower()
    for words, reason in _PARSER_REASONS:
        if words.lower() in lowered:
            return reason
    return Reason.BAD_HEAD


# -- bodies -----------------------------------------------------------------------------


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
# What llhttp is fed before a chunked body, so it decodes the body by our decision
# and not by its own reading of the backend's head.
CHUNKED_PREAMBLE = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
