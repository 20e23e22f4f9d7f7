"""HTTP/1.1 message heads, rewritten for forwarding. Pure: bytes in, bytes out.

Hop-by-hop headers (RFC 9110 7.6.1) are dropped both ways, and so is every
header that a Connection header names. The proxy then sets its own framing.
Response heads are rewritten from the raw bytes with compiled regexes rather
than per-header callbacks: it is the hot path, and this is ~3x cheaper.
"""

from __future__ import annotations

import enum
import re
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
# Matched against the lowercased head (faster than IGNORECASE): the header lines
# that framing or hop-by-hop handling must see. Spans are the same in both.
_NOTABLE_LINE = re.compile(
    rb"\r\n(content-length|"
    + b"|".join(re.escape(h) for h in sorted(HOP_BY_HOP))
    + rb")[ \t]*:([^\r]*)"
)
# Tokens of a Connection header that name no other header.
_CONNECTION_OPTIONS = frozenset({b"keep-alive", b"close", b""})


class HeadError(ValueError):
    """A message head that is not acceptable for forwarding."""


class Framing(enum.Enum):
    LENGTH = "length"  # Content-Length: bytes pass through as they are
    CHUNKED = "chunked"  # re-chunked by us
    CLOSE = "close"  # delimited by closing the client connection (HTTP/1.0 client)
    NONE = "none"  # no body (HEAD, 204, 304)


class ResponseHead(NamedTuple):
    data: bytes
    status: int
    framing: Framing
    # The upstream delimits the body by closing its connection.
    upstream_eof: bool
    keep_alive: bool
    # Body length when framing is LENGTH.
    content_length: int
    # The upstream connection cannot carry another request after this response.
    upstream_close: bool


def _drop_named(headers: bytes, tokens: set[bytes]) -> bytes:
    """Remove headers that a Connection header names (rare: not on the fast path)."""
    lines = headers.split(b"\r\n")
    kept = [ln for ln in lines if ln.split(b":", 1)[0].strip().lower() not in tokens]
    return b"\r\n".join(kept)


def rewrite_response_head(
    head: bytes,
    via: bytes,
    *,
    head_request: bool,
    client_http10: bool,
    keep_alive: bool,
) -> ResponseHead:
    """`head` is the status line and header lines, without the final CRLF CRLF.

    `via` is the complete header line to add, starting with CRLF.
    """
    if head[:7] != b"HTTP/1." or len(head) < 12 or head[8:9] != b" ":
        raise HeadError("bad status line")
    try:
        status = int(head[9:12])
    except ValueError:
        raise HeadError("bad status code") from None
    if status < 200:
        return ResponseHead(b"", status, Framing.NONE, False, keep_alive, 0, False)
    parts = [b"HTTP/1.1"]
    last = 8
    content_length = -1
    transfer_encoding: bytes | None = None
    named: set[bytes] = set()
    # HTTP/1.0 closes unless it says keep-alive; HTTP/1.1 stays open unless it says close.
    upstream_close = head[7:8] == b"0"
    for match in _NOTABLE_LINE.finditer(head.lower()):
        name = match.group(1)
        if name == b"content-length":
            value = match.group(2).strip()
            if not value.isdigit() or (content_length >= 0 and int(value) != content_length):
                raise HeadError("bad Content-Length")
            content_length = int(value)
            continue
        if name == b"transfer-encoding":
            transfer_encoding = match.group(2)
        elif name == b"connection":
            value = match.group(2).strip()
            if value == b"close":
                upstream_close = True
            elif value == b"keep-alive":
                upstream_close = False
            elif value:
                tokens = {t.strip() for t in value.split(b",")}
                upstream_close = b"close" in tokens or (
                    upstream_close and b"keep-alive" not in tokens
                )
                named.update(tokens)
        start, end = match.span()
        parts.append(head[last:start])
        last = end
    parts.append(head[last:])
    upstream_eof = False
    if head_request or status in (204, 304):
        framing = Framing.NONE
    elif transfer_encoding is not None:
        upstream_eof = b"chunked" not in transfer_encoding
        framing = Framing.CHUNKED
    elif content_length >= 0:
        framing = Framing.LENGTH
    else:
        upstream_eof = True
        framing = Framing.CHUNKED
    if client_http10:
        keep_alive = False
        if framing is Framing.CHUNKED:
            framing = Framing.CLOSE
    if framing is Framing.CHUNKED:
        parts.append(b"\r\nTransfer-Encoding: chunked")
    if not keep_alive:
        parts.append(b"\r\nConnection: close")
    parts.append(via)
    parts.append(b"\r\n\r\n")
    data = b"".join(parts)
    if named and (named := named - _CONNECTION_OPTIONS):
        data = _drop_named(data[:-4], named) + b"\r\n\r\n"
    return ResponseHead(
        data, status, framing, upstream_eof, keep_alive, max(content_length, 0), upstream_close
    )


def switching_protocols_head(head: bytes, via: bytes) -> bytes:
    """A 101 head for the client: kept as the backend sent it (its Upgrade and
    Connection headers are the point of it), on HTTP/1.1, with our Via added."""
    return b"HTTP/1.1" + head[8:] + via + b"\r\n\r\n"


class RequestHead(NamedTuple):
    data: bytes
    chunked: bool


def build_request_head(
    method: bytes,
    url: bytes,
    headers: list[tuple[bytes, bytes]],
    client_address: bytes,
    via: bytes,
    upgrade: bool = False,
) -> RequestHead:
    """The head sent upstream: HTTP/1.1, hop-by-hop dropped, X-Forwarded-For and Via added.

    `via` is the complete header line to add, starting with CRLF. With `upgrade` (a
    protocol upgrade such as WebSocket), Upgrade is kept and `Connection: Upgrade` sent.
    """
    parts = [method, b" ", url, b" HTTP/1.1"]
    forwarded: list[bytes] = []
    chunked = False
    content_length = False
    named: set[bytes] = set()
    for name, value in headers:
        lname = name.lower()
        if lname == b"connection":
            named.update(t.strip().lower() for t in value.split(b","))
    for name, value in headers:
        lname = name.lower()
        if upgrade and lname == b"upgrade":
            parts += (b"\r\n", name, b": ", value)
            continue
        if lname in HOP_BY_HOP or lname in named:
            if lname == b"transfer-encoding":
                chunked = True
            continue
        if lname == b"x-forwarded-for":
            forwarded.append(value)
            continue
        if lname == b"content-length":
            content_length = True
        parts += (b"\r\n", name, b": ", value)
    if upgrade:
        parts.append(b"\r\nConnection: Upgrade")
    return _end_request_head(parts, chunked, content_length, forwarded, client_address, via)


def _end_request_head(
    parts: list[bytes],
    chunked: bool,
    content_length: bool,
    forwarded: list[bytes],
    client_address: bytes,
    via: bytes,
) -> RequestHead:
    """Our framing and forwarding headers after the kept ones."""
    if chunked:
        if content_length:
            # Both framings at once is how request smuggling starts.
            raise HeadError("both Content-Length and Transfer-Encoding")
        parts.append(b"\r\nTransfer-Encoding: chunked")
    forwarded.append(client_address)
    parts += (b"\r\nX-Forwarded-For: ", b", ".join(forwarded), via, b"\r\n\r\n")
    return RequestHead(b"".join(parts), chunked)


_REQUEST_NOTABLE_LINE = re.compile(
    rb"\r\n(content-length|x-forwarded-for|"
    + b"|".join(re.escape(h) for h in sorted(HOP_BY_HOP))
    + rb")[ \t]*:([^\r]*)"
)


def rewrite_request_head(head: bytes, client_address: bytes, via: bytes) -> RequestHead:
    """The raw request head (validated by the parser, without the final CRLF CRLF)
    rewritten for upstream, as `build_request_head` does from parsed headers."""
    line_end = head.find(b"\r\n")
    request_line = head if line_end < 0 else head[:line_end]
    headers = b"" if line_end < 0 else head[line_end:]
    parts = [request_line[: request_line.rfind(b" ")], b" HTTP/1.1"]
    forwarded: list[bytes] = []
    chunked = content_length = False
    named: set[bytes] = set()
    last = 0
    for match in _REQUEST_NOTABLE_LINE.finditer(headers.lower()):
        name = match.group(1)
        if name == b"content-length":
            content_length = True
            continue
        if name == b"x-forwarded-for":
            forwarded.append(headers[match.start(2) : match.end(2)].strip())
        elif name == b"transfer-encoding":
            chunked = True
        elif name == b"connection":
            value = match.group(2).strip()
            if value not in _CONNECTION_OPTIONS:
                named.update(t.strip() for t in value.split(b","))
        start, end = match.span()
        parts.append(headers[last:start])
        last = end
    parts.append(headers[last:])
    result = _end_request_head(parts, chunked, content_length, forwarded, client_address, via)
    if named and (named := named - _CONNECTION_OPTIONS):
        return RequestHead(_drop_named(result.data[:-4], named) + b"\r\n\r\n", chunked)
    return result


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
