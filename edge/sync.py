"""ControlPlaneSync: the edge agent's link to the GSLB API, built for static stability.

It long-polls the node's desired view (admin state, link-bandwidth share), sends heartbeats
with what the agent reports, hands every new desired view to the agent through a callback
and reports the revision it applied. Every request goes to the first API endpoint that answers.

Losing the control plane never takes traffic down: the last known good desired view stays
in force, and it is also kept on disk (written atomically), so an agent restarted while no
API answers starts from it. `stale` and `last_success` say how old that knowledge is, for
/status and metrics.

Usage (the agent wires it):

    sync = ControlPlaneSync(
        endpoints=["https://gslb-a:8080", "https://gslb-b:8080"],
        token=node_token,
        node="a1",
        state_path=Path("/var/lib/anycast-edge/desired.json"),
        heartbeat=lambda: Heartbeat(state=machine.state, ...),  # applied_revision is filled in
        on_desired=apply_desired,  # async def apply_desired(view: NodeDesired) -> None
    )
    task = asyncio.create_task(sync.run())   # cancel the task (or `await sync.stop()`) to stop

The callback is called once at start with the view loaded from disk (if any), then with each
new view. When it returns, the view counts as applied: its revision is reported in the next
heartbeat (sent at once). If it raises, the view is not recorded as applied and is offered
again on the next heartbeat answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from contract.client import ApiClient, ApiError
from contract.schemas import NODE_CONTRACT_VERSION, Heartbeat, NodeDesired

log = logging.getLogger(__name__)

HeartbeatSource = Callable[[], Heartbeat]
DesiredCallback = Callable[[NodeDesired], Awaitable[None]]


def write_atomically(path: Path, data: bytes) -> None:
    """Write via a temporary file, fsync, rename, fsync the directory: a crash leaves either
    the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_last_known_good(path: Path) -> NodeDesired | None:
    try:
        raw = path.read_bytes()
        data = json.loads(raw)
        if isinstance(data, dict) and data.get("contract_version", 1) != NODE_CONTRACT_VERSION:
            log.warning(
                "ignoring last-known-good state %s: written for node contract version %s, "
                "this agent speaks %d (it starts without a view until an API answers)",
                path,
                data.get("contract_version", 1),
                NODE_CONTRACT_VERSION,
            )
            return None
        return NodeDesired.model_validate(data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        # A damaged file must not stop the agent: it starts as if it had none.
        log.warning("ignoring unreadable last-known-good state %s: %s", path, exc)
        return None


class ControlPlaneSync:
    def __init__(
        self,
        *,
        endpoints: Sequence[str],
        token: str,
        node: str,
        state_path: Path,
        heartbeat: HeartbeatSource,
        on_desired: DesiredCallback,
        heartbeat_interval_s: float = 1.0,
        long_poll_s: float = 20.0,
        request_timeout_s: float = 2.0,
        stale_after_s: float | None = None,
        verify: bool | str | ssl.SSLContext = True,
    ) -> None:
        """
        endpoints: API base URLs, tried in turn. token: this node's bearer token (role node).
        node: this node's name. state_path: where the last known good view is kept.
        heartbeat: returns the body to send (its applied_revision is replaced by the sync's).
        on_desired: applies a new desired view. stale_after_s: with no successful exchange
        for this long, `stale` is true (default: three heartbeat intervals). verify: TLS
        verification (True, False, a CA file path or an ssl.SSLContext).
        """
        self.node = node
        self.state_path = state_path
        self._heartbeat_source = heartbeat
        self._on_desired = on_desired
        self._interval_s = heartbeat_interval_s
        self._long_poll_s = long_poll_s
        self._stale_after_s = stale_after_s or 3 * heartbeat_interval_s
        self._client = ApiClient(endpoints, token, timeout_s=request_timeout_s, verify=verify)
        self._apply_lock = asyncio.Lock()
        self._heartbeat_now = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: The view in force (last known good), None until one was ever received.
        self.desired: NodeDesired | None = load_last_known_good(state_path)
        #: Revision of the view the callback last applied (reported in heartbeats).
        self.applied_revision = 0
        #: Wall-clock time (time.time()) of the last successful API exchange.
        self.last_success: float | None = None
        self.last_error: str | None = None

    @property
    def stale(self) -> bool:
        """True when the view in force may be out of date: no API answered recently."""
        return self.last_success is None or time.time() - self.last_success > self._stale_after_s

    @property
    def endpoint(self) -> str:
        return self._client.current_endpoint

    def _succeeded(self) -> None:
        self.last_success = time.time()
        self.last_error = None

    def _failed(self, what: str, exc: Exception) -> None:
        if self.last_error is None:
            log.warning("control plane %s failed, keeping last known good: %s", what, exc)
        self.last_error = f"{what}: {exc}"

    async def _apply(self, view: NodeDesired, *, force: bool = False) -> None:
        async with self._apply_lock:
            current = self.desired
            if not force and current is not None and current.fingerprint == view.fingerprint:
                self.applied_revision = max(self.applied_revision, view.revision)
                return
            try:
                await self._on_desired(view)
            except Exception:
                log.exception("applying desired revision %d failed", view.revision)
                return
            self.desired = view
            self.applied_revision = view.revision
            try:
                write_atomically(self.state_path, view.model_dump_json().encode())
            except OSError as exc:
                log.warning("cannot save last known good to %s: %s", self.state_path, exc)
        self._heartbeat_now.set()

    async def _heartbeat_once(self) -> None:
        try:
            body = self._heartbeat_source().model_copy(
                update={"applied_revision": self.applied_revision}
            )
        except Exception:
            # The agent's report failed: skip this beat. If it keeps failing, the lease
            # expires and the control plane reports the node dead, which is the truth.
            log.exception("building the heartbeat failed")
            return
        try:
            view = await self._client.heartbeat(self.node, body)
        except ApiError as exc:
            self._failed("heartbeat", exc)
            return
        self._succeeded()
        # The answer carries the view (possibly a second old): a backstop for a missed
        # long-poll, so only a strictly newer revision is taken from it.
        current = self.desired
        if current is None or view.revision > current.revision:
            await self._apply(view)

    async def _heartbeat_loop(self) -> None:
        while True:
            self._heartbeat_now.clear()
            await self._heartbeat_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._heartbeat_now.wait(), self._interval_s)

    async def _watch_loop(self) -> None:
        backoff_s = 0.1
        while True:
            current = self.desired
            try:
                view = await self._client.node_desired(
                    self.node,
                    after_revision=current.revision if current else 0,
                    fingerprint=current.fingerprint if current else "",
                    timeout_s=self._long_poll_s,
                )
            except ApiError as exc:
                self._failed("watch", exc)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, self._interval_s * 2)
                continue
            backoff_s = 0.1
            self._succeeded()
            await self._apply(view)

    async def run(self) -> None:
        """Run until cancelled. Applies the on-disk view first, then follows the API."""
        if self.desired is not None:
            await self._apply(self.desired, force=True)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._heartbeat_loop(), name="sync-heartbeat")
                group.create_task(self._watch_loop(), name="sync-watch")
        finally:
            await self._client.aclose()

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name=f"control-plane-sync-{self.node}")
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
