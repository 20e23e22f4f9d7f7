"""Health, failover, drain, reload and bad config, with backends that really die."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import threading
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.procs import BIN, AgentProcess, free_port, node_config, wait_for
from tests.support.site import Site


def backend_health(site: Site) -> dict[str, str]:
    return {b["name"]: b["health"] for b in site.agent.status()["backends"]}


def test_backend_death_is_detected_and_requests_keep_succeeding(site: Site) -> None:
    """Kill a backend under load: idempotent requests are retried elsewhere, none fails."""
    failures: list[str] = []
    served: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=site.http, timeout=5) as client:
            for _ in range(3000):  # bounded in count...
                if stop.is_set():
                    break
                try:
                    r = client.get("/")
                    if r.status_code != 200:
                        failures.append(f"HTTP {r.status_code}")
                    else:
                        served.append(r.text.strip())
                except httpx.HTTPError as error:
                    failures.append(repr(error))

    thread = threading.Thread(target=load)
    thread.start()
    try:
        wait_for(lambda: len(served) > 100)
        site.backends["b1"].kill()
        state = site.agent.wait_state("degraded")
        assert any("b1" in e["cause"] for e in state["events"])
        mark = len(served)
        wait_for(lambda: len(served) > mark + 100)
    finally:
        stop.set()  # ...and in time
        thread.join(30)
    assert failures == []
    assert served[-50:] == ["b2"] * 50
    # Failed connects may eject it first (sustained evidence); its active checks
    # then say it is down.
    wait_for(lambda: backend_health(site)["b1"] == "down")

    site.backends["b1"].start()
    site.agent.wait_state("healthy")
    assert backend_health(site)["b1"] == "up"


def test_all_backends_down_means_node_down_and_503(site: Site) -> None:
    for b in site.backends.values():
        b.kill()
    status = site.agent.wait_state("down")
    assert "0/2 backends healthy" in status["events"][-1]["cause"]
    r = httpx.get(site.http + "/")
    assert r.status_code == 503 and r.headers["via"] == "1.1 edge-t1.site-t"


def test_failing_health_endpoint_takes_backend_out_after_fall_checks(site: Site) -> None:
    site.fail_files["b2"].touch()
    wait_for(lambda: backend_health(site)["b2"] == "down")
    status = site.agent.status()
    assert any("b2 failed 2 checks: HTTP 503, expected 200" in e["cause"] for e in status["events"])
    assert {httpx.get(site.http + "/").text for _ in range(10)} == {"b1\n"}
    site.fail_files["b2"].unlink()
    site.agent.wait_state("healthy")


def test_5xx_alone_ejects_nothing_sustained_503s_eject_one_for_a_while(tmp_path: Path) -> None:
    site = Site(tmp_path)
    site.agent.config["health"]["passive"] = {"consecutive_failures": 3, "ejection_time": 1}
    try:
        site.start()
        with httpx.Client(base_url=site.http) as client:
            codes = [client.get("/status/500").status_code for _ in range(8)]
            assert codes == [500] * 8  # passed on, not retried: the backends answered
            assert not any("ejected" in e["cause"] for e in site.agent.status()["events"])
            # 503s are gateway errors: three in a row on a backend eject it, but only
            # one of the two (the other is the last in rotation).
            assert {client.get("/status/503").status_code for _ in range(8)} == {503}
        events = site.agent.status()["events"]
        ejected = [e for e in events if "ejected by live traffic" in e["cause"]]
        assert len(ejected) == 1 and "gateway_error" in ejected[0]["cause"]
        assert site.agent.status()["state"] != "down"
        # The ejection time is over: it is back, its active checks never failed.
        wait_for(lambda: "back from its ejection" in str(site.agent.status()["events"]))
        site.agent.wait_state("healthy")
    finally:
        site.close()


def test_l4_proxies_bytes_and_half_close_and_retries_connect(site: Site) -> None:
    with socket.create_connection(("127.0.0.1", site.tcp_port), timeout=5) as s:
        s.sendall(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
        )
        s.shutdown(socket.SHUT_WR)  # half-close: the answer must still come back
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"hello")
    # A backend that refuses connections before health notices: the L4 connect is retried.
    site.backends["b1"].kill()
    for _ in range(10):
        with socket.create_connection(("127.0.0.1", site.tcp_port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.endswith(b"b2\n")


def test_drain_via_admin_lets_inflight_requests_finish(tmp_path: Path) -> None:
    site = Site(tmp_path, drain={"accept_grace": 0.5, "deadline": 10})
    try:
        site.start()
        result: dict[str, object] = {}

        def slow() -> None:
            result["r"] = httpx.get(site.http + "/slow/1500", timeout=10)

        thread = threading.Thread(target=slow)
        thread.start()
        wait_for(lambda: site.agent.status()["flows"]["open"] >= 1)
        r = httpx.post(site.agent.admin + "/drain?reason=maintenance")
        # The answer is the state the drain moved to, not the one it left.
        assert r.status_code == 202
        assert r.json() == {
            "state": "draining",
            "drain": {"phase": "moving traffic", "source": "local API", "reason": "maintenance"},
        }
        assert site.agent.status()["state"] == "draining"
        # During accept_grace the node still serves new requests (routers are moving them).
        assert httpx.get(site.http + "/", timeout=5).status_code == 200
        status = site.agent.wait_state("down")
        thread.join(10)
        response = result["r"]
        assert isinstance(response, httpx.Response) and response.status_code == 200
        assert "drained: maintenance" in status["events"][-1]["cause"]
        with pytest.raises(httpx.ConnectError):
            httpx.get(site.http + "/")
        assert httpx.post(site.agent.admin + "/undrain").status_code == 200
        site.agent.wait_state("healthy")
        assert httpx.get(site.http + "/").status_code == 200
    finally:
        site.close()


def test_sigterm_drains_and_exits_cleanly(tmp_path: Path) -> None:
    site = Site(tmp_path, drain={"accept_grace": 0.2, "deadline": 10})
    try:
        site.start()
        result: dict[str, object] = {}

        def slow() -> None:
            result["r"] = httpx.get(site.http + "/slow/1000", timeout=10)

        thread = threading.Thread(target=slow)
        thread.start()
        wait_for(lambda: site.agent.status()["flows"]["open"] >= 1)
        site.agent.signal(signal.SIGTERM)
        assert site.agent.wait_exit(20) == 0
        thread.join(10)
        response = result["r"]
        assert isinstance(response, httpx.Response) and response.status_code == 200
    finally:
        site.close()


def test_sighup_reload_keeps_connections_and_rejects_bad_config(site: Site) -> None:
    b3_port = free_port()
    from tests.support.procs import BackendProcess

    b3 = BackendProcess("b3", b3_port).start()
    try:
        with httpx.Client(base_url=site.http) as client:
            assert client.get("/").status_code == 200
            config = dict(site.agent.config)
            config["backends"] = [
                *config["backends"],
                {"name": "b3", "address": "127.0.0.1", "port": b3_port},
            ]
            site.agent.write_config(config)
            site.agent.signal(signal.SIGHUP)
            wait_for(lambda: backend_health(site).get("b3") == "up")
            seen = {client.get("/").text.strip() for _ in range(30)}
            assert seen == {"b1", "b2", "b3"}
            # A bad file on reload: rejected, the running config stays, traffic flows.
            site.agent.config_path.write_text("backends: 7\n")
            site.agent.signal(signal.SIGHUP)
            wait_for(lambda: any("rejected" in e["cause"] for e in site.agent.status()["events"]))
            assert client.get("/").status_code == 200
            assert set(backend_health(site)) == {"b1", "b2", "b3"}
        assert site.agent.proc is not None and site.agent.proc.poll() is None
    finally:
        b3.kill()


def test_unreachable_backend_at_start_is_not_a_config_error(tmp_path: Path) -> None:
    port = free_port()
    config = node_config(
        [{"name": "web", "kind": "http", "address": "127.0.0.1", "port": port}],
        [{"name": "gone", "address": "127.0.0.1", "port": free_port()}],
    )
    agent = AgentProcess(tmp_path, config)
    try:
        agent.start(wait_state="down")
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 503
    finally:
        agent.stop()


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda c: c["backends"][0].update(port=0),
            "backends.0.port: Input should be greater than or equal to 1 (got 0)",
        ),
        (
            lambda c: c["listeners"][0].update(kind="quic"),
            "listeners.0.kind: Input should be 'tcp' or 'http' (got 'quic')",
        ),
        (lambda c: c.update(bogus=True), "bogus: Extra inputs are not permitted (got True)"),
    ],
)
def test_bad_config_exits_2_with_one_line_and_starts_nothing(
    tmp_path: Path, mutate, expected: str
) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    config = node_config(
        [{"name": "web", "kind": "http", "address": "127.0.0.1", "port": port}],
        [{"name": "b1", "address": "127.0.0.1", "port": 1}],
    )
    mutate(config)
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [str(BIN / "anycast-edge"), "run", "--config", str(path)], capture_output=True, timeout=30
    )
    assert proc.returncode == 2
    lines = proc.stderr.decode().strip().splitlines()
    assert lines == [f"anycast-edge: config error: {expected}"]
    with socket.socket() as s:  # nothing was started: the port is free
        s.bind(("127.0.0.1", port))


def test_listener_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = node_config(
            [{"name": "web", "kind": "http", "address": "127.0.0.1", "port": port}],
            [{"name": "b1", "address": "127.0.0.1", "port": 1}],
        )
        path = tmp_path / "node.yaml"
        path.write_text(yaml.safe_dump(config))
        proc = subprocess.run(
            [str(BIN / "anycast-edge"), "run", "--config", str(path)],
            capture_output=True,
            timeout=30,
        )
    assert proc.returncode == 1
    assert (
        f"listeners.web: cannot listen on 127.0.0.1:{port}: Address already in use"
        in proc.stderr.decode()
    )
    assert "Traceback" not in proc.stderr.decode()


def test_check_config_command(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text("node: {name: a, site: b}\n")
    proc = subprocess.run(
        [str(BIN / "anycast-edge"), "check-config", "-c", str(path)],
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.decode().strip() == "anycast-edge: config error: listeners: Field required"


def test_the_agent_speaks_systemds_notify_protocol_without_bgp(tmp_path: Path) -> None:
    """Type=notify with WatchdogSec: a node with no `bgp:` section still says READY=1 once
    it serves, beats WATCHDOG=1 from its loop, and says STOPPING=1 when it stops. The
    socket stands in for systemd's (the same datagram protocol)."""
    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(0.2)
    site = Site(tmp_path)
    got: list[str] = []

    def received(message: str, times: int = 1) -> bool:
        with contextlib.suppress(TimeoutError):
            got.append(listener.recv(256).decode())
        return got.count(message) >= times

    try:
        site.agent.env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"}
        site.start()
        wait_for(lambda: received("READY=1"), 10, what="READY=1")
        assert site.agent.status()["state"] in {"healthy", "starting"}
        got.clear()
        wait_for(lambda: received("WATCHDOG=1", 3), 10, what="three watchdog beats")
        site.agent.signal(signal.SIGTERM)
        wait_for(lambda: received("STOPPING=1"), 30, what="STOPPING=1")
        assert site.agent.wait_exit(30) == 0
    finally:
        site.close()
        listener.close()
