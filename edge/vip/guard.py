"""The VIP guard: a process of its own, next to the agent, that undoes an ownership when
the agent cannot (the liveness guard lives outside the process it guards, as
`bgp.api_relay` does for BGP).

`python -m edge.vip.guard --fd N --interface IF --vip ADDR/PREFIX --bound-ms MS
[--endpoint URL ...]`: N is the guard's end of a socketpair with the agent. The agent
writes lines:

- `#beat`: from its event loop every ~100 ms;
- `arm <lease id>`: it is about to own the VIP (lease 0: unfenced);
- `disarm`: it removed the VIP and gave the key back;
- `bye`: it stops in order (the guard ends without firing).

When `edge.vip.deadman.decide` says FIRE (no beat for the bound while armed, or the pipe
closed), the guard removes the VIP from the kernel (pyroute2, opened at start so firing
costs no import) and revokes the lease (`/v3/lease/revoke`, one bounded attempt per
endpoint), then tells the agent `#guard fired <cause> <silent ms> <monotonic>` so that it
goes through the election again. A closed pipe ends the guard after firing. Frozen
together with the agent (a process group SIGSTOP) the guard does nothing, and safety rests
on the lease expiry and the address lifetime as without it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import json
import os
import select
import socket
import sys
import time
import urllib.request
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from edge.vip.deadman import Cause, Verdict, decide

READY = b"#guard ready"
FIRED = b"#guard fired"
REVOKE_TIMEOUT_S = 0.2


class Guard:
    def __init__(
        self, sock: socket.socket, interface: str, vip: str, bound_s: float, endpoints: list[str]
    ) -> None:
        self.sock = sock
        self.vip = ipaddress.ip_interface(vip)
        self.bound_s = bound_s
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.ipr: Any = IPRoute()
        indexes = self.ipr.link_lookup(ifname=interface)
        if not indexes:
            raise OSError(f"no interface named {interface!r}")
        self.index = indexes[0]
        self.lease = 0
        self.armed = False
        self.fired = False
        self.bye = False
        self.last_beat = time.monotonic()
        self._buffer = bytearray()
        # the store is reached directly, never through a proxy from the environment
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _line(self, line: bytes) -> None:
        words = line.split()
        if not words:
            return
        if words[0] == b"#beat":
            self.last_beat = time.monotonic()
            self.fired = False
        elif words[0] == b"arm" and len(words) == 2:
            self.armed, self.lease = True, int(words[1])
        elif words[0] == b"disarm":
            self.armed, self.lease = False, 0
        elif words[0] == b"bye":
            self.bye = True

    def remove_vip(self) -> None:
        with contextlib.suppress(NetlinkError):
            self.ipr.addr(
                "del",
                index=self.index,
                address=str(self.vip.ip),
                prefixlen=self.vip.network.prefixlen,
            )

    def revoke(self) -> str:
        if not self.lease:
            return "no lease"
        body = json.dumps({"ID": str(self.lease)}).encode()
        errors = []
        for endpoint in self.endpoints:
            request = urllib.request.Request(
                endpoint + "/v3/lease/revoke", body, {"Content-Type": "application/json"}
            )
            try:
                with self._http.open(request, timeout=REVOKE_TIMEOUT_S):
                    return "revoked"
            except OSError as error:
                errors.append(f"{endpoint}: {type(error).__name__}")
        return "; ".join(errors)

    def fire(self, cause: Cause) -> None:
        silent = time.monotonic() - self.last_beat
        self.remove_vip()  # first: the kernel stops answering for the VIP at once
        outcome = self.revoke()
        self.armed, self.lease, self.fired = False, 0, True
        sys.stderr.write(f"vip guard: fired ({cause}, {silent * 1000:.0f} ms): {outcome}\n")
        if cause is not Cause.AGENT_GONE:
            message = f"{FIRED.decode()} {cause} {silent * 1000:.0f} {time.monotonic():.6f}\n"
            with contextlib.suppress(OSError):
                self.sock.send(message.encode())

    def run(self) -> None:
        self.sock.sendall(READY + b"\n")
        gone = False
        while True:
            # read what arrived before judging the silence (a starved guard is not a
            # silent agent)
            d = decide(
                time.monotonic(),
                self.last_beat,
                self.bound_s,
                armed=self.armed,
                fired=self.fired,
                agent_gone=gone,
            )
            if d.verdict is Verdict.FIRE:
                self.fire(d.cause)
            if gone:
                return
            readable, _, _ = select.select([self.sock], [], [], d.wake_in_s)
            if readable:
                try:
                    data = self.sock.recv(65536)
                except OSError as error:
                    data = b"" if error.errno != errno.EINTR else b"-"
                if not data:
                    gone = True
                    continue
                self._buffer += data
                *lines, rest = bytes(self._buffer).split(b"\n")
                self._buffer[:] = rest
                for line in lines:
                    self._line(line)
                if self.bye:
                    return


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="edge.vip.guard")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--interface", required=True)
    parser.add_argument("--vip", required=True)
    parser.add_argument("--bound-ms", type=int, required=True)
    parser.add_argument("--endpoint", action="append", default=[])
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    try:
        guard = Guard(sock, args.interface, args.vip, args.bound_ms / 1000, args.endpoint)
    except OSError as error:
        sys.stderr.write(f"vip guard: {error}\n")
        os._exit(1)
    with contextlib.suppress(KeyboardInterrupt):
        guard.run()
    os._exit(0)


if __name__ == "__main__":
    main()
