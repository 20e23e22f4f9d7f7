"""The kernel side of forwarding: applies what `render` says, removes it, finds leftovers.

nftables through libnftables (what `nft -f` and `nft -j` run on; each call is one
transaction); rules and routes through pyroute2; sysctls through /proc/sys, their
previous values kept in a state file so the next start after a crash puts them back.
The extension installs everything or nothing: on a failure it removes what it put in.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import json
import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from edge.flowshare.render import (
    ALL_RP_FILTER,
    CHAINS,
    LOCAL_TABLE,
    TABLE,
    OverlayPlan,
    RoutingPlan,
    sysctl_writes,
)

log = logging.getLogger("edge.flowshare.kernel")

SYSCTL_ROOT = Path("/proc/sys")
AF_INET = 2


class KernelError(Exception):
    """One line naming what is missing or failed."""


class _LibNftables:
    """libnftables (what `nft` itself runs on) through ctypes: a change costs a netlink
    transaction, not a process. One context, one caller at a time: the map's updates have a
    context of their own, so a read (the counters) never holds one up."""

    JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON

    def __init__(self) -> None:
        name = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            raise KernelError("libnftables is not installed (Debian package nftables)") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        for fn in (lib.nft_ctx_buffer_output, lib.nft_ctx_buffer_error):
            fn.argtypes = [ctypes.c_void_p]
        for fn in (lib.nft_ctx_get_output_buffer, lib.nft_ctx_get_error_buffer):
            fn.argtypes = [ctypes.c_void_p]
            fn.restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_ctx_set_dry_run.argtypes = [ctypes.c_void_p, ctypes.c_bool]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        self._lib = lib
        self._ctx = lib.nft_ctx_new(0)
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)
        self._lock = threading.Lock()

    def run(self, script: str, *, check: bool = False, as_json: bool = False) -> str:
        with self._lock:
            return self._run(script, check, as_json)

    def try_run(self, script: str) -> str | None:
        """Runs `script` now if the context is free, else None (someone else's call is on
        it: a thread's)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self._run(script, False, False)
        finally:
            self._lock.release()

    def _run(self, script: str, check: bool, as_json: bool) -> str:
        lib, ctx = self._lib, self._ctx
        lib.nft_ctx_set_dry_run(ctx, check)
        lib.nft_ctx_output_set_flags(ctx, self.JSON if as_json else 0)
        rc = lib.nft_run_cmd_from_buffer(ctx, script.encode())
        out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
        err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
        lib.nft_ctx_set_dry_run(ctx, False)
        if rc != 0:
            first = next((line for line in err.splitlines() if line.strip()), "failed")
            raise KernelError(f"nft: {first}")
        return out


_contexts: dict[str, _LibNftables] = {}


def _lib(use: str = "changes") -> _LibNftables:
    """ "changes" (the map's updates, the ruleset) or "reads" (listings, counters)."""
    context = _contexts.get(use)
    if context is None:
        context = _contexts[use] = _LibNftables()
    return context


async def nft(script: str, *, check: bool = False, inline: bool = False) -> str:
    """Runs an nft script as one transaction (`check`: validate only, change nothing);
    raises KernelError with nft's first line. `inline`: on the event loop itself when the
    context is free (a few map elements cost ~0.1-0.3 ms here; a thread's round trip costs
    more than that on a loaded machine, twice a GIL hand-over); otherwise in a thread."""
    lib = _lib()
    if inline and not check:
        out = lib.try_run(script)
        if out is not None:
            return out
    return await asyncio.to_thread(lib.run, script, check=check)


def nft_now(script: str) -> str | None:
    """Runs an nft script on the caller's thread (the event loop) if the changes' context
    is free; None if it is not. Raises KernelError like `nft`."""
    return _lib().try_run(script)


async def nft_json(*words: str) -> dict[str, Any]:
    out = await asyncio.to_thread(_lib("reads").run, " ".join(words), as_json=True)
    data: dict[str, Any] = json.loads(out or "{}")
    return data


async def table_counters() -> dict[str, int]:
    """Packets counted by the table's rules, by rule comment ("loop", "moved", "to X").
    Lists the chains, not the table: a table listing carries every map element (a scan of
    the whole map on every tick, holding the nft context the map's updates wait for)."""
    counts: dict[str, int] = {}
    for chain in CHAINS:
        data = await nft_json("list", "chain", "inet", TABLE, chain)
        for item in data.get("nftables", []):
            rule = item.get("rule")
            if not rule or "comment" not in rule:
                continue
            for expr in rule.get("expr", []):
                if "counter" in expr:
                    counts[rule["comment"]] = int(expr["counter"]["packets"])
    return counts


async def delete_table() -> bool:
    """Removes the table if present; True when there was one."""
    try:
        await nft(f"delete table inet {TABLE}")
    except KernelError as error:
        if "No such file" in str(error):
            return False
        raise
    return True


# -- rules, routes --------------------------------------------------------------------


def _rules(ipr: IPRoute) -> list[tuple[int, int, int | None]]:
    found = []
    for rule in ipr.get_rules(family=AF_INET):
        found.append(
            (
                int(rule.get_attr("FRA_PRIORITY") or 0),
                int(rule.get_attr("FRA_TABLE") or rule.get("table")),
                rule.get_attr("FRA_FWMARK"),
            )
        )
    return found


def _rule_args(pref: int, table: int, fwmark: int | None) -> dict[str, int]:
    args = {"priority": pref, "table": table, "family": AF_INET}
    if fwmark is not None:
        args["fwmark"] = fwmark
    return args


def install_routing(plan: RoutingPlan) -> None:
    with IPRoute() as ipr:
        for route in plan.routes:
            links = ipr.link_lookup(ifname=route.device)
            if not links:
                raise KernelError(f"flowshare.peer_interface: no interface {route.device!r}")
            ipr.route(
                "replace",
                dst=route.destination,
                gateway=route.gateway,
                oif=links[0],
                table=route.table,
            )
        present = set(_rules(ipr))
        for rule in plan.rules:
            if (rule.pref, rule.table, rule.fwmark) not in present:
                ipr.rule("add", **_rule_args(rule.pref, rule.table, rule.fwmark))
        for rule in plan.remove_rules:  # the `local` rule at 0, once its successor is in
            with contextlib.suppress(NetlinkError):
                ipr.rule("del", **_rule_args(rule.pref, rule.table, rule.fwmark))


def remove_routing(plan: RoutingPlan) -> int:
    """Undoes `install_routing` (also a partial one): the `local` rule back at pref 0
    first, then ours out. Returns how many of ours it removed."""
    removed = 0
    with IPRoute() as ipr:
        present = set(_rules(ipr))
        if not any(pref == 0 and table == LOCAL_TABLE for pref, table, _ in present):
            ipr.rule("add", **_rule_args(0, LOCAL_TABLE, None))
        for rule in plan.rules:
            if (rule.pref, rule.table, rule.fwmark) in present:
                ipr.rule("del", **_rule_args(rule.pref, rule.table, rule.fwmark))
                removed += 1
        for route in plan.routes:
            with contextlib.suppress(NetlinkError):
                ipr.route("del", dst=route.destination, table=route.table)
                removed += 1
    return removed


# -- the overlay (VXLAN among the edges) ------------------------------------------------

ANY_MAC = "00:00:00:00:00:00"


def _vxlan_id(ipr: IPRoute, index: int) -> int | None:
    """The VNI of the device, or None when it is not a VXLAN device."""
    info = ipr.get_links(index)[0].get_attr("IFLA_LINKINFO")
    if info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan":
        return None
    return int(info.get_attr("IFLA_INFO_DATA").get_attr("IFLA_VXLAN_ID"))


def install_overlay(plan: OverlayPlan) -> None:
    """Builds the VXLAN device, its address and one FDB entry per peer, then brings it up.
    Raises KernelError with one line (the kernel has no VXLAN; the name is taken)."""
    with IPRoute() as ipr:
        if ipr.link_lookup(ifname=plan.device):
            raise KernelError(
                f"flowshare.peer_interface: {plan.device!r} exists and is not our overlay"
            )
        try:
            ipr.link(
                "add",
                ifname=plan.device,
                kind="vxlan",
                vxlan_id=plan.vni,
                vxlan_local=plan.local,
                vxlan_port=plan.port,
                vxlan_learning=0,
            )
        except NetlinkError as error:
            raise KernelError(f"flowshare.overlay: cannot create a VXLAN device: {error}") from None
        index = ipr.link_lookup(ifname=plan.device)[0]
        ipr.addr("add", index=index, address=plan.address, prefixlen=plan.prefix_len)
        for remote in plan.remotes:
            ipr.fdb("append", ifindex=index, lladdr=ANY_MAC, dst=remote)
        ipr.link("set", index=index, state="up")


def remove_overlay(plan: OverlayPlan) -> bool:
    """Deletes the device if it is our overlay (a VXLAN device with our VNI); True when
    there was one. Anything else of that name is left alone."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=plan.device)
        if not found or _vxlan_id(ipr, found[0]) != plan.vni:
            return False
        ipr.link("del", index=found[0])
    return True


# -- sysctls --------------------------------------------------------------------------


def read_sysctl(name: str) -> str:
    return (SYSCTL_ROOT / name).read_text().strip()


def write_sysctl(name: str, value: str) -> None:
    (SYSCTL_ROOT / name).write_text(value + "\n")


class SysctlKeeper:
    """Sets sysctls and puts the previous values back; the previous values live in a
    state file meanwhile, so a start after a crash restores them first."""

    def __init__(self, state_file: Path) -> None:
        self.state_file = state_file

    def restore(self) -> bool:
        """Puts back what a previous `apply` saved (this run's or a crashed one's)."""
        if not self.state_file.exists():
            return False
        try:
            saved = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            log.warning("flowshare: unreadable %s, ignored", self.state_file)
            saved = {}
        self._restore(saved)
        return True

    def apply(self, wanted: dict[str, str]) -> None:
        current = {name: read_sysctl(name) for name in (*wanted, ALL_RP_FILTER)}
        writes = sysctl_writes(wanted, current)
        saved = {name: current[name] for name in writes}
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(saved))
        for name, value in writes.items():
            write_sysctl(name, value)

    def _restore(self, saved: dict[str, str]) -> None:
        for name, value in saved.items():
            with contextlib.suppress(OSError):
                write_sysctl(name, value)
        self.state_file.unlink(missing_ok=True)


def probe(peer_interface: str, sysctl_names: Iterable[str]) -> str | None:
    """What is missing for forwarding, as one line (None: nothing)."""
    try:
        _lib()
    except KernelError as error:
        return str(error)
    try:
        with IPRoute() as ipr:
            if not ipr.link_lookup(ifname=peer_interface):
                return f"flowshare.peer_interface: no interface {peer_interface!r}"
    except NetlinkError as error:
        return f"netlink: {error}"
    for name in sysctl_names:
        if not (SYSCTL_ROOT / name).exists():
            return f"sysctl {name.replace('/', '.')} is missing"
    return None
