"""The gateway wire: how a client in another process talks to `deadstop serve`.

docs/gateway.md is the document; this module is its one definition in code,
used by the daemon (supervisor/daemon/) and the clients (supervisor/client/,
examples/node/). It imports msgspec only.

Two sockets, both ZeroMQ:

* control (daemon ROUTER, client DEALER): requests and replies, matched by a
  request id the client chooses; also the daemon's pushes to a client that
  provides tools (`tool.call`, `tool.cancel`).
* events (daemon PUB, client SUB): one message per event, topic
  `s:<session key>\\0` (`s:\\0` for events of no session), with a
  per-session sequence number.

A request is three frames: `VERSION`, the request id (ASCII decimal, chosen
by the client, echoed in the reply), and the body: JSON of one request of
the control verb table (ipc/control.py) or of the daemon's own verbs below.
A reply is the same three frames; its body is `{"ok": true, "result": ...}`
or `{"ok": false, "fault": N, "name": ..., "message": ..., "detail": ...}`.
A push has the request id `0`.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

from . import control

VERSION = b"dsg1"
#: Bodies larger than this are refused (BAD_ARGUMENTS) without being parsed.
MAX_BODY_BYTES = 1 << 20
#: A frame larger than this never reaches the daemon: libzmq drops the connection that sent it
#: (its memory is the daemon's), so a client never waits for an answer to it.
MAX_FRAME_BYTES = 16 << 20
#: The request id of a message the daemon sends on its own (a push to a tool provider).
PUSH_ID = b"0"

#: A client names what it is in its ZeroMQ routing id, `<kind>/<name>/<random>`, so
#: the daemon can record who stopped a run (revoke source cli, gateway, console).
#: `console-read` is the web console acting for a read-only login: the daemon gives it the read
#: scope only, so its policy (not the console) refuses what such a login may not do.
CLIENT_KINDS = ("cli", "gateway", "console", "console-read")

#: Verbs answered first in every batch the daemon reads: they end or freeze runs,
#: and nothing slow may be in front of them.
URGENT_VERBS = frozenset({"sessions.stop", "sessions.kill", "sessions.stop_all", "sessions.pause", "runs.stop", "runs.kill"})


# -- the daemon's own verbs (beside the control table) -------------------------------------------
class ToolsProvide(control.Request, tag="tools.provide"):
    """This connection provides these tools: a run's call to one is forwarded here as a `tool.call` push."""

    names: list[str]


class ToolsResult(control.Request, tag="tools.result"):
    """The answer to one `tool.call` push: a JSON value, or an error message."""

    call_id: str
    ok: bool
    value: Any = None
    error: Union[str, None] = None


class DaemonInfo(control.Request, tag="daemon.info"):
    pass


class DaemonReload(control.Request, tag="daemon.reload"):
    """Read the configuration file again: agents and tools; live runs are not touched."""


class DaemonStop(control.Request, tag="daemon.stop"):
    """Stop every run (their reports journaled), then exit."""


class EventsPing(control.Request, tag="events.ping"):
    """Publish a `stream.ping` event carrying `token` on the session's topic (or the no-session one):
    a subscriber that sees its own token knows its subscription is in place."""

    token: str
    session: Union[str, None] = None


class ConsoleLogin(control.Request, tag="console.login"):
    """A one-time login link to the web console, for `scope` (read or write) within the caller's own scopes."""

    scope: str = "write"


class ConsoleLink(msgspec.Struct, kw_only=True):
    url: str  # the console's address
    login: str  # url + /login?token=...: valid once, for `expires_in` seconds
    scope: str
    expires_in: float


DAEMON_VERBS: dict[str, control.Verb] = {v.name: v for v in (
    control.Verb("tools.provide", ToolsProvide, list, control.Scope.WRITE, "provide tools to runs"),
    control.Verb("tools.result", ToolsResult, bool, control.Scope.WRITE, "answer a tool.call push"),
    control.Verb("daemon.info", DaemonInfo, dict, control.Scope.READ, "the daemon's health, config and endpoints"),
    control.Verb("daemon.reload", DaemonReload, dict, control.Scope.ADMIN, "re-read agents and tools"),
    control.Verb("daemon.stop", DaemonStop, bool, control.Scope.ADMIN, "stop every run, then exit"),
    control.Verb("events.ping", EventsPing, bool, control.Scope.READ, "mark the event stream for a new subscriber"),
    control.Verb("console.login", ConsoleLogin, ConsoleLink, control.Scope.READ,
                 "a one-time login link to the web console"),
)}

AnyDaemonRequest = Union[control.SessionsList, control.SessionsShow, control.SessionsSend, control.SessionsStop,
                         control.SessionsKill, control.SessionsStopAll, control.SessionsPause, control.SessionsResume,
                         control.SessionsCleanup, control.RunsList, control.RunsShow, control.RunsStop,
                         control.RunsKill, control.RunsEgress, control.AgentsList, control.HealthCheck, ToolsProvide,
                         ToolsResult, DaemonInfo, DaemonReload, DaemonStop, EventsPing, ConsoleLogin]

_decoder = msgspec.json.Decoder(AnyDaemonRequest)
_SERVED = sorted(set(control.VERBS) - {"sessions.spawn", "events.subscribe"} | set(DAEMON_VERBS))


def decode_request(body: bytes) -> Any:
    """A request of the daemon; ControlFault(UNKNOWN_VERB / BAD_ARGUMENTS) when it is not one."""
    if len(body) > MAX_BODY_BYTES:
        raise control.ControlFault(control.Fault.BAD_ARGUMENTS,
                                   f"request body of {len(body)} bytes is over the {MAX_BODY_BYTES}-byte cap")
    return control.decode_request(body, _decoder, _SERVED)


def verb_of(request: Any) -> control.Verb:
    name = type(request).__struct_config__.tag
    return control.VERBS.get(name) or DAEMON_VERBS[name]


# -- replies, pushes, events -------------------------------------------------------------------------------
def ok(result: Any) -> bytes:
    return msgspec.json.encode({"ok": True, "result": result})


def fault(exc: control.ControlFault) -> bytes:
    return msgspec.json.encode({"ok": False, "fault": int(exc.fault), "name": exc.fault.name,
                                "message": exc.args[0], "detail": exc.detail})


class ToolCall(msgspec.Struct, tag_field="push", tag="tool.call", kw_only=True):
    call_id: str
    run_id: str
    session: Union[str, None]
    tool: str
    args: list[Any] = []
    kwargs: dict[str, Any] = {}


class ToolCancel(msgspec.Struct, tag_field="push", tag="tool.cancel", kw_only=True):
    call_id: str
    reason: str


class EventMessage(msgspec.Struct, kw_only=True):
    seq: int  # per session, from 1; a gap means events were dropped (an `events.dropped` says how many)
    session: Union[str, None]
    run_id: str
    kind: str
    data: Any = None
    t_ns: int = 0
    generation: int = 0


def event_topic(session: str | None) -> bytes:
    return b"s:" + (session or "").encode() + b"\0"


class ConnectionFile(msgspec.Struct, kw_only=True):
    """What `deadstop serve` writes where clients look for it (docs/gateway.md §1)."""

    version: str = VERSION.decode()
    control: list[str]
    events: list[str]
    server_key: Union[str, None] = None  # CURVE public key (Z85), when it listens on tcp
    pid: int
    started: float  # wall-clock seconds
    state_dir: str
    supervisor_id: str
    #: the web console's address, and a one-time login link (replaced by a fresh one once used)
    console: Union[str, None] = None
    console_login: Union[str, None] = None
