"""Who may use the console: one-time login tokens, then a session cookie with its CSRF token.

A login token is a capability handed out by the daemon (the connection file,
`deadstop console`, the `console.login` verb) to someone who could already
reach its control socket. It is good once: redeeming it opens a web session
(an HttpOnly, SameSite=Strict cookie) and the token is gone, so a link seen
later in a shell history or a proxy log opens nothing. Each web session has
its own CSRF token, which every state-changing request must carry in a
header; a cross-site page can neither read it nor make the browser send the
cookie.

Tokens are minted on the daemon's loop and redeemed on the console's, so
the books are locked.
"""

from __future__ import annotations

import dataclasses
import hmac
import secrets
import threading
import time
from typing import Callable

#: A minted login link is good for this long (the connection file's own token has no expiry: it is
#: replaced once used, and the file is owner-only).
LOGIN_TTL = 300.0
#: A web session unused for this long is closed.
SESSION_IDLE = 12 * 3600.0
#: Web sessions kept at most (the oldest closed first): memory bounded whatever logs in.
MAX_SESSIONS = 1024

SCOPES = ("read", "write")


@dataclasses.dataclass
class _Token:
    scope: str
    expires: float | None
    on_use: Callable[[], None] | None


@dataclasses.dataclass
class WebSession:
    sid: str
    scope: str  # read | write
    csrf: str
    last_seen: float

    @property
    def may_act(self) -> bool:
        return self.scope == "write"


class Logins:
    """One-time login tokens and the web sessions they opened."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, _Token] = {}
        self._sessions: dict[str, WebSession] = {}

    def mint(self, scope: str, ttl: float | None = LOGIN_TTL, on_use: Callable[[], None] | None = None) -> str:
        if scope not in SCOPES:
            raise ValueError(f"a console login is for scope read or write, not {scope!r}")
        token = secrets.token_urlsafe(24)
        with self._lock:
            now = time.monotonic()
            self._tokens = {t: v for t, v in self._tokens.items() if v.expires is None or v.expires > now}
            self._tokens[token] = _Token(scope, None if ttl is None else now + ttl, on_use)
        return token

    def redeem(self, token: str) -> WebSession | None:
        """The web session a valid token opens (the token is then spent), or None."""
        with self._lock:
            entry = None
            for known in list(self._tokens):  # compared in constant time, each
                if hmac.compare_digest(known, token):
                    entry = self._tokens.pop(known)
            if entry is None or (entry.expires is not None and entry.expires < time.monotonic()):
                return None
            session = WebSession(secrets.token_urlsafe(24), entry.scope, secrets.token_urlsafe(24), time.monotonic())
            self._sessions[session.sid] = session
            while len(self._sessions) > MAX_SESSIONS:
                del self._sessions[next(iter(self._sessions))]
        if entry.on_use is not None:
            entry.on_use()
        return session

    def session(self, sid: str | None) -> WebSession | None:
        if not sid:
            return None
        with self._lock:
            session = self._sessions.get(sid)
            now = time.monotonic()
            if session is None or now - session.last_seen > SESSION_IDLE:
                self._sessions.pop(sid or "", None)
                return None
            session.last_seen = now
            return session

    def close(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(sid, None)


def csrf_ok(session: WebSession, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(session.csrf, presented or "")
