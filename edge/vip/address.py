"""The VIP on the interface (pyroute2) and the announcements that move clients to it.

Drivers only: what to do and when is decided in `edge.vip.election`.

- The address is added with a *kernel lifetime* (`valid_lft`), refreshed while this node
  owns it: a node that is killed, frozen or starved loses the address by itself, without
  any process of its own running (keepalived leaves it forever after a `kill -9`).
- Gratuitous ARP *requests* (sender = target = VIP, broadcast): a request updates an
  existing entry in a client's neighbour table even within its locktime; a reply does not.
  On IPv6, an unsolicited neighbour advertisement with the override flag to all-nodes.
  scapy builds the frames (narrow imports: `scapy.all` costs ~1 s at start); a send-only
  packet socket sends them (scapy's own L2 socket would also receive every frame on the
  interface).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

T = TypeVar("T")
#: linux/if_addr.h
IFA_F_NODAD = 0x02


@dataclass(frozen=True, slots=True)
class InterfaceInfo:
    index: int
    mac: str
    networks: tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...]


class Netlink:
    """pyroute2's synchronous IPRoute on a thread of its own. Its asyncio flavour cannot
    open a netlink socket on uvloop (the agent's loop) and its sync flavour cannot run
    inside a running loop: one worker thread owns the socket, the loop awaits its calls."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vip-netlink")
        self._ipr: Any = None

    async def call(self, work: Callable[[Any], T]) -> T:
        def run() -> T:
            if self._ipr is None:
                self._ipr = IPRoute()
            return work(self._ipr)

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    def close(self) -> None:
        def shut() -> None:
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None

        self._executor.submit(shut).result(timeout=5)
        self._executor.shutdown(wait=False)


def interface_info(ipr: Any, name: str) -> InterfaceInfo | None:
    """Runs on the netlink thread (`Netlink.call`)."""
    indexes = ipr.link_lookup(ifname=name)
    if not indexes:
        return None
    index = indexes[0]
    links = list(ipr.get_links(index))
    networks = []
    for addr in ipr.get_addr(index=index):
        address, prefixlen = addr.get("address"), addr["prefixlen"]
        if address is not None:
            networks.append(ipaddress.ip_interface(f"{address}/{prefixlen}"))
    return InterfaceInfo(index, str(links[0].get("address", "")), tuple(networks))


async def check_vip_interface(interface: str, vip: str) -> str | None:
    """None when `vip` (address/prefix) can live on `interface`: the interface exists and
    already has an address of its own in the VIP's subnet. Otherwise one line saying why."""
    wanted = ipaddress.ip_interface(vip)
    netlink = Netlink()
    try:
        info = await netlink.call(lambda ipr: interface_info(ipr, interface))
    finally:
        netlink.close()
    if info is None:
        return f"vip_group.interface: no interface named {interface!r}"
    own = [n for n in info.networks if n.ip != wanted.ip]
    if not any(n.network == wanted.network for n in own):
        subnets = ", ".join(str(n.network) for n in own) or "none"
        return (
            f"vip_group.vip: {wanted} is outside the subnets of {interface} ({subnets}):"
            " the VIP must be in a subnet the interface is on"
        )
    return None


class VipAddress:
    """Add, refresh, remove the VIP on one interface of this network namespace."""

    def __init__(self, netlink: Netlink, interface: str, vip: str, info: InterfaceInfo) -> None:
        self._netlink = netlink
        self.interface = interface
        self.vip = ipaddress.ip_interface(vip)
        self.index, self.mac = info.index, info.mac

    @classmethod
    async def open(cls, interface: str, vip: str) -> VipAddress:
        netlink = Netlink()
        info = await netlink.call(lambda ipr: interface_info(ipr, interface))
        if info is None:
            netlink.close()
            raise OSError(f"no interface named {interface!r}")
        return cls(netlink, interface, vip, info)

    def close(self) -> None:
        self._netlink.close()

    async def present(self) -> bool:
        info = await self._netlink.call(lambda ipr: interface_info(ipr, self.interface))
        return info is not None and any(n.ip == self.vip.ip for n in info.networks)

    async def put(self, lifetime_s: Callable[[], int]) -> bool:
        """Add the address, or refresh its lifetime when it is there already. The lifetime is
        asked for on the netlink thread, just before the kernel starts counting it, so time
        spent queued (a loaded host) cannot stretch it past the fencing lease. False when no
        lifetime was left by then (nothing put)."""

        def replace(ipr: Any) -> bool:
            lifetime = lifetime_s()
            if lifetime < 1:
                return False
            ipr.addr(
                "replace",
                index=self.index,
                address=str(self.vip.ip),
                prefixlen=self.vip.network.prefixlen,
                valid_lft=lifetime,
                preferred_lft=lifetime,
                # IPv6: no duplicate address detection. The address moves between nodes by
                # design; DAD would hold it tentative (~1 s) and mark it failed while the
                # old owner's copy expires (keepalived's `nodad` for the same reason).
                **({"flags": IFA_F_NODAD} if self.vip.version == 6 else {}),
            )
            return True

        return await self._netlink.call(replace)

    async def remove(self) -> bool:
        """True when the address was there (and is now gone)."""

        def delete(ipr: Any) -> bool:
            try:
                ipr.addr(
                    "del",
                    index=self.index,
                    address=str(self.vip.ip),
                    prefixlen=self.vip.network.prefixlen,
                )
            except NetlinkError as error:
                if error.code in (errno.EADDRNOTAVAIL, errno.ENODEV):
                    return False
                raise
            return True

        return await self._netlink.call(delete)


def announcement_frame(vip: str, mac: str) -> bytes:
    """One gratuitous ARP request (IPv4) or unsolicited NA with override (IPv6)."""
    address = ipaddress.ip_interface(vip).ip
    if address.version == 4:
        from scapy.layers.l2 import ARP, Ether

        frame = Ether(dst="ff:ff:ff:ff:ff:ff", src=mac) / ARP(
            op=1, hwsrc=mac, psrc=str(address), hwdst="00:00:00:00:00:00", pdst=str(address)
        )
    else:
        from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6
        from scapy.layers.l2 import Ether

        frame = (
            Ether(dst="33:33:00:00:00:01", src=mac)
            / IPv6(src=str(address), dst="ff02::1", hlim=255)
            / ICMPv6ND_NA(R=0, S=0, O=1, tgt=str(address))
            / ICMPv6NDOptDstLLAddr(lladdr=mac)
        )
    return bytes(frame)


class Announcer:
    """Sends the announcement frame on the interface; counts what it sent."""

    def __init__(self, interface: str, vip: str, mac: str) -> None:
        self.frame = announcement_frame(vip, mac)
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # sends, never reads
        self._sock.bind((interface, 0))  # protocol 0: nothing is ever queued to read
        self._sock.setblocking(False)
        self.sent_total = 0
        self.send_errors = 0

    def send(self) -> None:
        try:
            self._sock.send(self.frame)
            self.sent_total += 1
        except OSError:
            # a full queue (EAGAIN) or a link going away (ENOBUFS, ENETDOWN): the next one
            # of the burst goes out; counted, never an exception in the loop's callback
            self.send_errors += 1

    def close(self) -> None:
        self._sock.close()


ETH_P_ARP = 0x0806


def arp_request_frame(mac: str, source: str, target: str) -> bytes:
    """A broadcast ARP request from `source` (this node's own address, never the VIP) for
    `target`: built by hand, 42 bytes."""
    hw = bytes.fromhex(mac.replace(":", ""))
    return (
        b"\xff" * 6
        + hw
        + ETH_P_ARP.to_bytes(2, "big")
        + bytes.fromhex("0001080006040001")  # Ethernet, IPv4, 6, 4, request
        + hw
        + socket.inet_aton(source)
        + b"\x00" * 6
        + socket.inet_aton(target)
    )


def arp_reply_sender(frame: bytes, source: str) -> str | None:
    """The IPv4 sender of an ARP reply addressed to `source`, else None."""
    arp = frame[14:42]
    if len(arp) < 28 or arp[6:8] != b"\x00\x02" or arp[24:28] != socket.inet_aton(source):
        return None
    return socket.inet_ntoa(arp[14:18])


class ArpProber:
    """ARP requests to the monitor's targets from this node's own address; `answers()`
    drains the replies that arrived (non-blocking: the socket only queues ARP frames)."""

    def __init__(self, interface: str, mac: str, source: str, targets: list[str]) -> None:
        self.source = source
        self.targets = frozenset(targets)
        self.frames = [arp_request_frame(mac, source, t) for t in targets]
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        self._sock.bind((interface, ETH_P_ARP))
        self._sock.setblocking(False)
        self.sent_total = 0
        self.answered_total = 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self) -> None:
        for frame in self.frames:
            try:
                self._sock.send(frame)
                self.sent_total += 1
            except (BlockingIOError, OSError):
                pass  # a full queue or a link going away: the next round tries again

    def answers(self) -> int:
        """Replies from a target since the last call."""
        count = 0
        while True:
            try:
                frame = self._sock.recv(128)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            if arp_reply_sender(frame, self.source) in self.targets:
                count += 1
        self.answered_total += count
        return count

    def close(self) -> None:
        self._sock.close()
