"""The L7 listener with real sockets: framing, headers, keep-alive, errors."""

from __future__ import annotations

import socket
import time

import httpx

from tests.support.site import Site


def raw(site: Site, payload: bytes, read_until_close: bool = True, timeout: float = 5) -> bytes:
    with socket.create_connection(("127.0.0.1", site.http_port), timeout=timeout) as s:
        s.sendall(payload)
        if not read_until_close:
            return s.recv(65536)
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
        return b"".join(chunks)


def test_via_header_and_forwarded_for(shared_site: Site) -> None:
    r = httpx.get(shared_site.http + "/headers", headers={"X-Forwarded-For": "198.18.0.9"})
    assert r.status_code == 200
    assert r.headers["via"] == "1.1 edge-t1.site-t"
    seen = r.text.lower()
    assert "x-forwarded-for: 198.18.0.9, 127.0.0.1" in seen
    assert "via: 1.1 edge-t1.site-t" in seen


def test_hop_by_hop_headers_dropped_both_ways(shared_site: Site) -> None:
    r = httpx.get(
        shared_site.http + "/headers",
        headers={
            "Connection": "keep-alive, X-Private",
            "X-Private": "1",
            "Keep-Alive": "timeout=9",
            "Proxy-Connection": "x",
            "TE": "trailers",
            "X-End-To-End": "yes",
        },
    )
    seen = r.text.lower()
    for header in ("x-private", "keep-alive", "proxy-connection", "te:", "connection"):
        assert header not in seen, header
    assert "x-end-to-end: yes" in seen
    r = httpx.get(shared_site.http + "/hop")
    assert "x-hop" not in r.headers and "keep-alive" not in r.headers
    assert r.text == "hop\n"


def test_keep_alive_and_pipelining_on_one_connection(shared_site: Site) -> None:
    request = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
    last = b"GET /bytes/5 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    out = raw(shared_site, request * 3 + last)
    assert out.count(b"HTTP/1.1 200") == 4
    assert out.endswith(b"xxxxx")
    assert out.index(b"b1\n") < out.index(b"xxxxx") or out.index(b"b2\n") < out.index(b"xxxxx")


def test_connection_close_and_http10_requests_are_answered_then_closed(shared_site: Site) -> None:
    # raw() reads until the proxy closes; its socket timeout turns a hang into a failure.
    for request in (
        b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.0\r\nConnection: close\r\n\r\n",
    ):
        out = raw(shared_site, request)
        assert out.startswith(b"HTTP/1.1 200") and b"\r\nConnection: close\r\n" in out, out


def test_streamed_bodies_of_any_size(shared_site: Site) -> None:
    with httpx.Client(base_url=shared_site.http, timeout=30) as client:
        r = client.get("/chunked/2000")
        assert r.status_code == 200 and r.headers["transfer-encoding"] == "chunked"
        assert len(r.text.splitlines()) == 2000
        r = client.get("/eof/300000")  # EOF-delimited upstream: re-chunked for a 1.1 client
        assert len(r.content) == 300000 and r.headers["transfer-encoding"] == "chunked"
        r = client.get("/bytes/20000000")
        assert len(r.content) == 20_000_000
        body = bytes(range(256)) * 20000  # 5 MB upload, Content-Length
        r = client.post("/echo", content=body)
        assert r.content == body

        def gen():  # chunked upload
            for _ in range(100):
                yield b"y" * 10000

        r = client.post("/echo", content=gen())
        assert r.content == b"y" * 1_000_000
        r = client.get("/")  # the connection is still good
        assert r.status_code == 200


def test_http10_client_gets_a_close_delimited_body(shared_site: Site) -> None:
    out = raw(shared_site, b"GET /chunked/3 HTTP/1.0\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"Connection: close" in head and b"chunked" not in head.lower()
    assert body.count(b"\n") == 3


def test_head_then_get_on_the_same_connection(shared_site: Site) -> None:
    out = raw(
        shared_site,
        b"HEAD /bytes/100 HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    first, _, rest = out.partition(b"\r\n\r\n")
    assert b"Content-Length: 100" in first
    assert rest.startswith(b"HTTP/1.1 200")
    assert rest.endswith(b"b1\n") or rest.endswith(b"b2\n")


def test_bad_requests_get_4xx_not_a_crash(shared_site: Site) -> None:
    assert raw(shared_site, b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400")
    smuggle = b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert raw(shared_site, smuggle).startswith(b"HTTP/1.1 400")
    huge = b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    assert raw(shared_site, huge).startswith(b"HTTP/1.1 431")
    # The agent still serves.
    assert httpx.get(shared_site.http + "/").status_code == 200


def test_admin_metrics_flows_and_events(shared_site: Site) -> None:
    admin = shared_site.agent.admin
    with socket.create_connection(("127.0.0.1", shared_site.tcp_port)) as held:
        held.sendall(b"GET /slow/300 HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.1)
        flows = httpx.get(admin + "/flows").json()
        mine = [f for f in flows["flows"] if f["client"].endswith(f":{held.getsockname()[1]}")]
        assert mine and mine[0]["listener"] == "tcp" and mine[0]["backend"] in ("b1", "b2")
        assert held.recv(4096).startswith(b"HTTP/1.1 200")
    metrics = httpx.get(admin + "/metrics").text
    assert 'anycast_edge_node_state{state="healthy"} 1.0' in metrics
    assert 'anycast_edge_backend_up{backend="b1",service="default"} 1.0' in metrics
    assert "anycast_edge_backend_requests_total" in metrics
    status = shared_site.agent.status()
    assert status["node"] == "edge-t1" and status["site"] == "site-t"
    assert {b["name"] for b in status["backends"]} == {"b1", "b2"}
    assert any(e["kind"] == "state" and e["new"] == "healthy" for e in status["events"])
    bad = httpx.get(admin + "/flows?limit=abc")
    assert bad.status_code == 400 and "limit" in bad.json()["error"]


def test_flow_events_stream(shared_site: Site) -> None:
    admin = shared_site.agent.admin
    seen: list[str] = []
    with httpx.Client(timeout=5) as client, client.stream("GET", admin + "/flows/stream") as stream:
        lines = stream.iter_lines()
        with socket.create_connection(("127.0.0.1", shared_site.http_port)) as s:
            port = s.getsockname()[1]
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            while s.recv(4096):
                pass
        for _, line in zip(range(1000), lines, strict=False):  # bounded; reads time out too
            if f":{port}" in line:
                seen.append(line)
            if len(seen) == 2:
                break
    assert len(seen) == 2, seen
    assert '"event": "accept"' in seen[0] and '"event": "close"' in seen[1]


def read_head(s: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        assert chunk, data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def test_protocol_upgrade_is_tunnelled_both_ways(shared_site: Site) -> None:
    """A WebSocket-style upgrade: the backend's 101 reaches the client, then bytes flow
    both ways untouched (the client's early bytes too) until one side closes."""
    with socket.create_connection(("127.0.0.1", shared_site.http_port), timeout=5) as s:
        s.sendall(
            b"GET /upgrade HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nearly"
        )
        head, got = read_head(s)
        assert head.startswith(b"HTTP/1.1 101")
        assert b"Upgrade: echo" in head and b"Connection: Upgrade" in head
        assert b"Via: 1.1 edge-t1.site-t" in head
        while len(got) < 5:
            got += s.recv(4096)
        assert got == b"early"
        for i in range(20):
            message = f"frame {i} \r\n\r\n GET / HTTP/1.1".encode()  # not HTTP any more
            s.sendall(message)
            echoed = b""
            while len(echoed) < len(message):
                echoed += s.recv(4096)
            assert echoed == message
        s.shutdown(socket.SHUT_WR)  # the backend closes on our EOF: so does the proxy
        assert s.recv(4096) == b""


def test_refused_upgrade_is_answered_then_closed_and_connect_is_refused(shared_site: Site) -> None:
    out = raw(
        shared_site, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
    )
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"no upgrade here\n")
    assert b"\r\nConnection: close\r\n" in out
    out = raw(shared_site, b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 501")
