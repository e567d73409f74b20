"""Clients of `deadstop serve`: `Client` (blocking) and `AsyncClient` (asyncio).

They speak the gateway wire (ipc/gateway.py, docs/gateway.md) and import
nothing of the engine: a command-line call pays for pyzmq and msgspec only.
Replies are the verb table's structs (ipc/control.py): `SessionInfo`,
`RunInfo`, `StopReply`, ...; a refusal raises `ControlFault` with its
numbered `Fault`.

    with Client() as c:                                  # finds the daemon (see locate.py)
        c.send("chat-42", "draft the reply", agent="researcher")
        reply = c.stop("chat-42")                        # StopReply: every run it ended, with its report
        assert reply.already_ended or all(r["survivors"] == 0 for r in reply.reports)

The asyncio client, with tool providing, is aio.py (kept apart so that a
command-line call does not import asyncio).
"""

from __future__ import annotations

import itertools
import os
import secrets
import threading
import time
from typing import Any, Iterator

import msgspec
import zmq

from ...ipc import control as wire
from ...ipc import gateway
from ...ipc.control import ControlFault, Fault
from .locate import NoDaemon, locate

#: Seconds a new event subscription may take to come up (SUB connects in the background).
SUBSCRIBE_WAIT = 10.0

#: A client secret certificate to use (tcp:// with CURVE), and the daemon's public key for a bare endpoint.
ENV_KEY, ENV_SERVER_KEY = "DEADSTOP_KEY", "DEADSTOP_SERVER_KEY"


def _routing_id(kind: str, name: str | None) -> bytes:
    if kind not in gateway.CLIENT_KINDS:
        raise ValueError(f"client kind must be one of {gateway.CLIENT_KINDS}, not {kind!r}")
    label = (name or f"pid{os.getpid()}").replace("/", "_")[:64]
    return f"{kind}/{label}/{secrets.token_hex(4)}".encode()


def _request(verb: str | wire.Request, args: dict[str, Any]) -> tuple[bytes, str]:
    if isinstance(verb, wire.Request):
        return msgspec.json.encode(verb), str(type(verb).__struct_config__.tag)
    return msgspec.json.encode({"verb": verb, **{k: v for k, v in args.items() if v is not None}}), verb


def _result(name: str, body: bytes) -> Any:
    reply = msgspec.json.decode(body)
    if not reply.get("ok"):
        code = reply.get("fault", int(Fault.FAILED))
        try:
            fault = Fault(code)
        except ValueError:
            fault = Fault.FAILED
        raise ControlFault(fault, reply.get("message", "refused"), detail=reply.get("detail"))
    result = reply.get("result")
    verb = wire.VERBS.get(name) or gateway.DAEMON_VERBS.get(name)
    if verb is None or verb.reply in (bool, dict, list) or result is None:
        return result
    return msgspec.convert(result, verb.reply)


class _Verbs:
    """The session and run verbs, over whatever `call` does (blocking or a coroutine)."""

    def call(self, verb: str | wire.Request, **args: Any) -> Any:
        raise NotImplementedError

    def sessions(self, *, active: bool | None = None, min_tokens: int | None = None, agent: str | None = None,
                 older_than: float | None = None) -> Any:
        return self.call("sessions.list", active=active, min_tokens=min_tokens, agent=agent, older_than=older_than)

    def session(self, key: str) -> Any:
        return self.call("sessions.show", key=key)

    def send(self, key: str, message: Any, *, agent: str | None = None, idempotency_key: str | None = None) -> Any:
        return self.call(wire.SessionsSend(key=key, message=message, agent=agent, idempotency_key=idempotency_key))

    def stop(self, key: str, grace: float | None = None, *, wait: bool = True) -> Any:
        return self.call(wire.SessionsStop(key=key, grace=grace, wait=wait))

    def kill(self, key: str) -> Any:
        return self.call("sessions.kill", key=key)

    def stop_all(self, grace: float | None = None, *, wait: bool = True, kill: bool = False) -> Any:
        """Every busy top-level session's tree, in one step (StopAllReply)."""
        return self.call(wire.SessionsStopAll(grace=grace, wait=wait, kill=kill))

    def pause(self, key: str) -> Any:
        return self.call("sessions.pause", key=key)

    def resume(self, key: str) -> Any:
        return self.call("sessions.resume", key=key)

    def cleanup(self, older_than: float = 3600, *, dry_run: bool = False) -> Any:
        return self.call(wire.SessionsCleanup(older_than=older_than, dry_run=dry_run))

    def runs(self, session: str | None = None, *, active: bool | None = None, limit: int = 1000) -> Any:
        return self.call("runs.list", session=session, active=active, limit=limit)

    def run(self, run_id: str) -> Any:
        return self.call("runs.show", run_id=run_id)

    def stop_run(self, run_id: str, grace: float | None = None) -> Any:
        return self.call("runs.stop", run_id=run_id, grace=grace)

    def kill_run(self, run_id: str) -> Any:
        return self.call("runs.kill", run_id=run_id)

    def agents(self) -> Any:
        return self.call("agents.list")

    def health(self) -> Any:
        return self.call("health")

    def info(self) -> Any:
        return self.call("daemon.info")

    def reload(self) -> Any:
        return self.call("daemon.reload")

    def shutdown(self) -> Any:
        return self.call("daemon.stop")


class _Transport:
    """Which endpoints to use, and the CURVE keys for tcp:// ones.

    Without a key: the first ipc:// endpoints (the owner-only ones). With a key
    (a client secret certificate from `deadstop keys generate`): the tcp://
    ones, authenticated against the daemon's public key (from its connection
    file, or `server_key` / $DEADSTOP_SERVER_KEY for a bare endpoint).
    """

    def __init__(self, where: gateway.ConnectionFile, key: str | None, server_key: str | None):
        key = key or os.environ.get(ENV_KEY)
        self.curve: tuple[bytes, bytes, bytes] | None = None
        if key:
            import zmq.auth

            public, secret = zmq.auth.load_certificate(key)
            if secret is None:
                raise ControlFault(Fault.BAD_ARGUMENTS, f"{key} holds no secret key (that is a public certificate)")
            server = server_key or where.server_key or os.environ.get(ENV_SERVER_KEY)
            if not server:
                raise ControlFault(Fault.BAD_ARGUMENTS, "a tcp:// daemon needs its public key: in its connection "
                                                        f"file, or server_key= / ${ENV_SERVER_KEY}")
            self.curve = (public, secret, server.encode())
            pick = [e for e in where.control if e.startswith("tcp://")], [e for e in where.events if e.startswith("tcp://")]
        else:
            pick = [e for e in where.control if not e.startswith("tcp://")], [e for e in where.events if not e.startswith("tcp://")]
        if not pick[0]:
            raise NoDaemon(f"the daemon at {where.control} has no {'tcp' if key else 'ipc'}:// endpoint for this "
                           f"client{' (pass key= for tcp)' if not key else ''}")
        self.control, self.events = pick[0][0], pick[1]

    def secure(self, sock: zmq.Socket[Any]) -> None:
        if self.curve is not None:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = self.curve


class Client(_Verbs):
    """Blocking client. `timeout` (seconds, None: wait for ever) bounds each call: TIMED_OUT after it.
    `key`: a client secret certificate, to reach the daemon over tcp:// with CURVE."""

    def __init__(self, daemon: str | None = None, *, kind: str = "gateway", name: str | None = None,
                 timeout: float | None = 60.0, key: str | None = None, server_key: str | None = None):
        self.where = locate(daemon)
        self._transport = _Transport(self.where, key, server_key)
        self.timeout = timeout
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTING_ID, _routing_id(kind, name))
        self._transport.secure(self._sock)
        self._sock.connect(self._transport.control)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def call(self, verb: str | wire.Request, **args: Any) -> Any:
        """One verb: its reply struct, or ControlFault."""
        body, name = _request(verb, args)
        with self._lock:
            req_id = str(next(self._ids)).encode()
            self._sock.send_multipart([gateway.VERSION, req_id, body])
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            while True:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not self._sock.poll(None if wait is None else int(wait * 1000) + 1):
                    raise ControlFault(Fault.TIMED_OUT, f"{name}: no reply from the daemon at "
                                                        f"{self._transport.control} within {self.timeout:g} s")
                frames = self._sock.recv_multipart()
                if len(frames) == 3 and frames[1] == req_id:
                    return _result(name, frames[2])
                # a reply to an earlier call that timed out: dropped

    def events(self, session: str | None = None, *, idle_timeout: float | None = None) -> "EventStream":
        """Follow the event stream (of one session, or all). Subscribed when this returns, so nothing
        published afterwards is missed; iterate it, and close it (or use it in a with block).
        `idle_timeout`: TIMED_OUT when no event comes for that long."""
        return EventStream(self._ctx, self._transport, session, idle_timeout, self)

    def close(self) -> None:
        self._sock.close()
        self._ctx.term()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def is_mark(event: gateway.EventMessage, token: str) -> bool:
    """Is this the `stream.ping` a new subscriber asked for with `token` (docs/gateway.md §7)?"""
    return event.kind == "stream.ping" and isinstance(event.data, dict) and event.data.get("token") == token


class EventStream:
    """A subscription to the daemon's events; iterating yields EventMessage (seq per session)."""

    def __init__(self, ctx: zmq.Context[Any], transport: _Transport, session: str | None,
                 idle_timeout: float | None, client: "Client"):
        self._sub = ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, gateway.event_topic(session) if session is not None else b"s:")
        transport.secure(self._sub)
        for endpoint in transport.events:
            self._sub.connect(endpoint)
        self._idle = idle_timeout
        self._decoder = msgspec.json.Decoder(gateway.EventMessage)
        self._ready(client, session)

    def _ready(self, client: "Client", session: str | None) -> None:
        """Return only once the subscription is in place: ask the daemon to publish a ping with a
        token of ours (again, until it comes through) and drop what precedes it."""
        token = secrets.token_hex(8)
        deadline = time.monotonic() + SUBSCRIBE_WAIT
        while time.monotonic() < deadline:
            client.call(gateway.EventsPing(token=token, session=session))
            while self._sub.poll(50):
                _topic, body = self._sub.recv_multipart()
                if is_mark(self._decoder.decode(body), token):
                    return
        raise ControlFault(Fault.TIMED_OUT, f"the event stream did not come up within {SUBSCRIBE_WAIT:g} s")

    def __iter__(self) -> Iterator[gateway.EventMessage]:
        return self

    def __next__(self) -> gateway.EventMessage:
        while True:
            if self._idle is not None and not self._sub.poll(int(self._idle * 1000)):
                raise ControlFault(Fault.TIMED_OUT, f"no event within {self._idle:g} s")
            _topic, body = self._sub.recv_multipart()
            event = self._decoder.decode(body)
            if event.kind != "stream.ping":  # another subscriber's marker
                return event

    @property
    def socket(self) -> zmq.Socket[Any]:
        """The SUB socket, for a caller that polls many streams at once (RoutedClient.events)."""
        return self._sub

    def take(self) -> gateway.EventMessage | None:
        """The next event if one is waiting, without blocking (None: nothing yet, or only another
        subscriber's marker)."""
        try:
            _topic, body = self._sub.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None
        event = self._decoder.decode(body)
        return None if event.kind == "stream.ping" else event

    def close(self) -> None:
        self._sub.close()

    def __enter__(self) -> "EventStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["Client", "ControlFault", "EventStream", "Fault", "NoDaemon"]
