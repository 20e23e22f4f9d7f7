"""systemd's notify protocol from the event loop: `READY=1` once, then `WATCHDOG=1` beats.

The agent sends them (every node, with or without BGP), once its listeners are bound and
its extensions started. With `Type=notify` and `WatchdogSec=` in the unit, systemd kills
the whole service (ExaBGP and bfdd with it, so the routers drop the routes) when the loop
stops beating, and restarts it. That covers what the API relay cannot: a freeze of every
process of the service at once. A few lines over the NOTIFY_SOCKET datagram socket, no dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Mapping


def notify_address(env: Mapping[str, str]) -> str | None:
    """The datagram socket systemd listens on (`@name` is the abstract namespace)."""
    address = env.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return None
    return "\0" + address[1:] if address[0] == "@" else address


def watchdog_interval_s(env: Mapping[str, str]) -> float | None:
    """Half of WatchdogSec (systemd's own advice), or None when no watchdog is asked for
    of this process (WATCHDOG_PID names another)."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6 / 2


class SystemdNotifier:
    """`start()` sends READY=1 and, when systemd asked for a watchdog, a task of the
    running loop sends WATCHDOG=1 every half period. A no-op outside systemd."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = notify_address(env)
        self.interval_s = watchdog_interval_s(env)
        self.sent = 0
        self._task: asyncio.Task[None] | None = None

    def send(self, message: str) -> None:
        if self.address is None:
            return
        with (
            contextlib.suppress(OSError),
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
        ):
            sock.sendto(message.encode(), self.address)
            self.sent += 1

    def start(self) -> None:
        self.send("READY=1")
        if self.address is not None and self.interval_s is not None:
            self._task = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        assert self.interval_s is not None
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.interval_s)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.send("STOPPING=1")


__all__ = ["SystemdNotifier", "notify_address", "watchdog_interval_s"]
