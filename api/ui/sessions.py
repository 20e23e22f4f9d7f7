"""Browser sessions for the status page: an opaque random id in an HttpOnly, SameSite=Strict
cookie stands for the identity that logged in with its token. The token itself is never put
in the page, a URL or the cookie. In memory, per API instance, bounded in count and age."""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass

from api.auth import Identity

COOKIE = "anycast_edge_ui"
MAX_AGE_S = 12 * 3600
MAX_SESSIONS = 1000


@dataclass(frozen=True, slots=True)
class Session:
    identity: Identity
    expires: float


class SessionTable:
    def __init__(self, max_age_s: float = MAX_AGE_S, limit: int = MAX_SESSIONS) -> None:
        self.max_age_s = max_age_s
        self.limit = limit
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def open(self, identity: Identity, now: float) -> str:
        sid = secrets.token_urlsafe(32)
        self._sessions[sid] = Session(identity, now + self.max_age_s)
        while len(self._sessions) > self.limit:
            self._sessions.popitem(last=False)  # the oldest goes first
        return sid

    def identify(self, sid: str | None, now: float) -> Identity | None:
        if not sid:
            return None
        session = self._sessions.get(sid)
        if session is None:
            return None
        if session.expires <= now:
            del self._sessions[sid]
            return None
        return session.identity

    def close(self, sid: str | None) -> None:
        if sid:
            self._sessions.pop(sid, None)
