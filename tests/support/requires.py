"""The one gate for tests that need a real part: skip on a developer's machine that lacks
it, FAIL under `CI=true` with the reason (a CI machine missing FRR or etcd must not pass).

Mark a test or module with `pytest.mark.needs("root", "frr")` (tests/conftest.py checks
the marker before each test), or call `require(...)` / `unavailable(reason)` from a fixture.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

#: Debian's Chromium, which the browser tests drive through Playwright (no browser download).
CHROMIUM = "/usr/bin/chromium"

#: part -> (is it here?, what is missing when it is not)
PARTS: dict[str, tuple[Callable[[], bool], str]] = {
    "root": (lambda: os.geteuid() == 0, "needs root (network namespaces, nftables)"),
    "frr": (
        lambda: Path("/usr/lib/frr/bgpd").exists() and shutil.which("vtysh") is not None,
        "needs FRR (/usr/lib/frr/bgpd and vtysh; Debian package frr)",
    ),
    "etcd": (lambda: shutil.which("etcd") is not None, "needs etcd (Debian package etcd-server)"),
    "nft": (lambda: shutil.which("nft") is not None, "needs nftables (Debian package nftables)"),
    "openssl": (lambda: shutil.which("openssl") is not None, "needs openssl"),
    "haproxy": (lambda: shutil.which("haproxy") is not None, "needs haproxy"),
    "promtool": (
        lambda: shutil.which("promtool") is not None,
        "needs promtool (Debian package prometheus)",
    ),
    "chromium": (
        lambda: Path(CHROMIUM).exists(),
        f"needs Chromium at {CHROMIUM} (Debian package chromium)",
    ),
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def unavailable(reason: str) -> None:
    """A real part is missing: fail under CI=true, skip elsewhere. Never returns."""
    if in_ci():
        pytest.fail(f"CI=true and this test cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def missing(*parts: str) -> list[str]:
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; known: {sorted(PARTS)}")
    return [PARTS[p][1] for p in parts if not PARTS[p][0]()]


def require(*parts: str) -> None:
    if reasons := missing(*parts):
        unavailable("; ".join(reasons))
