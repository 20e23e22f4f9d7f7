"""The status page in a real browser (Debian's Chromium through Playwright) against the real
API (uvicorn) with two real agents heartbeating to it: every node is drawn with its state, a
drain made with the real `edgectl` appears live (no reload), the console stays clean, the page
refuses no token with the API's 401 and never carries a secret. Screenshots of a laptop and a
phone screen are saved under bench-results/ui/ for a reader to look at."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from contract.client import ApiClient
from contract.schemas import NodeSpec, SiteSpec
from tests.integration.conftest import NODE_A1, NODE_B1, OPERATOR, VIEWER, ApiUnderTest
from tests.support.procs import ROOT, wait_for
from tests.support.requires import CHROMIUM
from tests.support.site import Site

pytestmark = [pytest.mark.timeout(240), pytest.mark.needs("chromium")]

SHOTS = ROOT / "bench-results" / "ui"
EDGECTL = str(Path(sys.executable).parent / "edgectl")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _agent(tmp: Path, api: ApiUnderTest, name: str, token: str) -> Site:
    site = Site(
        tmp / name,
        control_plane={
            "endpoints": [api.url],
            "token": token,
            "state_file": str(tmp / f"{name}.json"),
            "heartbeat_interval": 0.2,
        },
    )
    site.agent.config["node"]["name"] = name
    return site


@pytest.fixture
def fleet(api: ApiUnderTest, tmp_path: Path) -> Iterator[ApiUnderTest]:
    async def seed() -> None:
        async with ApiClient([api.url], OPERATOR) as operator:
            state = await operator.put_site("site-a", SiteSpec(), revision=0)
            state = await operator.put_site("site-b", SiteSpec(), revision=state.revision)
            state = await operator.put_node("a1", NodeSpec(site="site-a"), revision=state.revision)
            await operator.put_node("b1", NodeSpec(site="site-b"), revision=state.revision)

    asyncio.run(seed())
    for name in ("a1", "b1"):
        (tmp_path / name).mkdir()
    agents = [_agent(tmp_path, api, "a1", NODE_A1), _agent(tmp_path, api, "b1", NODE_B1)]
    try:
        for agent in agents:
            agent.start()

        async def healthy() -> bool:
            async with ApiClient([api.url], VIEWER) as viewer:
                beats = {n.node: n.heartbeat for n in await viewer.observed()}
                return all(b is not None and str(b.state) == "healthy" for b in beats.values())

        wait_for(lambda: asyncio.run(healthy()), timeout=60)
        yield api
    finally:
        for agent in agents:
            agent.close()


@pytest.mark.parametrize("store_kind", ["sqlite"])
def test_the_page_refuses_no_token_and_never_holds_a_secret(fleet: ApiUnderTest) -> None:
    with httpx.Client(base_url=fleet.url, timeout=10) as http:
        refused = http.get("/ui", headers={"Accept": "application/json"})
        assert refused.status_code == 401
        assert refused.headers["WWW-Authenticate"] == "Bearer"
        assert refused.json()["detail"] == "missing or invalid bearer token"
        for path in ("/ui/model", "/ui/stream"):
            assert http.get(path).status_code == 401
        # A node's token reads only its own view, not the fleet.
        assert (
            http.get("/ui/model", headers={"Authorization": f"Bearer {NODE_A1}"}).status_code == 403
        )
        model = http.get("/ui/model", headers={"Authorization": f"Bearer {VIEWER}"}).json()
        assert [n["name"] for n in model["nodes"]] == ["a1", "b1"]
        # A wrong token at the login form is a 401 again, with nothing set.
        wrong = http.post("/ui/login", content="token=nope", headers={"Accept": "text/html"})
        assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
        good = http.post(
            "/ui/login",
            content=f"token={VIEWER}",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            follow_redirects=False,
        )
        assert good.status_code == 303 and good.headers["location"] == "/ui"
        cookie = good.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and VIEWER not in cookie
        page = http.get("/ui")  # the session cookie, nothing else
        assert page.status_code == 200 and VIEWER not in page.text
        assert "default-src 'self'" in page.headers["Content-Security-Policy"]
        logout = http.post("/ui/logout", follow_redirects=False)
        assert logout.status_code == 303
        assert http.get("/ui/model").status_code == 401  # the session is gone


@pytest.mark.parametrize("store_kind", ["sqlite"])
def test_the_page_shows_every_node_and_a_drain_appears_live(fleet: ApiUnderTest) -> None:
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            laptop = browser.new_page(viewport={"width": 1366, "height": 860})
            first = laptop.goto(f"{fleet.url}/ui")
            assert first is not None and first.status == 401  # the API's 401, as a login form
            # From here on the console must stay clean (the 401 above is logged as a failed
            # load, on purpose).
            laptop.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            laptop.on("pageerror", lambda e: problems.append(str(e)))
            laptop.fill("#token", VIEWER)
            laptop.click("button[type=submit]")
            laptop.wait_for_url(f"{fleet.url}/ui")
            for node in ("a1", "b1"):
                laptop.wait_for_selector(f'tr[data-node="{node}"][data-state="healthy"]')
            assert laptop.inner_text("#live") == "live"
            assert "2/2 serving" in laptop.inner_text("#summary")
            # The time series has a few samples (the page's CSP forbids eval: no wait_for_function).
            laptop.locator('tr[data-node="a1"] svg rect').nth(2).wait_for(state="attached")
            laptop.screenshot(path=str(SHOTS / "fleet-laptop.png"), full_page=True)
            laptop.evaluate("window.__notReloaded = true")

            environ = {k: v for k, v in os.environ.items() if not k.startswith("EDGECTL_")}
            environ.update(EDGECTL_API=fleet.url, EDGECTL_TOKEN=OPERATOR)
            drained = subprocess.run(
                [EDGECTL, "drain", "a1", "--reason", "ui test: kernel upgrade"],
                capture_output=True, text=True, env=environ, timeout=60, check=False,
            )  # fmt: skip
            assert drained.returncode == 0, drained.stderr
            # Live: the drain, its reason and author, and the node leaving, with no reload.
            laptop.wait_for_selector('li[data-drain="node:a1"]')
            assert "ui test: kernel upgrade" in laptop.inner_text('li[data-drain="node:a1"]')
            assert "alice" in laptop.inner_text('li[data-drain="node:a1"]')
            laptop.wait_for_selector('tr[data-node="a1"][data-state="down"]', timeout=30_000)
            # The drain as a1 runs it (its heartbeat), and why it is down, in its own words.
            laptop.wait_for_selector('tr[data-node="a1"] [data-drain-phase="done"]')
            assert "drained: ui test: kernel upgrade" in laptop.inner_text('tr[data-node="a1"]')
            assert laptop.evaluate("window.__notReloaded") is True
            assert "1/2 serving" in laptop.inner_text("#summary")
            events = laptop.inner_text("#events")
            assert "a1" in events
            laptop.screenshot(path=str(SHOTS / "drain-laptop.png"), full_page=True)
            content = laptop.content()
            assert VIEWER not in content and OPERATOR not in content and VIEWER not in laptop.url

            phone = browser.new_context(
                viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True
            )
            phone.add_cookies(laptop.context.cookies())
            small = phone.new_page()
            small.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            small.on("pageerror", lambda e: problems.append(str(e)))
            small.goto(f"{fleet.url}/ui")
            small.wait_for_selector('tr[data-node="b1"][data-state="healthy"]')
            # One card per node on a phone: nothing wider than the screen.
            width = small.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"the page is {width} px wide on a 390 px phone"
            small.screenshot(path=str(SHOTS / "fleet-phone.png"), full_page=True)
        finally:
            browser.close()
    assert problems == []
    for shot in ("fleet-laptop.png", "drain-laptop.png", "fleet-phone.png"):
        data = (SHOTS / shot).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
