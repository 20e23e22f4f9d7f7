"""The real `edgectl` binary against the real API (uvicorn; SQLite and etcd where it matters).

Nodes are played by the test: heartbeats sent with contract.client and node tokens, reporting the
state and revision a real agent would. Every loop is bounded; no assertion is about time."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from contract.client import ApiClient
from contract.schemas import (
    AdminState,
    BgpSession,
    DrainKind,
    Heartbeat,
    NodeDesired,
    NodeSpec,
    NodeState,
    SiteSpec,
    WeightsUpdate,
)
from tests.integration.conftest import (
    DEFAULT_BUDGET,
    NODE_A1,
    NODE_B1,
    OPERATOR,
    VIEWER,
    ApiUnderTest,
)
from tests.support.etcd_cluster import free_port
from tests.support.procs import wait_for

pytestmark = pytest.mark.timeout(180)

EDGECTL = str(Path(sys.executable).parent / "edgectl")
sqlite_only = pytest.mark.parametrize("store_kind", ["sqlite"])


def run(
    api: ApiUnderTest | None,
    *args: str,
    token: str = OPERATOR,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EDGECTL_")}
    if api is not None:
        environ["EDGECTL_API"] = api.url
    environ["EDGECTL_TOKEN"] = token
    environ.update(env or {})
    return subprocess.run(
        [EDGECTL, *args],
        capture_output=True,
        text=True,
        env=environ,
        input=stdin if stdin is not None else "",
        timeout=120,
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert result.stderr == ""
    return result


def failed(result: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """Exit code `code` and exactly one line on stderr that names what went wrong."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("edgectl: ")
    assert "Traceback" not in result.stderr + result.stdout
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def call(api: ApiUnderTest, work: Callable[[ApiClient], Any], token: str = OPERATOR) -> Any:
    async def go() -> Any:
        async with ApiClient([api.url], token) as client:
            return await work(client)

    return asyncio.run(go())


def seed(api: ApiUnderTest) -> int:
    """site-a (a1, a2) and site-b (b1)."""

    async def work(client: ApiClient) -> int:
        state = await client.put_site("site-a", SiteSpec(capacity_mbps=300), revision=0)
        state = await client.put_site("site-b", SiteSpec(), revision=state.revision)
        for node, site in (("a1", "site-a"), ("a2", "site-a"), ("b1", "site-b")):
            state = await client.put_node(node, NodeSpec(site=site), revision=state.revision)
        return state.revision

    revision: int = call(api, work)
    return revision


def heartbeat(
    api: ApiUnderTest, node: str, token: str, state: NodeState, applied: int
) -> NodeDesired:
    beat = Heartbeat(
        state=state,
        applied_revision=applied,
        connections=3,
        bgp_sessions=[BgpSession(peer="198.18.0.1", state="up")],
    )
    view: NodeDesired = call(api, lambda c: c.heartbeat(node, beat), token)
    return view


class Nodes:
    """Plays a1 and b1 in a thread: heartbeats with node tokens. With `apply`, each node
    reports the revision of the view it got back and `draining` while drained, as the agent
    does; without, they stay healthy on revision 0 (a stuck fleet)."""

    TOKENS = {"a1": NODE_A1, "b1": NODE_B1}

    def __init__(self, api: ApiUnderTest, apply: bool) -> None:
        self.api, self.apply = api, apply
        self.stop = threading.Event()
        self.beats = 0
        self.thread = threading.Thread(target=lambda: asyncio.run(self._loop()), daemon=True)

    async def _loop(self) -> None:
        clients = {n: ApiClient([self.api.url], t) for n, t in self.TOKENS.items()}
        views: dict[str, NodeDesired] = {}
        try:
            for _ in range(3000):  # bounded; stopped by the test long before
                if self.stop.is_set():
                    return
                for node, client in clients.items():
                    view = views.get(node)
                    drained = (
                        self.apply
                        and view is not None
                        and view.admin_state is not AdminState.ACTIVE
                    )
                    beat = Heartbeat(
                        state=NodeState.DRAINING if drained else NodeState.HEALTHY,
                        applied_revision=view.revision if (self.apply and view) else 0,
                    )
                    views[node] = await client.heartbeat(node, beat)
                self.beats += 1
                await asyncio.sleep(0.1)
        finally:
            for client in clients.values():
                await client.aclose()

    def __enter__(self) -> Nodes:
        self.thread.start()
        wait_for(lambda: self.beats >= 1)
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(10)


@pytest.fixture
def fleet(api_factory: Callable[..., ApiUnderTest]) -> Iterator[ApiUnderTest]:
    # A heartbeat stays alive for a minute: each edgectl call is a process start, and a few
    # of them on a loaded machine outlast the default test TTL of 2 s.
    api = api_factory(heartbeat_ttl_s=60)
    seed(api)
    yield api


# --- read commands --------------------------------------------------------------------


def test_status_nodes_events_weights_convergence(fleet: ApiUnderTest) -> None:
    api = fleet
    revision = call(api, lambda c: c.state()).revision
    heartbeat(api, "a1", NODE_A1, NodeState.HEALTHY, revision)

    human = ok(run(api, "status")).stdout
    for word in ("site-a", "site-b", "a1", "a2", "b1", "healthy", "alive", "1/1 up", "unknown"):
        assert word in human, word
    assert f"revision {revision}" in human

    status = json.loads(ok(run(api, "status", "--json")).stdout)
    assert set(status) == {"revision", "converged", "lagging", "sites", "nodes", "groups"}
    assert status["revision"] == revision
    assert [s["name"] for s in status["sites"]] == ["site-a", "site-b"]
    nodes = {n["name"]: n for n in status["nodes"]}
    assert nodes["a1"]["state"] == "healthy" and nodes["a1"]["liveness"] == "alive"
    assert nodes["a1"]["applied_revision"] == revision
    assert nodes["a1"]["bgp_sessions"] == [{"peer": "198.18.0.1", "state": "up"}]
    assert nodes["a1"]["last_seen"] is not None and nodes["a1"]["weight"] == 100
    assert nodes["a2"]["liveness"] == "unknown" and nodes["a2"]["applied_revision"] is None
    assert sum(n["effective_weight"] for n in status["nodes"]) > 0

    listed = json.loads(ok(run(api, "nodes", "--json")).stdout)
    assert [(n["name"], n["site"]) for n in listed] == [
        ("a1", "site-a"),
        ("a2", "site-a"),
        ("b1", "site-b"),
    ]
    assert "connections" in listed[0] and listed[0]["connections"] == 3
    assert "a2" in ok(run(api, "nodes")).stdout

    events = json.loads(ok(run(api, "events", "--json", "--limit", "3")).stdout)
    assert len(events) == 3
    assert {"id", "time", "kind", "subject", "cause", "author", "revision"} <= set(events[0])
    assert any(e["subject"] == "b1" and e["author"] == "alice" for e in events)
    human = ok(run(api, "events", "--token", VIEWER)).stdout
    assert "site-set" in human and "alice" in human

    weights = json.loads(ok(run(api, "weights", "show", "--json")).stdout)
    assert weights["revision"] == revision
    assert weights["sites"]["site-a"]["weight"] == 100
    assert "site-b" in ok(run(api, "weights", "show")).stdout

    convergence = json.loads(ok(run(api, "convergence", "--json")).stdout)
    assert convergence["revision"] == revision and convergence["applied"] == ["a1"]
    assert "lagging" in ok(run(api, "convergence")).stdout


@sqlite_only
def test_events_follow_and_watch_are_bounded(fleet: ApiUnderTest) -> None:
    api = fleet
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EDGECTL_")}
    args = ["events", "--follow", "--json", "--limit", "1", "--count", "1", "--seconds", "100"]
    follow = subprocess.Popen(
        [EDGECTL, "--api", api.url, "--token", VIEWER, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environ,
    )
    try:
        assert follow.stdout is not None
        assert json.loads(follow.stdout.readline())["subject"] == "b1"  # the last one
        revision = call(api, lambda c: c.state()).revision
        call(api, lambda c: c.set_weights(WeightsUpdate(sites={"site-b": 9}), revision=revision))
        out, err = follow.communicate(timeout=60)
        assert follow.returncode == 0, err
        new = json.loads(out)
        assert new["kind"] == "weight" and new["cause"] == "site weight 100 -> 9"
    finally:
        follow.kill()
        follow.wait()

    frames = ok(run(api, "watch", "--json", "--count", "2", "--interval", "0.2")).stdout
    lines = frames.splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["sites"][1]["weight"] == 9
    assert "site-b" in ok(run(api, "watch", "--count", "1")).stdout
    ok(run(api, "watch", "--json", "--seconds", "0.5", "--interval", "0.2"))


# --- weights --------------------------------------------------------------------------


def test_weights_set_writes_and_shows_the_new_revision(fleet: ApiUnderTest) -> None:
    api = fleet
    before = call(api, lambda c: c.state()).revision
    out = ok(run(api, "weights", "set", "site-a=3", "site-b=1", "--node", "a1=2")).stdout
    assert f"revision {before} -> {before + 1}" in out
    state = call(api, lambda c: c.state())
    assert state.revision == before + 1
    assert (state.sites["site-a"].weight, state.sites["site-b"].weight) == (3, 1)
    assert state.nodes["a1"].weight == 2

    again = json.loads(ok(run(api, "weights", "set", "site-a=3", "--json")).stdout)
    assert again == {"revision": before + 1, "previous_revision": before + 1, "changed": []}
    result = json.loads(ok(run(api, "weights", "set", "--node", "b1=0", "--json")).stdout)
    assert result["revision"] == before + 2
    assert result["changed"] == [{"kind": "node", "name": "b1", "before": "100", "after": "0"}]

    failed(run(api, "weights", "set", "site-x=1"), 4, "no site named 'site-x'")
    failed(run(api, "weights", "set", "a1=1"), 2, "'a1' is a node, not a site")
    failed(run(api, "weights", "set", "site-a=x"), 2, "'site-a=x' is not NAME=WEIGHT")
    failed(run(api, "weights", "set", "site-a=1001"), 2, "between 0 and 1000")
    assert call(api, lambda c: c.state()).revision == before + 2


def _racing(
    api: ApiUnderTest,
    tmp_path: Path,
    args: list[str],
    stdin: str,
    concurrent: WeightsUpdate | Callable[[ApiClient, int], Any],
) -> subprocess.CompletedProcess[str]:
    """Run edgectl; between its read and its write, another operator writes `concurrent`
    (weights, or any write given the revision edgectl read)."""
    hook = tmp_path / f"race-{len(list(tmp_path.iterdir()))}"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EDGECTL_")}
    environ |= {"EDGECTL_API": api.url, "EDGECTL_TOKEN": OPERATOR}
    environ["EDGECTL_TEST_PAUSE_BEFORE_WRITE"] = str(hook)
    proc = subprocess.Popen(
        [EDGECTL, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environ,
    )
    try:
        read = int(wait_for(lambda: Path(f"{hook}.read").read_text(), timeout=60))
        if isinstance(concurrent, WeightsUpdate):
            call(api, lambda c: c.set_weights(concurrent, revision=read))
        else:
            call(api, lambda c: concurrent(c, read))
        Path(f"{hook}.go").touch()
        out, err = proc.communicate(stdin, timeout=60)
    finally:
        proc.kill()
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_a_concurrent_change_is_never_overwritten(fleet: ApiUnderTest, tmp_path: Path) -> None:
    api = fleet
    # --yes: exit 3, the diff shown, nothing written.
    result = _racing(
        api,
        tmp_path,
        ["weights", "set", "site-a=3", "--yes"],
        "",
        WeightsUpdate(sites={"site-a": 7}),
    )
    line = failed(result, 3, "changed meanwhile", "site site-a weight 100 -> 7", "nothing written")
    assert "site-a" in result.stdout and "7" in result.stdout  # the diff table
    state = call(api, lambda c: c.state())
    assert state.sites["site-a"].weight == 7, line

    # --json --yes: the diff as data.
    result = _racing(
        api,
        tmp_path,
        ["weights", "set", "site-a=3", "--yes", "--json"],
        "",
        WeightsUpdate(nodes={"a2": 5}),
    )
    failed(result, 3)
    diff = json.loads(result.stdout)
    assert diff["conflict"] is True and diff["current_revision"] == diff["read_revision"] + 1
    assert diff["changed"] == [{"kind": "node", "name": "a2", "before": "100", "after": "5"}]
    assert call(api, lambda c: c.state()).sites["site-a"].weight == 7

    # Asked, the operator declines: exit 3, nothing written.
    result = _racing(
        api, tmp_path, ["weights", "set", "site-a=3"], "n\n", WeightsUpdate(sites={"site-b": 4})
    )
    failed(result, 3, "nothing written")
    assert "site-b" in result.stdout and "Apply your weights" in result.stdout
    assert call(api, lambda c: c.state()).sites["site-a"].weight == 7

    # Asked, the operator accepts: applied on top of the new state, both changes kept.
    result = _racing(
        api, tmp_path, ["weights", "set", "site-a=3"], "y\n", WeightsUpdate(sites={"site-b": 2})
    )
    assert result.returncode == 0, result.stderr
    assert "site site-b" not in result.stderr and "site-b" in result.stdout
    state = call(api, lambda c: c.state())
    assert (state.sites["site-a"].weight, state.sites["site-b"].weight) == (3, 2)


# --- drains ---------------------------------------------------------------------------


@sqlite_only
def test_drain_and_undrain_without_wait(fleet: ApiUnderTest, tmp_path: Path) -> None:
    api = fleet
    out = ok(run(api, "drain", "a1", "--reason", "kernel upgrade [CHG-1]")).stdout
    assert "node a1 drained at revision" in out
    status = json.loads(ok(run(api, "status", "--json")).stdout)
    a1 = next(n for n in status["nodes"] if n["name"] == "a1")
    assert a1["drained"] and a1["drain_reason"] == "kernel upgrade [CHG-1] (alice)"
    assert "kernel upgrade [CHG-1]" in ok(run(api, "status")).stdout  # not read as markup
    events = json.loads(ok(run(api, "events", "--json", "--limit", "1")).stdout)
    assert events[0]["kind"] == "drain" and "kernel upgrade" in events[0]["cause"]

    drained = json.loads(ok(run(api, "drain", "site-b", "--reason", "fiber cut", "--json")).stdout)
    assert drained["kind"] == "site" and drained["nodes"] == ["b1"] and not drained["waited"]
    failed(run(api, "undrain", "b1"), 4, "its site is: undrain site-b")
    ok(run(api, "undrain", "site-b"))
    ok(run(api, "undrain", "a1"))
    assert call(api, lambda c: c.state()).drains == []
    failed(run(api, "undrain", "a1"), 4, "node a1 is not drained")
    failed(run(api, "drain", "zz", "--reason", "x"), 4, "no node or site named 'zz'")
    failed(run(api, "drain", "a1", "--reason", " "), 2, "--reason")
    failed(run(api, "drain", "a1"), 2, "--reason")

    # A concurrent change elsewhere is not a reason to fail a drain: it is applied on top.
    result = _racing(
        api, tmp_path, ["drain", "a2", "--reason", "disk"], "", WeightsUpdate(sites={"site-b": 3})
    )
    assert result.returncode == 0, result.stderr
    state = call(api, lambda c: c.state())
    assert [d.name for d in state.drains] == ["a2"] and state.sites["site-b"].weight == 3

    # Someone else changed this very drain meanwhile: exit 3, their reason is kept.
    result = _racing(
        api,
        tmp_path,
        ["drain", "a2", "--reason", "mine"],
        "",
        lambda c, rev: c.drain(DrainKind.NODE, "a2", "theirs", revision=rev),
    )
    failed(result, 3, "node a2 was changed meanwhile", "theirs", "nothing written")
    assert call(api, lambda c: c.state()).drains[0].reason == "theirs"


def test_drain_wait_until_converged_and_draining(fleet: ApiUnderTest) -> None:
    api = fleet
    with Nodes(api, apply=True):
        out = ok(run(api, "drain", "a1", "--reason", "maintenance", "--wait", "--timeout", "60"))
        assert "node a1 drained" in out.stdout and "fleet converged" in out.stdout
        # What --wait promised holds now: every live node applied it, a1 reports draining.
        state = call(api, lambda c: c.state())
        observed = {o.node: o for o in call(api, lambda c: c.observed())}
        for node in ("a1", "b1"):
            heartbeat_ = observed[node].heartbeat
            assert heartbeat_ is not None and heartbeat_.applied_revision >= state.revision
        assert observed["a1"].heartbeat is not None
        assert observed["a1"].heartbeat.state in (NodeState.DRAINING, NodeState.DOWN)

        out = ok(run(api, "undrain", "a1", "--wait", "--timeout", "60", "--json"))
        assert json.loads(out.stdout)["waited"] is True
        observed = {o.node: o for o in call(api, lambda c: c.observed())}
        assert observed["a1"].heartbeat is not None
        assert observed["a1"].heartbeat.state is NodeState.HEALTHY


@sqlite_only
def test_drain_wait_times_out_with_exit_6(fleet: ApiUnderTest) -> None:
    api = fleet
    with Nodes(api, apply=False):  # alive, but never applies anything
        result = run(api, "drain", "site-a", "--reason", "x", "--wait", "--timeout", "0.5")
    failed(result, 6, "timed out", "a1 applied revision 0")
    assert call(api, lambda c: c.state()).drains[0].kind is DrainKind.SITE  # it was written


@sqlite_only
def test_drain_refused_by_the_budget_in_one_line_and_forced_with_a_reason(
    api_factory: Callable[..., ApiUnderTest],
) -> None:
    # A long TTL: the nodes stay alive across the edgectl runs without a heartbeat loop.
    api = api_factory(budget=DEFAULT_BUDGET, heartbeat_ttl_s=60)
    seed(api)
    for node in ("a1", "a2", "b1"):
        heartbeat(api, node, OPERATOR, NodeState.HEALTHY, 0)
    ok(run(api, "drain", "a1", "--reason", "kernel"))
    line = failed(run(api, "drain", "a2", "--reason", "kernel"), 3, "disruption budget")
    assert "site site-a" in line and "this would leave 0" in line and "--force" in line
    assert {d.name for d in call(api, lambda c: c.state()).drains} == {"a1"}
    ok(run(api, "drain", "a2", "--reason", "vendor swap, approved", "--force"))
    events = call(api, lambda c: c.events())
    [override] = [e for e in events if e.kind == "budget-override"]
    assert override.author == "alice" and "vendor swap, approved" in override.cause


# --- errors ---------------------------------------------------------------------------


@sqlite_only
def test_a_store_outage_is_reported_as_the_store_not_the_api(
    api_factory: Callable[..., ApiUnderTest],
) -> None:
    """The API is up, its etcd is not (nothing listens there): the API answers 503 only once
    its own store deadline (5 s by default) has passed, and edgectl waits long enough to
    hear it, so the line names the store."""
    api = api_factory(store={"kind": "etcd", "endpoints": [f"http://127.0.0.1:{free_port()}"]})
    line = failed(run(api, "status"), 1, "state store is unavailable")
    assert "API unavailable" not in line


@sqlite_only
def test_errors_are_one_line_with_the_documented_exit_codes(fleet: ApiUnderTest) -> None:
    api = fleet
    dead = f"http://127.0.0.1:{free_port()}"
    failed(run(None, "status", "--api", dead), 1, "API unavailable", dead)
    failed(run(None, "drain", "a1", "--reason", "x", "--api", dead), 1, "API unavailable")
    # Failover: the dead endpoint first, the live one answers.
    assert json.loads(ok(run(None, "--api", dead, "--api", api.url, "status", "--json")).stdout)
    ok(run(None, "status", env={"EDGECTL_API": f"{dead},{api.url}"}))

    revision = call(api, lambda c: c.state()).revision
    failed(run(api, "weights", "set", "site-a=1", token=VIEWER), 5, "forbidden", "viewer")
    failed(run(api, "drain", "a1", "--reason", "x", token=VIEWER), 5, "forbidden")
    failed(run(api, "status", token="wrong-token-0000"), 5, "unauthorized")
    assert call(api, lambda c: c.state()).revision == revision

    failed(run(api, "status", "--bogus"), 2, "status", "--bogus")
    failed(run(api, "events", "--limit", "x"), 2, "--limit")
    failed(run(api, "events", "--count", "1"), 2, "--follow")
    failed(run(api, "drain"), 2, "NODE|SITE")
    failed(run(api, "nodes", "--api", "ftp://x"), 2, "'ftp://x' is not an http(s):// URL")
    failed(run(api, "weights", "set"), 2, "nothing to set")
    failed(run(api, "drain", "a1", "--reason", "x", "--kind", "site"), 4, "no site named 'a1'")

    helptext = ok(run(None, "--help")).stdout
    for code in ("0 ok", "1 API unavailable", "2 bad usage", "3 conflict", "4 not found"):
        assert code in " ".join(helptext.split())
    assert "6 --wait timed out" in " ".join(helptext.split())


def test_lab_is_a_pass_through_to_the_repository_lab(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    failed(run(None, "lab", "up", env={"EDGECTL_LAB_ROOT": str(empty)}), 2, "deploy/lab")

    lab = tmp_path / "repo" / "deploy" / "lab"
    lab.mkdir(parents=True)
    (lab.parent / "__init__.py").write_text("")
    (lab / "__init__.py").write_text("")
    (lab / "__main__.py").write_text(
        "import os, sys\nprint(' '.join(sys.argv[1:]))\nprint(os.getcwd())\nsys.exit(7)\n"
    )
    result = run(
        None, "lab", "chaos", "kill", "a1", "--help", env={"EDGECTL_LAB_ROOT": str(lab.parents[1])}
    )
    assert result.returncode == 7, result.stderr
    assert result.stdout.splitlines() == ["chaos kill a1 --help", str(lab.parents[1])]
