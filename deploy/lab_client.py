"""Client traffic for the lab, run inside the lab's client container (`docker exec`).

Only the anycast address inside the lab is ever a target, and every loop is bounded in
count and time. Each request is a new TCP connection (so routers hash each one anew),
`GET /` over HTTP/1.1 with `Connection: close`; the agent's `Via: 1.1 <node>.<site>` says
which edge served it, the body which backend.

    python -m deploy.lab_client burst --count 400          # one JSON summary
    python -m deploy.lab_client run --duration 8 --workers 4  # one JSON record per request
"""

from __future__ import annotations

import argparse
import collections
import ipaddress
import json
import socket
import sys
import threading
import time
from typing import Any

VIP = "198.51.100.10"
PORT = 80
MAX_COUNT = 20_000
# The only targets: the lab's anycast ranges.
ANYCAST = (ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("2001:db8:100::/48"))
MAX_DURATION_S = 120.0


def request(host: str = VIP, port: int = PORT, timeout: float = 2.0) -> dict[str, Any]:
    """One request on a new connection: {start, end, ok, node, site, backend, error}."""
    start = time.time()
    record: dict[str, Any] = {"start": start, "ok": False, "node": "", "site": "", "backend": ""}
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")
            raw = b""
            # Read the head, then Content-Length bytes: the response ends there, whether or
            # not the server closes the connection after it.
            while b"\r\n\r\n" not in raw:
                data = sock.recv(65536)
                if not data:
                    break
                raw += data
            head, _, body = raw.partition(b"\r\n\r\n")
            length = _content_length(head)
            while length is not None and len(body) < length:
                data = sock.recv(65536)
                if not data:
                    break
                body += data
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "via":
                hop = value.strip().split()[-1]
                record["node"], _, record["site"] = hop.partition(".")
        record["backend"] = body.decode("latin-1").strip()
        record["ok"] = status == 200 and bool(record["node"])
        if not record["ok"]:
            record["error"] = f"HTTP {status}"
    except OSError as exc:
        record["error"] = f"{type(exc).__name__}: {exc.strerror or exc}"
    record["end"] = time.time()
    return record


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in records if r["ok"]]
    return {
        "total": len(records),
        "failed": len(records) - len(ok),
        "by_node": dict(collections.Counter(r["node"] for r in ok)),
        "by_site": dict(collections.Counter(r["site"] for r in ok)),
        "by_backend": dict(collections.Counter(r["backend"] for r in ok)),
        "errors": dict(collections.Counter(r.get("error", "") for r in records if not r["ok"])),
    }


def burst(count: int, timeout_s: float, host: str = VIP, port: int = PORT) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    records = []
    for _ in range(min(count, MAX_COUNT)):
        if time.monotonic() > deadline:
            break
        records.append(request(host, port))
    return records


def run(
    duration_s: float, workers: int, pause_s: float, host: str = VIP, port: int = PORT
) -> list[dict[str, Any]]:
    """`workers` threads each opening new connections back to back for `duration_s`."""
    duration_s = min(duration_s, MAX_DURATION_S)
    end = time.monotonic() + duration_s
    records: list[dict[str, Any]] = []
    lock = threading.Lock()

    def work() -> None:
        count = 0
        while time.monotonic() < end and count < MAX_COUNT:
            record = request(host, port)
            count += 1
            with lock:
                records.append(record)
            time.sleep(pause_s)

    threads = [threading.Thread(target=work) for _ in range(max(1, min(workers, 16)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(records, key=lambda r: r["start"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.lab_client")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("burst", help="COUNT new connections one after the other: a summary")
    b.add_argument("--count", type=int, default=200)
    b.add_argument("--timeout", type=float, default=60.0)
    b.add_argument("--host", default=VIP, help="a lab VIP, IPv4 or IPv6")
    b.add_argument("--port", type=int, default=PORT)
    r = sub.add_parser("run", help="steady load for DURATION seconds: every request")
    r.add_argument("--duration", type=float, default=5.0)
    r.add_argument("--workers", type=int, default=4)
    r.add_argument("--pause", type=float, default=0.01)
    r.add_argument("--host", default=VIP, help="a lab VIP, IPv4 or IPv6")
    r.add_argument("--port", type=int, default=PORT)
    args = parser.parse_args(argv)
    try:
        target = ipaddress.ip_address(args.host)
    except ValueError:
        target = None
    if target is None or not any(target in net for net in ANYCAST):
        ranges = ", ".join(str(net) for net in ANYCAST)
        print(f"--host: expected a lab VIP in {ranges} (got {args.host!r})", file=sys.stderr)
        return 2
    if args.command == "burst":
        print(json.dumps(summarize(burst(args.count, args.timeout, args.host, args.port))))
    else:
        json.dump(run(args.duration, args.workers, args.pause, args.host, args.port), sys.stdout)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
