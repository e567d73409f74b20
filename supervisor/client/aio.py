"""AsyncClient: the asyncio client of `deadstop serve`, and the way a gateway provides tools.

    async with AsyncClient() as c:
        await c.provide({"send_email": send_email})   # runs' calls to it arrive here
        await c.send("chat-42", "draft the reply", agent="researcher")

Many calls may be in flight on one connection. A provided tool's call is run
here (a coroutine function on the loop, a plain function in a thread) and
its result sent back; at the run's revoke the daemon pushes a cancel, the
call's task is cancelled and nothing goes back (a late result would be
refused anyway).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import secrets
from typing import Any, AsyncIterator, Callable

import msgspec
import zmq

from ...ipc import control as wire
from ...ipc import gateway
from ...ipc.control import ControlFault, Fault
from .client import SUBSCRIBE_WAIT, _request, _result, _routing_id, _Transport, _Verbs, is_mark
from .locate import locate

log = logging.getLogger("deadstop.client")


class AsyncClient(_Verbs):
    """asyncio client: many calls in flight on one connection, tool providing, the event stream.

    Use as ``async with AsyncClient() as c:``; every verb is a coroutine.
    """

    def __init__(self, daemon: "str | gateway.ConnectionFile | None" = None, *, kind: str = "gateway", name: str | None = None,
                 timeout: float | None = 60.0, key: str | None = None, server_key: str | None = None):
        self._daemon, self._kind, self._name, self.timeout = daemon, kind, name, timeout
        self._key, self._server_key = key, server_key
        self._pending: dict[bytes, tuple[str, asyncio.Future[Any]]] = {}
        self._tools: dict[str, Callable[..., Any]] = {}
        self._calls: dict[str, asyncio.Task[None]] = {}
        self._ids = itertools.count(1)

    async def open(self) -> "AsyncClient":
        import zmq.asyncio

        self.where = self._daemon if isinstance(self._daemon, gateway.ConnectionFile) else locate(self._daemon)
        self._transport = _Transport(self.where, self._key, self._server_key)
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTING_ID, _routing_id(self._kind, self._name))
        self._transport.secure(self._sock)
        self._sock.connect(self._transport.control)
        self._reader = asyncio.get_running_loop().create_task(self._read(), name="deadstop-client-reader")
        return self

    async def __aenter__(self) -> "AsyncClient":
        return await self.open()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        self._reader.cancel()
        for task in list(self._calls.values()):
            task.cancel()
        for _name, fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ControlFault(Fault.UNREACHABLE, "client closed"))
        self._sock.close()
        self._ctx.term()

    async def call(self, verb: str | wire.Request, **args: Any) -> Any:
        body, name = _request(verb, args)
        req_id = str(next(self._ids)).encode()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = (name, fut)
        try:
            await self._sock.send_multipart([gateway.VERSION, req_id, body])
            return await asyncio.wait_for(asyncio.shield(fut), self.timeout)
        except asyncio.TimeoutError:
            raise ControlFault(Fault.TIMED_OUT, f"{name}: no reply within {self.timeout:g} s") from None
        finally:
            self._pending.pop(req_id, None)

    async def _read(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            if len(frames) != 3 or frames[0] != gateway.VERSION:
                continue
            if frames[1] == gateway.PUSH_ID:
                try:
                    self._push(msgspec.json.decode(frames[2]))
                except (TypeError, ValueError):  # msgspec's decode and validation errors are ValueErrors
                    log.warning("deadstop client: a push it cannot read was ignored")
                continue
            entry = self._pending.get(frames[1])
            if entry is None or entry[1].done():
                continue
            name, fut = entry
            try:
                fut.set_result(_result(name, frames[2]))
            except Exception as exc:  # a fault, or a reply this client cannot read: that call fails, not the reader
                fut.set_exception(exc)

    # -- providing tools ------------------------------------------------------------------------------
    async def provide(self, tools: dict[str, Callable[..., Any]]) -> list[str]:
        """Provide these tools to the daemon's runs (sync functions run in a thread, coroutines here)."""
        self._tools.update(tools)
        return await self.call(gateway.ToolsProvide(names=sorted(tools)))

    def _push(self, push: dict[str, Any]) -> None:
        kind = push.get("push")
        if kind == "tool.call":
            call = msgspec.convert(push, gateway.ToolCall)
            self._calls[call.call_id] = asyncio.get_running_loop().create_task(self._serve(call))
        elif kind == "tool.cancel":
            task = self._calls.pop(push.get("call_id", ""), None)
            if task is not None:
                task.cancel()

    async def _serve(self, call: gateway.ToolCall) -> None:
        fn = self._tools.get(call.tool)
        try:
            if fn is None:
                raise LookupError(f"this client provides no tool {call.tool!r}")
            if inspect.iscoroutinefunction(fn):
                value = await fn(*call.args, **call.kwargs)
            else:
                value = await asyncio.to_thread(fn, *call.args, **call.kwargs)
            answer = gateway.ToolsResult(call_id=call.call_id, ok=True, value=value)
        except asyncio.CancelledError:
            return  # the daemon cancelled it (the run was revoked): nothing goes back
        except Exception as exc:
            answer = gateway.ToolsResult(call_id=call.call_id, ok=False, error=f"{type(exc).__name__}: {exc}")
        finally:
            self._calls.pop(call.call_id, None)
        try:
            await self.call(answer)
        except ControlFault:
            pass  # refused as late: the run was revoked meanwhile

    # -- events -------------------------------------------------------------------------------------
    async def subscribe(self, session: str | None = None) -> "AsyncEventStream":
        """The event stream (all sessions, or one), confirmed in place: every event after this returns is in it."""
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, gateway.event_topic(session) if session is not None else b"s:")
        self._transport.secure(sub)
        for endpoint in self._transport.events:
            sub.connect(endpoint)
        decoder = msgspec.json.Decoder(gateway.EventMessage)
        token = secrets.token_hex(8)
        try:
            # Subscribed before the first event is handed out: a ping of ours must come through first.
            deadline = asyncio.get_running_loop().time() + SUBSCRIBE_WAIT
            while True:
                if asyncio.get_running_loop().time() > deadline:
                    raise ControlFault(Fault.TIMED_OUT, f"the event stream did not come up within {SUBSCRIBE_WAIT:g} s")
                await self.call(gateway.EventsPing(token=token, session=session))
                while await sub.poll(50):
                    _topic, body = await sub.recv_multipart()
                    if is_mark(decoder.decode(body), token):
                        return AsyncEventStream(sub, decoder)
        except BaseException:
            sub.close()
            raise

    async def events(self, session: str | None = None) -> AsyncIterator[gateway.EventMessage]:
        stream = await self.subscribe(session)
        try:
            async for event in stream:
                yield event
        finally:
            await stream.aclose()


class AsyncEventStream:
    """A confirmed subscription: iterate it for events; aclose() when done."""

    def __init__(self, sub: Any, decoder: "msgspec.json.Decoder[gateway.EventMessage]"):
        self._sub, self._decoder = sub, decoder

    def __aiter__(self) -> "AsyncEventStream":
        return self

    async def __anext__(self) -> gateway.EventMessage:
        while True:
            _topic, body = await self._sub.recv_multipart()
            event = self._decoder.decode(body)
            if event.kind != "stream.ping":  # another subscriber's marker
                return event

    async def aclose(self) -> None:
        self._sub.close()
