"""Forwarded HTTP/1.1 heads: hop-by-hop headers, framing, smuggling."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.proxy.http1 import (
    HOP_BY_HOP,
    Framing,
    HeadError,
    build_request_head,
    rewrite_response_head,
)

VIA = b"\r\nVia: 1.1 edge-a1.site-a"


def rewrite(head: bytes, **kw: bool) -> tuple[bytes, Framing, bool, bool]:
    args = {"head_request": False, "client_http10": False, "keep_alive": True} | kw
    r = rewrite_response_head(head, VIA, **args)
    return r.data, r.framing, r.upstream_eof, r.keep_alive


def test_content_length_passes_through_and_hop_by_hop_goes() -> None:
    data, framing, eof, keep = rewrite(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5"
    )
    assert data == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nVia: 1.1 edge-a1.site-a\r\n\r\n"
    assert (framing, eof, keep) == (Framing.LENGTH, False, True)


def test_chunked_upstream_is_rechunked_and_eof_upstream_too() -> None:
    data, framing, eof, _ = rewrite(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked")
    assert framing is Framing.CHUNKED and not eof
    assert data.count(b"Transfer-Encoding") == 1
    _, framing, eof, _ = rewrite(b"HTTP/1.0 200 OK\r\nServer: x")
    assert framing is Framing.CHUNKED and eof


def test_http10_client_gets_close_delimited_body() -> None:
    data, framing, _, keep = rewrite(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", client_http10=True
    )
    assert framing is Framing.CLOSE and not keep
    assert b"chunked" not in data and b"Connection: close" in data


def test_no_body_for_head_204_304() -> None:
    assert rewrite(b"HTTP/1.1 200 OK\r\nContent-Length: 9", head_request=True)[1] is Framing.NONE
    assert rewrite(b"HTTP/1.1 204 No Content")[1] is Framing.NONE
    assert rewrite(b"HTTP/1.1 304 Not Modified\r\nETag: x")[1] is Framing.NONE


def test_connection_named_headers_are_dropped() -> None:
    data, *_ = rewrite(
        b"HTTP/1.1 200 OK\r\nConnection: X-Secret, close\r\nX-Secret: 1\r\nX-Kept: 2\r\nContent-Length: 0"
    )
    assert b"X-Secret" not in data and b"X-Kept: 2" in data


def test_header_names_are_case_insensitive() -> None:
    data, framing, *_ = rewrite(
        b"HTTP/1.1 200 OK\r\nCONTENT-LENGTH: 1\r\nkeep-ALIVE: 1\r\nUpgrade: h2c"
    )
    assert framing is Framing.LENGTH and b"keep-ALIVE" not in data and b"Upgrade" not in data


def test_informational_and_bad_status_lines() -> None:
    assert (
        rewrite_response_head(
            b"HTTP/1.1 100 Continue", VIA, head_request=False, client_http10=False, keep_alive=True
        ).status
        == 100
    )
    for bad in (b"HTTP/2 200 OK", b"SIP/2.0 200 OK", b"HTTP/1.1 abc OK", b"HTTP/1.1"):
        with pytest.raises(HeadError):
            rewrite(bad)


def test_request_head() -> None:
    head = build_request_head(
        b"GET",
        b"/x?y=1",
        [
            (b"Host", b"a"),
            (b"Connection", b"keep-alive, X-Drop"),
            (b"X-Drop", b"1"),
            (b"X-Forwarded-For", b"198.18.0.1"),
            (b"TE", b"trailers"),
            (b"Accept", b"*/*"),
        ],
        b"198.18.0.9",
        VIA,
    )
    assert head.data == (
        b"GET /x?y=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n"
        b"X-Forwarded-For: 198.18.0.1, 198.18.0.9\r\nVia: 1.1 edge-a1.site-a\r\n\r\n"
    )
    assert not head.chunked


def test_request_smuggling_is_refused() -> None:
    with pytest.raises(HeadError):
        build_request_head(
            b"POST",
            b"/",
            [(b"Content-Length", b"4"), (b"Transfer-Encoding", b"chunked")],
            b"1",
            VIA,
        )
    head = build_request_head(b"POST", b"/", [(b"Transfer-Encoding", b"chunked")], b"1", VIA)
    assert head.chunked and head.data.count(b"Transfer-Encoding: chunked") == 1


names = st.sampled_from([h.decode() for h in HOP_BY_HOP] + ["X-A", "Server", "Date", "Set-Cookie"])
header = st.tuples(
    names.map(lambda n: n.title() if len(n) % 2 else n.upper()), st.text("abc =;", max_size=8)
)


@given(st.lists(header, max_size=10), st.booleans())
def test_no_hop_by_hop_header_ever_survives(headers: list[tuple[str, str]], http10: bool) -> None:
    head = b"HTTP/1.1 200 OK" + b"".join(f"\r\n{n}: {v}".encode() for n, v in headers)
    data = rewrite_response_head(
        head, VIA, head_request=False, client_http10=http10, keep_alive=True
    ).data
    lines = data.split(b"\r\n")[1:]
    for line in lines:
        name = line.split(b":", 1)[0].strip().lower()
        if name == b"transfer-encoding":
            assert line == b"Transfer-Encoding: chunked"
        elif name == b"connection":
            assert line == b"Connection: close"
        else:
            assert name not in HOP_BY_HOP
    assert data.endswith(VIA + b"\r\n\r\n")


from edge.proxy.http1 import rewrite_request_head  # noqa: E402

token = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=10)
request_header = st.tuples(
    st.one_of(
        token,
        st.sampled_from(
            ["Connection", "Keep-Alive", "X-Forwarded-For", "TE", "Accept", "Upgrade", "Host"]
        ),
    ),
    st.text("abcxyz0123 ,.=", max_size=12).map(str.strip),
)


@given(st.lists(request_header, max_size=8), st.sampled_from([b"GET", b"DELETE", b"OPTIONS"]))
def test_raw_and_parsed_request_heads_agree(headers: list[tuple[str, str]], method: bytes) -> None:
    """The fast path (raw bytes) and the parsed path build the same upstream head."""
    pairs = [(n.encode(), v.encode()) for n, v in headers]
    raw = b"%b /p?q=1 HTTP/1.1" % method + b"".join(b"\r\n%b: %b" % p for p in pairs)
    try:
        parsed = build_request_head(method, b"/p?q=1", pairs, b"198.18.0.9", VIA)
    except HeadError:
        with pytest.raises(HeadError):
            rewrite_request_head(raw, b"198.18.0.9", VIA)
        return
    assert rewrite_request_head(raw, b"198.18.0.9", VIA) == parsed
