"""The L7 listener against hostile clients and hostile backends, on loopback.

Every vector is sent on a raw socket to the real agent in front of two recording
backends (h11, strict). For each: what the client got, what the backends received,
and that victims on fresh connections right after get their own answers (no
desync survives). The client-side vectors also go through HAProxy in front of the
same backends, as a reference shown whenever one of our checks fails.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import h11
import httpx
import pytest

from tests.integration.raw_backends import Received, RecordingBackend
from tests.support.procs import AgentProcess, free_port, node_config, wait_for

VICTIM = b"GET /victim HTTP/1.1\r\nHost: x\r\nCookie: secret=1\r\n\r\n"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\nX-Ignore: "

RESPONSES = {
    "conn-te": b"HTTP/1.1 200 OK\r\nConnection: transfer-encoding\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "cl-te": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    "cl-dup": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
    "split-lf": b"HTTP/1.1 200 OK\r\nX-A: a\nSet-Cookie: evil=1\r\nContent-Length: 2\r\n\r\nok",
    "split-cr": b"HTTP/1.1 200 OK\r\nX-A: a\rSet-Cookie: evil=1\r\nContent-Length: 2\r\n\r\nok",
    "extra-after": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled",
    "te-gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "te-twice": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
    "bad-status": b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    "not-http": b"SSH-2.0-OpenSSH\r\n\r\n",
    "switch": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
    "space-colon": b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
    "http10-te": b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "nul": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    "until-close": b"HTTP/1.1 200 OK\r\n\r\nabc",
    "continue": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "short": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok",
    "bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nxx\r\n",
}


@dataclass
class Proxy:
    name: str
    port: int


@dataclass
class Rig:
    agent: AgentProcess
    ours: Proxy
    haproxy: Proxy
    backends: list[RecordingBackend]

    def received(self) -> list[Received]:
        return [r for b in self.backends for r in b.requests()]

    def clear(self) -> None:
        for b in self.backends:
            b.clear()


def haproxy_config(port: int, backends: list[RecordingBackend]) -> str:
    servers = "\n".join(f"  server b{i} 127.0.0.1:{b.port}" for i, b in enumerate(backends))
    return f"""
global
  maxconn 1000
defaults
  mode http
  timeout connect 2s
  timeout client 5s
  timeout server 5s
  http-reuse always
frontend f
  bind 127.0.0.1:{port}
  default_backend b
backend b
  balance roundrobin
{servers}
"""


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("adversarial")
    haproxy = shutil.which("haproxy")
    assert haproxy, "haproxy is needed as the reference (Makefile DEB_TEST installs it)"
    backends = [RecordingBackend(RESPONSES), RecordingBackend(RESPONSES)]
    for b in backends:
        b.start()
    http_port, ha_port = free_port(), free_port()
    config = node_config(
        [{"name": "web", "kind": "http", "address": "127.0.0.1", "port": http_port}],
        [{"name": f"b{i}", "address": "127.0.0.1", "port": b.port} for i, b in enumerate(backends)],
        timeouts={"client_header": 2, "upstream_first_byte": 3},
    )
    agent = AgentProcess(tmp, config)
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(haproxy_config(ha_port, backends))
    ha = subprocess.Popen(
        [haproxy, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        agent.start()
        wait_for(lambda: _port_open(ha_port))
        yield Rig(agent, Proxy("agent", http_port), Proxy("haproxy", ha_port), backends)
    finally:
        agent.stop()
        ha.terminate()
        ha.wait(10)
        for b in backends:
            b.stop()


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


def talk(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send, half-close, read until the proxy closes (or resets)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while data := s.recv(65536):
                chunks.append(data)
        return b"".join(chunks)


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


def read_answers(data: bytes, methods: list[bytes]) -> list[Answer]:
    """Parse the client's bytes with h11: the complete responses, in order."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(data)
    conn.receive_data(b"")
    answers: list[Answer] = []
    for method in methods:
        if conn.our_state is not h11.IDLE:
            break
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        try:
            event = conn.next_event()
            while isinstance(event, h11.InformationalResponse):
                event = conn.next_event()
            if not isinstance(event, h11.Response):
                break
            head, body = event, b""
            while True:
                event = conn.next_event()
                if isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    answers.append(Answer(head.status_code, dict(head.headers), body))
                    break
                else:
                    return answers
        except h11.RemoteProtocolError:
            break
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
            break
        conn.start_next_cycle()
    return answers


def victims_are_served(port: int) -> None:
    for _ in range(4):  # round robin: every backend connection in the pool gets a turn
        answers = read_answers(talk(port, VICTIM), [b"GET"])
        assert [(a.status, a.body) for a in answers] == [(200, b"/victim")]


def cl(body: bytes) -> bytes:
    return b"%d" % len(body)


# (name, raw request, what the backends must have received: None = refused, never forwarded)
Expected = list[tuple[str, str, bytes]] | None
CLIENT_VECTORS: list[tuple[str, bytes, Expected]] = [
    (
        "connection-names-content-length",
        b"POST /cc HTTP/1.1\r\nHost: x\r\nConnection: Content-Length\r\nContent-Length: "
        + cl(SMUGGLED)
        + b"\r\n\r\n"
        + SMUGGLED,
        [("POST", "/cc", SMUGGLED)],
    ),
    (
        "connection-keep-alive-content-length",
        b"POST /cc HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Content-Length\r\n"
        b"Content-Length: " + cl(SMUGGLED) + b"\r\n\r\n" + SMUGGLED,
        [("POST", "/cc", SMUGGLED)],
    ),
    (
        "cl-te",
        b"POST /clte HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nG",
        None,
    ),
    (
        "te-cl",
        b"POST /tecl HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
        b"8\r\nSMUGGLED\r\n0\r\n\r\n",
        None,
    ),
    (
        "te-te-second-coding",
        b"POST /tete HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n"
        b"\r\n0\r\n\r\n",
        None,
    ),
    (
        "te-space-before-colon",
        b"POST /tesp HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n"
        b"\r\n0\r\n\r\n",
        None,
    ),
    (
        "te-obs-fold",
        b"POST /tefold HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
        None,
    ),
    (
        "te-leading-space-line",
        b"POST /telead HTTP/1.1\r\n Transfer-Encoding: chunked\r\nHost: x\r\n\r\n0\r\n\r\n",
        None,
    ),
    ("te-xchunked", b"POST /tex HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n", None),
    (
        "te-chunked-identity",
        b"POST /teci HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        None,
    ),
    (
        "te-tab-is-fine",
        b"POST /tab HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\tchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        [("POST", "/tab", b"hello")],
    ),
    (
        "te-uppercase-is-fine",
        b"POST /up HTTP/1.1\r\nHost: x\r\nTRANSFER-ENCODING: CHUNKED\r\n\r\n5\r\nhello\r\n"
        b"0\r\nX-Trailer: 1\r\n\r\n",
        [("POST", "/up", b"hello")],
    ),
    (
        "chunk-size-overflow",
        b"POST /ovf HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"FFFFFFFFFFFFFFFFF1\r\nx\r\n0\r\n\r\n",
        None,
    ),
    (
        "two-content-lengths",
        b"POST /cl2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        None,
    ),
    (
        "content-length-plus",
        b"POST /clp HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc",
        None,
    ),
    (
        "content-length-negative",
        b"POST /cln HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        None,
    ),
    (
        "connection-names-te",
        b"POST /ct HTTP/1.1\r\nHost: x\r\nConnection: close, Transfer-Encoding\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        [("POST", "/ct", b"hello")],
    ),
    (
        "connection-names-host",
        b"GET /ch HTTP/1.1\r\nHost: x\r\nConnection: Host\r\n\r\n",
        [("GET", "/ch", b"")],
    ),
    (
        "connection-names-our-headers",
        b"GET /xff HTTP/1.1\r\nHost: x\r\nConnection: X-Forwarded-For, Via\r\n"
        b"X-Forwarded-For: 198.18.0.7\r\n\r\n",
        [("GET", "/xff", b"")],
    ),
    ("two-hosts", b"GET /h2 HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", None),
    ("no-host", b"GET /nh HTTP/1.1\r\nAccept: */*\r\n\r\n", None),
    ("host-with-space", b"GET /hs HTTP/1.1\r\nHost: a b\r\n\r\n", None),
    ("bare-lf-in-value", b"GET /lf HTTP/1.1\r\nHost: x\r\nX-A: a\nX-B: b\r\n\r\n", None),
    ("bare-cr-in-value", b"GET /cr HTTP/1.1\r\nHost: x\r\nX-A: a\rX-B: b\r\n\r\n", None),
    ("nul-in-value", b"GET /nul HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", None),
    ("space-in-name", b"GET /sn HTTP/1.1\r\nHost: x\r\nX A: 1\r\n\r\n", None),
    # Not ambiguous once we write the request line again (as HAProxy does too).
    (
        "double-space-request-line",
        b"GET  /ds HTTP/1.1\r\nHost: x\r\n\r\n",
        [("GET", "/ds", b"")],
    ),
    ("junk-after-version", b"GET /jv HTTP/1.1 x\r\nHost: x\r\n\r\n", None),
    ("http-2-version", b"GET /v2 HTTP/2.0\r\nHost: x\r\n\r\n", None),
    ("http-0-9", b"GET /\r\n\r\n", None),
    ("lf-only-lines", b"GET /lfo HTTP/1.1\nHost: x\n\n", None),
    ("request-line-too-long", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", None),
    (
        "too-many-headers",
        b"GET /many HTTP/1.1\r\nHost: x\r\n" + b"X-A: 1\r\n" * 120 + b"\r\n",
        None,
    ),
    ("connect", b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", None),
    (
        "absolute-form-sets-host",
        b"GET http://other.example/abs HTTP/1.1\r\nHost: x\r\n\r\n",
        [("GET", "/abs", b"")],
    ),
    (
        "pipelined-with-bodies",
        b"POST /p1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        b"POST /p2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nworld\r\n0\r\n\r\n"
        b"GET /p3 HTTP/1.1\r\nHost: x\r\n\r\n",
        [("POST", "/p1", b"hello"), ("POST", "/p2", b"world"), ("GET", "/p3", b"")],
    ),
]


def _forwarded(rig: Rig) -> list[tuple[str, str, bytes]]:
    return [(r.method, r.target, r.body) for r in rig.received()]


@pytest.mark.parametrize(
    ("name", "payload", "expected"), CLIENT_VECTORS, ids=[v[0] for v in CLIENT_VECTORS]
)
def test_client_vector(rig: Rig, name: str, payload: bytes, expected: Expected) -> None:
    rig.clear()
    reference = talk(rig.haproxy.port, payload)
    haproxy_saw = _forwarded(rig)
    rig.clear()
    got = talk(rig.ours.port, payload)
    forwarded = _forwarded(rig)
    context = (
        f"\nagent answered {got[:300]!r}\nbackends got {forwarded!r}"
        f"\nHAProxy answered {reference[:120]!r}, its backends got {haproxy_saw!r}"
    )
    if expected is None:
        assert got[:9] == b"HTTP/1.1 " and 400 <= int(got[9:12]) < 600, context
        assert b"\r\nConnection: close\r\n" in got.split(b"\r\n\r\n")[0] + b"\r\n", context
        assert forwarded == [], context  # never forwarded
    else:
        answers = read_answers(got, [m.encode() for m, _, _ in expected])
        assert [a.status for a in answers] == [200] * len(expected), context
        assert [a.body for a in answers] == [t.encode() for _, t, _ in expected], context
        assert sorted(forwarded) == sorted(expected), context  # over two backends
        for request in rig.received():
            assert len(request.header("host")) == 1, context
            assert request.header("x-forwarded-for")[-1].endswith("127.0.0.1"), context
            assert request.header("via") == ["1.1 edge-t1.site-t"], context
    victims_are_served(rig.ours.port)
    assert not any(r.target == "/smuggled" for r in rig.received())


def test_cross_client_smuggling_reference_haproxy_also_keeps_the_victim_safe(rig: Rig) -> None:
    payload = CLIENT_VECTORS[0][1]
    for proxy in (rig.ours, rig.haproxy):
        rig.clear()
        talk(proxy.port, payload)
        victims_are_served(proxy.port)
        assert [r.target for r in rig.received()].count("/smuggled") == 0, proxy.name


def test_our_headers_and_host_survive_connection_options(rig: Rig) -> None:
    rig.clear()
    talk(rig.ours.port, CLIENT_VECTORS[18][1])
    (request,) = rig.received()
    assert request.header("x-forwarded-for") == ["198.18.0.7, 127.0.0.1"]
    assert request.header("via") == ["1.1 edge-t1.site-t"]
    rig.clear()
    talk(rig.ours.port, b"GET http://other.example/abs HTTP/1.1\r\nHost: x\r\n\r\n")
    assert rig.received()[0].header("host") == ["other.example"]


def test_a_refused_request_in_a_pipeline_is_answered_in_its_turn(rig: Rig) -> None:
    rig.clear()
    got = talk(
        rig.ours.port,
        b"GET /q1 HTTP/1.1\r\nHost: x\r\n\r\nGET /q2 HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n"
        b"GET /q3 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    assert _forwarded(rig) == [("GET", "/q1", b"")]
    answers = read_answers(got, [b"GET", b"GET", b"GET"])
    assert [(a.status, a.body[:3]) for a in answers] == [(200, b"/q1"), (400, b"dup")]
    assert answers[1].headers[b"connection"] == b"close"


def raw_answer(rig: Rig, name: str) -> tuple[bytes, list[Answer]]:
    got = talk(rig.ours.port, b"GET /raw/%b HTTP/1.1\r\nHost: x\r\n\r\n" % name.encode())
    return got, read_answers(got, [b"GET"])


@pytest.mark.parametrize(
    "name",
    [
        "cl-dup",
        "split-lf",
        "split-cr",
        "te-gzip",
        "te-twice",
        "bad-status",
        "not-http",
        "switch",
        "space-colon",
        "obs-fold",
        "http10-te",
        "nul",
    ],
)
def test_ambiguous_backend_answers_get_the_client_a_502(rig: Rig, name: str) -> None:
    got, answers = raw_answer(rig, name)
    assert [a.status for a in answers] == [502], got
    assert b"evil" not in got and b"Set-Cookie" not in got
    victims_are_served(rig.ours.port)


def test_backend_framing_is_ours_toward_the_client(rig: Rig) -> None:
    # Connection cannot remove Transfer-Encoding: the client still gets a framed body.
    got, answers = raw_answer(rig, "conn-te")
    assert [(a.status, a.body) for a in answers] == [(200, b"hello")], got
    assert answers[0].headers[b"transfer-encoding"] == b"chunked"
    # Both lengths: chunked wins, Content-Length is dropped (RFC 9112 6.3).
    got, answers = raw_answer(rig, "cl-te")
    assert [(a.status, a.body) for a in answers] == [(200, b"hello")], got
    assert b"content-length" not in answers[0].headers
    # Close-delimited upstream: re-chunked for an HTTP/1.1 client.
    got, answers = raw_answer(rig, "until-close")
    assert [(a.status, a.body) for a in answers] == [(200, b"abc")], got
    got, answers = raw_answer(rig, "continue")
    assert [(a.status, a.body) for a in answers] == [(200, b"ok")], got
    assert got.startswith(b"HTTP/1.1 100 Continue\r\n")
    # Bytes after the body: not passed on, and the connection is not reused.
    got, answers = raw_answer(rig, "extra-after")
    assert [(a.status, a.body) for a in answers] == [(200, b"ok")] and b"smuggled" not in got
    victims_are_served(rig.ours.port)


def test_a_broken_body_breaks_the_client_connection(rig: Rig) -> None:
    for name in ("short", "bad-chunk"):
        got, answers = raw_answer(rig, name)
        assert got.startswith(b"HTTP/1.1 200") and answers == [], got  # never complete
    victims_are_served(rig.ours.port)


def test_rejections_are_counted_and_nothing_was_ejected(rig: Rig) -> None:
    metrics = httpx.get(rig.agent.admin + "/metrics", timeout=5).text
    assert 'anycast_edge_http_rejected_total{reason="duplicate_host",side="client"}' in metrics
    assert 'side="backend"' in metrics
    status = rig.agent.status()
    assert status["state"] == "healthy"
    assert {b["health"] for b in status["backends"]} == {"up"}
    assert not any("ejected" in e["cause"] for e in status["events"])


def test_a_head_split_over_reads_is_still_bounded(rig: Rig) -> None:
    """A slow head is cut at client_header with 408; it never reached a backend."""
    rig.clear()
    with socket.create_connection(("127.0.0.1", rig.ours.port), timeout=10) as s:
        for piece in (b"GET /slow HTTP/1.1\r\n", b"Host: x\r\n"):
            s.sendall(piece)
            time.sleep(0.3)
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408") and rig.received() == []
