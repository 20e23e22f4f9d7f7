"""A service's `vrf`: its listeners, health checks and backend connections are bound to
the device (SO_BINDTODEVICE). This kernel has no VRF support (CONFIG_NET_VRF is not set),
so the binding itself is proven on `lo`, a device every host has: the socket reports the
device, and a check bound to it reaches a backend on it while one bound to a device the
backend is not reachable through fails."""

from __future__ import annotations

import asyncio
import socket

import pytest

from edge.checks import probe
from edge.config import ActiveCheckConfig
from edge.proxy.common import listening_socket

pytestmark = [pytest.mark.needs("root"), pytest.mark.timeout(30)]

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


def test_listeners_and_checks_bind_to_the_services_device() -> None:
    sock = listening_socket("127.0.0.1", 0, 16, vrf="lo")
    try:
        bound = sock.getsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, 16).rstrip(b"\0")
        assert bound == b"lo"
        port = sock.getsockname()[1]
        check = ActiveCheckConfig(kind="tcp", timeout=0.5, interval=1.0)

        async def both() -> tuple[tuple[bool, str], tuple[bool, str]]:
            on_lo = await probe("127.0.0.1", port, check, vrf="lo")
            # No other device reaches 127.0.0.1: bound elsewhere, the check cannot connect.
            others = [name for _, name in socket.if_nameindex() if name != "lo"]
            if not others:
                pytest.fail("no device besides lo to bind a failing check to")
            elsewhere = await probe("127.0.0.1", port, check, vrf=others[0])
            return on_lo, elsewhere

        on_lo, elsewhere = asyncio.run(both())
        assert on_lo == (True, "connect ok")
        assert not elsewhere[0]
    finally:
        sock.close()
