"""The console's HTTP surface (aiohttp): pages, their JSON reads, the verbs its buttons send, the live feed.

Every route but /login needs a web session (401 without one); every POST
also needs the session's CSRF token in `X-CSRF-Token` and, when the browser
says where it comes from, this origin (403 otherwise). A button is one
control verb, forwarded as it is to the daemon through the client for the
login's scope: a read-only login's client holds the read scope only, so the
daemon's policy refuses its stop (FORBIDDEN, 403 here) and the console
decides nothing itself. Replies are the daemon's own, passed through.
"""

from __future__ import annotations

import asyncio
import html
import json
import os
import string
from typing import Any, Awaitable, Callable

import msgspec
from aiohttp import web

from ...ipc import control as wire
from ...ipc.control import ControlFault, Fault
from ..client.aio import AsyncClient
from .auth import Logins, WebSession, csrf_ok
from .feed import Feed

COOKIE = "deadstop_console"
HERE = os.path.dirname(os.path.abspath(__file__))
STATIC = {name: os.path.join(HERE, "static", name) for name in os.listdir(os.path.join(HERE, "static"))}
_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}

#: The verbs a button may send: they end, freeze or thaw runs of a session. Nothing else is forwarded.
ACTION_VERBS = ("sessions.stop", "sessions.kill", "sessions.pause", "sessions.resume", "runs.stop", "runs.kill")

#: HTTP status of each fault (the body carries the fault itself).
_STATUS = {Fault.BAD_ARGUMENTS: 400, Fault.UNKNOWN_VERB: 400, Fault.NO_SUCH_SESSION: 404, Fault.NO_SUCH_RUN: 404,
           Fault.NO_SUCH_AGENT: 404, Fault.FORBIDDEN: 403, Fault.POLICY_DENIED: 403, Fault.NOT_RUNNING: 409,
           Fault.INVALID_TARGET: 409, Fault.SHUTTING_DOWN: 503, Fault.UNREACHABLE: 502, Fault.TIMED_OUT: 504}

_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ConsoleState:
    """What the handlers share: the logins, the feed, a client per scope."""

    def __init__(self, logins: Logins, feed: Feed, clients: dict[str, AsyncClient], *, secure: bool):
        self.logins, self.feed, self.clients, self.secure = logins, feed, clients, secure
        self.closing = asyncio.Event()


def _template(name: str) -> string.Template:
    with open(os.path.join(HERE, "templates", name), encoding="utf-8") as f:
        return string.Template(f.read())


_PAGES = {name: _template(f"{name}.html") for name in ("sessions", "session", "login")}


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json")


def _fault(exc: ControlFault) -> web.Response:
    body = {"ok": False, "fault": int(exc.fault), "name": exc.fault.name, "message": exc.args[0], "detail": exc.detail}
    return _json(body, _STATUS.get(exc.fault, 500))


def _refused(request: web.Request, status: int, message: str) -> web.Response:
    if request.path.startswith("/api/"):
        return _json({"ok": False, "status": status, "message": message}, status)
    page = _PAGES["login"].substitute(message=html.escape(message))
    return web.Response(text=page, status=status, content_type="text/html")


def _same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # no Origin (a script, an old browser): the CSRF token alone decides
    return origin.split("://", 1)[-1] == request.host


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    state: ConsoleState = request.app["state"]
    if request.path == "/login":
        response = await handler(request)
    else:
        session = state.logins.session(request.cookies.get(COOKIE))
        if session is None:
            response = _refused(request, 401, "Not logged in. Run `deadstop console` for a login link.")
        elif request.method not in ("GET", "HEAD") and not (
                csrf_ok(session, request.headers.get("X-CSRF-Token")) and _same_origin(request)):
            response = _refused(request, 403, "This request lacks the page's CSRF token (or comes from another site).")
        else:
            request["web"] = session
            response = await handler(request)
    for name, value in _HEADERS.items():
        response.headers.setdefault(name, value)
    return response


# -- login ----------------------------------------------------------------------------------------------
async def login(request: web.Request) -> web.StreamResponse:
    state: ConsoleState = request.app["state"]
    session = state.logins.redeem(request.query.get("token", ""))
    if session is None:
        return _refused(request, 401, "This login link was used already or has expired. "
                                      "Run `deadstop console` for a new one.")
    response = web.Response(status=303, headers={"Location": "/"})
    response.set_cookie(COOKIE, session.sid, httponly=True, samesite="Strict", secure=state.secure, path="/")
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    state: ConsoleState = request.app["state"]
    state.logins.close(request["web"].sid)
    response = _json({"ok": True})
    response.del_cookie(COOKIE, path="/")
    return response


# -- pages --------------------------------------------------------------------------------------------------
def _page(request: web.Request, name: str, **values: str) -> web.Response:
    web_session: WebSession = request["web"]
    text = _PAGES[name].substitute(csrf=html.escape(web_session.csrf), scope=web_session.scope,
                                   **{k: html.escape(v) for k, v in values.items()})
    return web.Response(text=text, content_type="text/html")


async def sessions_page(request: web.Request) -> web.StreamResponse:
    return _page(request, "sessions")


async def session_page(request: web.Request) -> web.StreamResponse:
    return _page(request, "session", key=request.query.get("key", ""))


async def static(request: web.Request) -> web.StreamResponse:
    path = STATIC.get(request.match_info["name"])
    if path is None:
        raise web.HTTPNotFound()
    with open(path, "rb") as f:
        body = f.read()
    return web.Response(body=body, content_type=_TYPES.get(os.path.splitext(path)[1], "application/octet-stream"))


# -- reads --------------------------------------------------------------------------------------------------
def _client(request: web.Request) -> AsyncClient:
    state: ConsoleState = request.app["state"]
    return state.clients[request["web"].scope]


async def api_sessions(request: web.Request) -> web.StreamResponse:
    state: ConsoleState = request.app["state"]
    return _json({"scope": request["web"].scope, "rows": await state.feed.current_rows()})


async def api_session(request: web.Request) -> web.StreamResponse:
    """One session, its runs (with their reports) and its sub-agent tree, read fresh from the daemon."""
    client = _client(request)
    key = request.query.get("key", "")
    try:
        info = await client.session(key)
        runs, everyone = await asyncio.gather(client.runs(key), client.sessions())
    except ControlFault as exc:
        return _fault(exc)
    by_key = {s.key: s for s in everyone}
    tree, stack = [], [(info.key, 0)]
    while stack:
        k, depth = stack.pop()
        s = by_key.get(k)
        if s is None:
            continue
        tree.append({**msgspec.to_builtins(s), "depth": depth})
        stack.extend((c, depth + 1) for c in reversed(s.children))
    return _json({"scope": request["web"].scope, "session": info, "runs": runs, "tree": tree})


def _int(request: web.Request, name: str, default: int) -> int:
    try:
        return int(request.query.get(name, default))
    except ValueError:
        raise ControlFault(Fault.BAD_ARGUMENTS, f"{name} must be an integer") from None


async def api_egress(request: web.Request) -> web.StreamResponse:
    try:
        reply = await _client(request).call(wire.RunsEgress(run_id=request.query.get("run", ""),
                                                            offset=_int(request, "offset", 0),
                                                            limit=_int(request, "limit", 50)))
    except ControlFault as exc:
        return _fault(exc)
    return _json(reply)


async def api_usage(request: web.Request) -> web.StreamResponse:
    state: ConsoleState = request.app["state"]
    run_id = request.query.get("run", "")
    try:
        await _client(request).run(run_id)  # the caller may see this run, or 404
    except ControlFault as exc:
        return _fault(exc)
    return _json({"run_id": run_id, "points": list(state.feed.series.get(run_id, ()))})


# -- the live feed ------------------------------------------------------------------------------------------
async def api_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: a snapshot of every row, then each change as it happens."""
    state: ConsoleState = request.app["state"]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    queue = state.feed.listen()  # before the snapshot: a change in between arrives twice, never not at all
    try:
        try:
            await asyncio.wait_for(state.feed.ready.wait(), 30)
        except asyncio.TimeoutError:
            return response
        await response.write(_sse("snapshot", state.feed.public_rows()))
        sid = request["web"].sid
        while not state.closing.is_set():
            try:
                item = await asyncio.wait_for(queue.get(), 15)
            except asyncio.TimeoutError:
                item = ("", None)
            if item is None or state.logins.session(sid) is None:
                break  # dropped for falling behind (the page reconnects and gets a snapshot), or logged out
            # a comment line every 15 s keeps proxies and idle timers from closing a quiet stream
            await response.write(_sse(*item) if item[0] else b": still here\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        state.feed.leave(queue)
    return response


def _sse(kind: str, data: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"


# -- verbs --------------------------------------------------------------------------------------------------
async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json() if request.can_read_body else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ControlFault(Fault.BAD_ARGUMENTS, "the request body is not JSON") from None
    if not isinstance(data, dict):
        raise ControlFault(Fault.BAD_ARGUMENTS, "the request body must be a JSON object of the verb's arguments")
    return data


async def api_call(request: web.Request) -> web.StreamResponse:
    """POST /api/call/<verb> with the verb's arguments: the daemon's reply, as it came."""
    verb = request.match_info["verb"]
    try:
        if verb not in ACTION_VERBS:
            raise ControlFault(Fault.UNKNOWN_VERB, f"the console sends {', '.join(ACTION_VERBS)}, not {verb!r}")
        result = await _client(request).call(wire.request_from(verb, await _body(request)))
    except ControlFault as exc:
        return _fault(exc)
    return _json({"ok": True, "verb": verb, "result": result})


async def api_stop_all(request: web.Request) -> web.StreamResponse:
    """sessions.stop_all: every busy top-level session's tree in one step; the reply split per session."""
    try:
        args = await _body(request)
        reply = await _client(request).call(wire.SessionsStopAll(grace=args.get("grace")))
    except ControlFault as exc:
        return _fault(exc)
    by_run = {r["run_id"]: r for r in reply.reports}
    results = [{"key": key, "ok": True, "result": {"key": key, "already_ended": not ids,
                                                   "reports": [by_run[i] for i in ids if i in by_run]}}
               for key, ids in reply.trees.items()]
    return _json({"ok": True, "verb": "sessions.stop_all", "results": results})


def build(state: ConsoleState) -> web.Application:
    app = web.Application(middlewares=[_guard], client_max_size=64 * 1024)
    app["state"] = state
    app.add_routes([
        web.get("/login", login), web.post("/logout", logout),
        web.get("/", sessions_page), web.get("/session", session_page),
        web.get("/static/{name}", static),
        web.get("/api/sessions", api_sessions), web.get("/api/session", api_session),
        web.get("/api/egress", api_egress), web.get("/api/usage", api_usage), web.get("/api/events", api_events),
        web.post("/api/call/{verb}", api_call), web.post("/api/stop-all", api_stop_all),
    ])
    return app
