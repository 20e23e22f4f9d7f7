"""The docker-compose lab, brought up once for the e2e package and always taken down.

Needs root (it may install and start Docker) or a Docker engine that answers. The
finalizer removes every container, network and volume the lab made and stops dockerd
when this session started it: CI's machine is left as it was found (images excepted).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from deploy import lab
from tests.support.requires import unavailable


def _can_run() -> str:
    if os.geteuid() == 0:
        return ""
    if shutil.which("docker") and lab.engine_running():
        return ""
    return "needs root or a running Docker engine"


@pytest.fixture(scope="package")
def lab_up() -> Iterator[dict[str, float]]:
    reason = _can_run()
    if reason:
        unavailable(reason)
    started_engine = False
    timings: dict[str, float] = {}
    try:
        begin = time.monotonic()
        started_engine = lab.ensure_engine()
        lab.down()  # a lab left over from an interrupted run starts from scratch
        lab.allow_bridged_traffic()
        lab.build_images()
        timings["build_s"] = time.monotonic() - begin
        begin = time.monotonic()
        lab.run(*lab.compose_command(), "up", "-d", "--no-build", timeout=300)
        lab.wait_ready()
        timings["up_s"] = time.monotonic() - begin
        print(f"\nlab: images {timings['build_s']:.0f} s, up {timings['up_s']:.1f} s")
        yield timings
    finally:
        try:
            lab.down(stop_engine=started_engine)
        finally:
            if started_engine:
                # Nothing of ours may outlive the session.
                subprocess.run(["sysctl", "-qw", "net.ipv4.ip_forward=0"], check=False)
                subprocess.run(["sysctl", "-qw", "net.ipv6.conf.all.forwarding=0"], check=False)


@pytest.fixture
def lab_ok(lab_up: dict[str, float]) -> Iterator[None]:
    """Each test starts from, and leaves, the healthy lab with equal site weights."""
    _restore()
    yield
    _restore()


def _restore() -> None:
    lab.chaos_heal()
    # APIs just reconnected to etcd (after a partition or a leader kill) may answer slowly
    # for a few seconds: every control-plane step is retried, bounded.
    lab.wait_for(_restore_desired_state, 90, "the GSLB back to equal weights, no drains")
    lab.wait_for(lab.fleet_ready, 120, "the lab healthy again")
    lab.wait_for(
        lambda: abs(lab.site_shares_at_core()["site-a"] - 0.5) < 0.02, 60, "equal site weights"
    )


def _restore_desired_state() -> bool:
    lab.undrain_all()
    view = lab.gslb_view()
    if abs(view["sites"].get("site-a", 0) - view["sites"].get("site-b", 0)) > 1:
        lab.set_site_weights({"site-a": 100, "site-b": 100})
    return True
