"""Liveness: the in-process LoopWatchdog, the dead-man switch in the API relay (outside
the agent), and systemd's notify/watchdog protocol."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import threading
import time
from pathlib import Path

from bgp.api_relay import FIRED, WITHDRAW_ALL, Relay
from bgp.exabgp import DeadmanFired, LoopWatchdog, parse_message
from edge.sdnotify import SystemdNotifier, notify_address, watchdog_interval_s


async def test_stall_fires_once_and_a_healthy_loop_never() -> None:
    fired = threading.Event()
    calls: list[float] = []

    def on_stall() -> None:
        calls.append(time.monotonic())
        fired.set()

    watchdog = LoopWatchdog(0.2, on_stall)
    watchdog.start()
    try:
        await asyncio.sleep(0.6)  # a loop that keeps beating
        assert calls == []
        time.sleep(0.8)  # noqa: ASYNC251 - the stall under test
        assert fired.is_set()  # fired while the loop was still blocked
        await asyncio.sleep(0.2)
        assert len(calls) == 1 and watchdog.stalls == 1
    finally:
        watchdog.stop()


# -- the dead-man switch outside the agent: bgp.api_relay ----------------------------------


class RelayRig:
    """The relay's loop in a thread between a socket pair (the agent's end) and two pipes
    (ExaBGP's end): the real relay code, real file descriptors."""

    def __init__(self, deadman_s: float) -> None:
        self.agent, relay_end = socket.socketpair()
        self.agent.settimeout(5)
        exa_to_relay_r, self.exa_out = os.pipe()
        self.exa_in, relay_to_exa_w = os.pipe()
        self.relay = Relay(relay_end, exa_to_relay_r, relay_to_exa_w, deadman_s)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self._agent_buffer = b""
        self._exa_buffer = b""

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            self.relay.run()

    def agent_line(self) -> bytes:
        while b"\n" not in self._agent_buffer:
            self._agent_buffer += self.agent.recv(65536)
        line, self._agent_buffer = self._agent_buffer.split(b"\n", 1)
        return line

    def exabgp_line(self, timeout: float = 5) -> bytes:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._exa_buffer:
            ready, _, _ = select.select([self.exa_in], [], [], deadline - time.monotonic())
            assert ready, "nothing reached ExaBGP"
            self._exa_buffer += os.read(self.exa_in, 65536)
        line, self._exa_buffer = self._exa_buffer.split(b"\n", 1)
        return line

    def exabgp_says(self, line: bytes) -> None:
        os.write(self.exa_out, line + b"\n")

    def close(self) -> None:
        self.agent.close()
        os.close(self.exa_out)
        self.thread.join(5)
        os.close(self.exa_in)


def test_relay_forwards_commands_and_acks_and_swallows_beats() -> None:
    rig = RelayRig(deadman_s=0)
    try:
        rig.agent.sendall(b"#beat\nannounce route 198.51.100.10/32 next-hop self\n#beat\n")
        assert rig.exabgp_line() == b"announce route 198.51.100.10/32 next-hop self"
        rig.exabgp_says(b"done")
        rig.exabgp_says(b'{"type": "state"}')
        assert rig.agent_line() == b"done"
        assert rig.agent_line() == b'{"type": "state"}'
    finally:
        rig.close()
    assert not rig.thread.is_alive(), "the agent's end closing ends the relay"


def test_relay_withdraws_everything_when_beats_stop_and_hides_its_own_ack() -> None:
    rig = RelayRig(deadman_s=0.3)
    try:
        for _ in range(4):  # beating keeps it quiet
            rig.agent.sendall(b"#beat\n")
            time.sleep(0.1)
        rig.agent.sendall(b"announce route 198.51.100.10/32 next-hop self\n")
        assert rig.exabgp_line().startswith(b"announce route")
        # ...then silence: the agent is frozen.
        assert rig.exabgp_line(timeout=3) == WITHDRAW_ALL
        rig.exabgp_says(b"done")  # the agent's announce
        rig.exabgp_says(b"done")  # the relay's withdraw-all: not the agent's business
        fired_line = rig.agent_line()
        assert fired_line.startswith(FIRED)
        # it fired on silence, not early: by its own clock no beat came for deadman_s (the
        # test's clock would race the last beat, which came up to 0.1 s before the announce)
        fired = parse_message(fired_line.decode() + "\n")
        assert isinstance(fired, DeadmanFired) and fired.silent_ms >= 300, fired
        assert rig.agent_line() == b"done"
        rig.agent.sendall(b"withdraw route 198.51.100.10/32\n")
        assert rig.exabgp_line() == b"withdraw route 198.51.100.10/32"
        rig.exabgp_says(b"error")
        assert rig.agent_line() == b"error"  # exactly one ack per agent command
        # Fires once per silence; beats re-arm it, and silence fires it again.
        rig.agent.sendall(b"#beat\n")
        assert rig.exabgp_line(timeout=3) == WITHDRAW_ALL
    finally:
        rig.close()


def test_deadman_fired_line_parses() -> None:
    assert parse_message("#deadman fired 512 81.25\n") == DeadmanFired(512, 81.25)
    assert parse_message("#deadman fired\n") == DeadmanFired(0)


# -- systemd's notify protocol ---------------------------------------------------------------


def test_notify_address_and_watchdog_interval_rules() -> None:
    assert notify_address({}) is None
    assert notify_address({"NOTIFY_SOCKET": "relative"}) is None
    assert notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert notify_address({"NOTIFY_SOCKET": "@abstract"}) == "\0abstract"
    assert watchdog_interval_s({}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "2000000"}) == 1.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None
    other = str(os.getpid() + 1)
    assert watchdog_interval_s({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": other}) is None


async def test_systemd_notifier_sends_ready_then_watchdog_beats(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(2)
        env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}
        notifier = SystemdNotifier(env)
        notifier.start()
        await asyncio.sleep(0.35)
        notifier.stop()
        got = []
        with contextlib.suppress(TimeoutError):
            while True:
                got.append(server.recv(64).decode())
                server.settimeout(0.1)
    assert got[0] == "READY=1" and got[-1] == "STOPPING=1"
    assert got.count("WATCHDOG=1") >= 3  # every 0.1 s from the loop


def test_systemd_notifier_outside_systemd_is_a_no_op() -> None:
    notifier = SystemdNotifier({})
    notifier.send("READY=1")
    assert notifier.sent == 0
