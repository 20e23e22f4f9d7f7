"""Routes of the status page. Reads only: every route needs a viewer (or operator) identity,
from a bearer token or from the session cookie that `POST /ui/login` opens. Nothing here
writes desired state, so the cookie (SameSite=Strict, HttpOnly) can never be used to change
anything even if a page elsewhere tried."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from html import escape
from importlib import resources
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Cookie, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)

from api.auth import Identity
from api.routes.common import ApiError, Ctx
from api.store.base import StoreUnavailable
from api.ui.fleet import FleetHistory, fleet_model, fleet_summary
from api.ui.sessions import COOKIE, SessionTable

router = APIRouter(prefix="/ui", tags=["status page"], include_in_schema=False)

_STATIC = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
_FILES = {name: resources.files("api.ui").joinpath("static", name).read_bytes() for name in _STATIC}
_INDEX = resources.files("api.ui").joinpath("static", "index.html").read_text()
_LOGIN = resources.files("api.ui").joinpath("static", "login.html").read_text()
# Nothing but our own files: no inline script, no third-party origin, no framing.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
#: One server-sent-event connection lasts at most this long; the browser reconnects.
STREAM_MAX_S = 300.0
#: Even with no change, the page gets a fresh model this often (ages, the time series).
STREAM_TICK_S = 2.0


class _UiState:
    def __init__(self) -> None:
        self.sessions = SessionTable()
        self.history = FleetHistory()


def _state(request: Request) -> _UiState:
    state: _UiState | None = getattr(request.app.state, "ui", None)
    if state is None:
        state = request.app.state.ui = _UiState()
    return state


def _who(request: Request, ctx: Ctx, sid: str | None) -> Identity | None:
    header = request.headers.get("authorization")
    who = ctx.tokens.identify(header) if header else None
    if who is None and not header:
        who = _state(request).sessions.identify(sid, time.time())
    if who is None and not header:
        who = ctx.tokens.identify(None)  # anonymous read, where the API allows it
    return who


def _viewer(request: Request, ctx: Ctx, sid: str | None) -> Identity:
    who = _who(request, ctx, sid)
    if who is None:
        raise ApiError(
            401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"}
        )
    if not who.can_read():
        raise ApiError(403, f"role {who.role} may not read this")
    return who


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def _login_page(status: int, message: str = "") -> HTMLResponse:
    body = _LOGIN.replace("{{message}}", escape(message))
    headers = dict(_HEADERS)
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return HTMLResponse(body, status_code=status, headers=headers)


SessionCookie = Annotated[str | None, Cookie(alias=COOKIE, max_length=128)]


@router.get("", response_class=HTMLResponse)
async def page(request: Request, ctx: Ctx, sid: SessionCookie = None) -> Response:
    try:
        _viewer(request, ctx, sid)
    except ApiError as error:
        if _wants_html(request) and error.status == 401:
            return _login_page(401)
        raise
    return HTMLResponse(_INDEX, headers=_HEADERS)


@router.get("/login", response_class=HTMLResponse)
async def login_form() -> HTMLResponse:
    return _login_page(200)


@router.post("/login")
async def login(request: Request, ctx: Ctx) -> Response:
    form = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=4)
    token = (form.get("token") or [""])[0].strip()
    who = ctx.tokens.identify(f"Bearer {token}") if token else None
    if who is None or not who.can_read():
        return _login_page(401, "That token is not a viewer or operator token.")
    sid = _state(request).sessions.open(who, time.time())
    response = RedirectResponse("/ui", status_code=303, headers=_HEADERS)
    response.set_cookie(
        COOKIE,
        sid,
        max_age=int(_state(request).sessions.max_age_s),
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
async def logout(request: Request, sid: SessionCookie = None) -> Response:
    _state(request).sessions.close(sid)
    response = RedirectResponse("/ui/login", status_code=303, headers=_HEADERS)
    response.delete_cookie(COOKIE, path="/ui")
    return response


@router.get("/static/{name}")
async def static(name: str) -> Response:
    if name not in _STATIC:
        raise ApiError(404, f"no such file {name!r}", "name")
    return Response(_FILES[name], media_type=_STATIC[name], headers=_HEADERS)


async def _model(request: Request, ctx: Ctx) -> dict[str, Any]:
    snapshot = await ctx.snapshots.get()
    events = await ctx.store.list_events(50, None)
    now = time.time()
    history = _state(request).history
    history.record(snapshot, now)
    model = fleet_model(snapshot, events, history, now)
    model["summary"] = fleet_summary(model)
    return model


@router.get("/model")
async def model(request: Request, ctx: Ctx, sid: SessionCookie = None) -> JSONResponse:
    _viewer(request, ctx, sid)
    return JSONResponse(await _model(request, ctx), headers=_HEADERS)


@router.get("/stream")
async def stream(request: Request, ctx: Ctx, sid: SessionCookie = None) -> StreamingResponse:
    """Server-sent events: a `model` event at once, then on every change (and every
    STREAM_TICK_S); the connection ends after STREAM_MAX_S and the browser reconnects."""
    _viewer(request, ctx, sid)

    async def events() -> AsyncIterator[bytes]:
        yield b"retry: 1000\n\n"
        deadline = time.monotonic() + STREAM_MAX_S
        while time.monotonic() < deadline and not await request.is_disconnected():
            generation = ctx.store.changes.generation
            try:
                data = json.dumps(await _model(request, ctx), separators=(",", ":"))
                yield b"event: model\ndata: " + data.encode() + b"\n\n"
            except StoreUnavailable as exc:
                problem = json.dumps({"detail": f"state store unavailable: {exc}"})
                yield b"event: problem\ndata: " + problem.encode() + b"\n\n"
            await ctx.store.changes.wait(generation, STREAM_TICK_S)
            await asyncio.sleep(0.05)  # a burst of changes becomes one update

    headers = {**_HEADERS, "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
