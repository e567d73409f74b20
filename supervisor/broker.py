"""The egress broker: one ZeroMQ ROUTER socket, every run's only way out.

Each request is checked cheapest first (size, frame count, version,
credential, revocation, generation, schema, tool allow-list) and every
refusal is answered with a typed error and journaled; hostile input never
raises out of the receive loop. Nothing from a worker is ever unpickled:
bodies are JSON decoded by msgspec into fixed types.

The socket is read with plain non-blocking receives from an asyncio reader
callback, in batches, yielding to the event loop between batches so that a
tool-call flood cannot delay a revoke queued behind it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import time
from typing import Any, Protocol

import msgspec
import zmq

from ipc import framing, schema
from ipc.errors import ErrorCode
from supervisor.channel import Channel, GenerationCell, RevokeRecord
from supervisor.journal import Journal
from supervisor.tools import PolicyDenied, Tool, ToolCancelled, ToolContext, ToolRegistry

log = logging.getLogger("deadstop.broker")

BATCH = 64
_id_only = msgspec.json.Decoder(type=dict)


class BrokerSink(Protocol):
    """What the broker hands upwards: events, final results, liveness questions."""

    def on_event(self, run_id: str, kind: str, data: Any, t_ns: int) -> None: ...

    def on_result(self, run_id: str, value: Any) -> None: ...

    def on_failure(self, run_id: str, type_name: str, message: str, traceback: str) -> None: ...

    def on_usage(self, run_id: str, tool: str, usage: dict[str, float]) -> None: ...

    def on_quota(self, run_id: str, limit: str) -> None: ...

    def inbox_of(self, run_id: str) -> Any: ...

    def state_of(self, run_id: str) -> str: ...


def _verb(req: Any) -> str:
    return type(req).__struct_config__.tag if hasattr(type(req), "__struct_config__") else "?"


def _name(req: Any) -> str | None:
    """What a request names, as the journal files it: a call's tool, an event's kind."""
    return getattr(req, "tool", None) or getattr(req, "kind", None)


def _guess_id(body: bytes) -> int:
    """Best-effort request id for an authenticated request whose body is refused."""
    try:
        value = _id_only.decode(body).get("id", 0)
    except Exception:
        return 0
    return value if type(value) is int and 0 <= value <= schema.MAX_ID else 0


class Broker:
    def __init__(self, loop: asyncio.AbstractEventLoop, address: str, journal: Journal,
                 tools: ToolRegistry, sink: BrokerSink, *, max_request_bytes: int = framing.MAX_REQUEST_BYTES,
                 tool_threads: int = 32):
        self.loop = loop
        self.address = address
        self.journal = journal
        self.tools = tools
        self.sink = sink
        self.max_request_bytes = max_request_bytes
        self.channels: dict[str, Channel] = {}
        self.executor = concurrent.futures.ThreadPoolExecutor(tool_threads, thread_name_prefix="deadstop-tool")
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max(framing.HARD_FRAME_BYTES, 2 * max_request_bytes))
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.bind(address)
        self._fd = self.sock.getsockopt(zmq.FD)
        self._drain_scheduled = False
        self._call_seq = itertools.count()
        loop.add_reader(self._fd, self._drain)

    # -- channels --------------------------------------------------------------
    def open_channel(self, run_id: str, credential: bytes, allowed: frozenset[str], generation: int = 0,
                     current: GenerationCell | None = None, max_calls: int | None = None) -> Channel:
        chan = Channel(run_id, credential, allowed, generation, current, max_calls)
        self.channels[run_id] = chan
        return chan

    def revoke(self, chan: Channel, source: str, reason: str, *, commit: bool = True) -> RevokeRecord:
        """Revoke, journal, and cancel in-flight handlers; idempotent.

        The journal row is committed before returning unless the caller
        revokes several runs at once and commits them together (before any
        signal: G1 still holds).
        """
        rec, first = chan.revoke(source, reason)
        if not first:
            return rec
        self.journal.revoked(chan.run_id, rec.at, source, reason, commit=commit)
        for handle, ctx in list(chan.in_flight.values()):
            ctx.cancelled = True
            handle.cancel()  # an async handler stops at its next await; a queued sync one never starts
            chan.cancelled_at_revoke += 1
        held, chan.held = chan.held, []
        now = time.monotonic_ns()
        for ident, req, _arrived in held:  # held while paused: refused now, never dispatched
            self._refuse(ident, chan, chan.run_id, req.id, _verb(req), _name(req), ErrorCode.REVOKED,
                         f"run {chan.run_id} is revoked ({chan.revoked_reason()})", now)
        return rec

    # -- pause ---------------------------------------------------------------------
    def hold(self, chan: Channel) -> None:
        """From now on requests of the run queue up instead of being dispatched."""
        chan.paused = True

    def release(self, chan: Channel) -> None:
        """Dispatch what was held, in arrival order, re-checking each request."""
        chan.paused = False
        held, chan.held = chan.held, []
        for ident, req, _arrived in held:  # journaled at release time, in arrival order
            t = time.monotonic_ns()
            if chan.revocation is not None:
                self._refuse(ident, chan, chan.run_id, req.id, _verb(req), _name(req),
                             ErrorCode.REVOKED, f"run {chan.run_id} is revoked ({chan.revoked_reason()})", t)
            elif chan.stale:
                self._refuse(ident, chan, chan.run_id, req.id, _verb(req), _name(req),
                             ErrorCode.STALE_GENERATION,
                             f"generation {chan.generation} is not current ({chan.current.value})", t)
            else:
                self._dispatch(ident, chan, req, t)

    # -- receive loop ------------------------------------------------------------
    def _drain(self) -> None:
        self._drain_scheduled = False
        sock = self.sock
        for _ in range(BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return  # closed under us
            try:
                self._handle(frames)
            except Exception as exc:  # a bug must never take the broker down
                log.exception("egress: unexpected error handling a request")
                try:
                    self.journal.egress(None, time.monotonic_ns(), 0, "?", None, "refused", int(ErrorCode.INTERNAL),
                                        f"{type(exc).__name__}: {exc}"[:500])
                except Exception:
                    pass
                self._reply_error(frames[0], 0, ErrorCode.INTERNAL, "internal error; the request had no effect")
        self._schedule_drain()  # batch full: let other callbacks (a revoke) run first

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self.loop.call_soon(self._drain)

    def _send(self, frames: list[bytes]) -> None:
        try:
            framing.send_frames(self.sock, frames)
        except zmq.ZMQError:
            return  # peer gone or queue full: the run is dead or flooding
        # The ZeroMQ fd is edge-triggered; a send can swallow the edge of an
        # arrival, so look for pending input after every send.
        if self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._schedule_drain()

    def _reply(self, ident: bytes, reply: schema.Reply) -> None:
        self._send([ident, framing.VERSION, schema.encode(reply)])

    def _reply_error(self, ident: bytes, req_id: int, code: ErrorCode, message: str, reason: str | None = None) -> None:
        self._reply(ident, schema.Reply(id=req_id, ok=False,
                                        error=schema.ErrorBody(int(code), code.name, message, reason)))

    def _refuse(self, ident: bytes, chan: Channel | None, run_id: str | None, req_id: int, verb: str,
                tool: str | None, code: ErrorCode, message: str, t_ns: int) -> None:
        reason = chan.revoked_reason() if chan is not None else None
        if chan is not None and chan.revocation is not None:
            chan.refused_after_revoke += 1
        self.journal.egress(run_id, t_ns, req_id, verb, tool, "refused", int(code), message)
        self._reply_error(ident, req_id, code, message, reason)

    def _handle(self, frames: list[bytes]) -> None:
        t = time.monotonic_ns()
        ident = frames[0]
        # Refusals before authentication answer with id 0 and never parse the
        # body: an unauthenticated peer gets no JSON decoding for free.
        size = sum(len(f) for f in frames) - len(ident)
        if size > self.max_request_bytes:
            self._refuse(ident, None, None, 0, "?", None, ErrorCode.TOO_LARGE,
                         f"request of {size} bytes exceeds the {self.max_request_bytes}-byte limit", t)
            return
        if len(frames) < 2 or frames[1] != framing.VERSION:
            version = frames[1][:16] if len(frames) > 1 else b""
            self._refuse(ident, None, None, 0, "?", None, ErrorCode.BAD_VERSION,
                         f"protocol version {version!r} not supported; this broker speaks {framing.VERSION!r}", t)
            return
        if len(frames) != framing.REQUEST_FRAMES + 1:
            self._refuse(ident, None, None, 0, "?", None, ErrorCode.MALFORMED,
                         f"expected {framing.REQUEST_FRAMES} frames, got {len(frames) - 1}", t)
            return
        _, _version, run_id_b, credential, gen_b, body = frames
        run_id = run_id_b.decode("ascii", "replace")[:64]
        chan = self.channels.get(run_id)
        if chan is None or not chan.authenticates(credential):
            self._refuse(ident, None, None, 0, "?", None, ErrorCode.UNAUTHENTICATED,
                         f"unknown run {run_id!r} or wrong credential", t)
            return
        if chan.revocation is not None:
            self._refuse(ident, chan, run_id, _guess_id(body), "?", None, ErrorCode.REVOKED,
                         f"run {run_id} is revoked ({chan.revoked_reason()})", t)
            return
        if not (gen_b.isdigit() and gen_b.isascii() and len(gen_b) <= 19):
            self._refuse(ident, chan, run_id, _guess_id(body), "?", None, ErrorCode.MALFORMED,
                         f"generation frame {gen_b[:20]!r} is not a decimal integer", t)
            return
        if int(gen_b) != chan.generation or chan.stale:
            # Pre-tool gate: the run's session has moved on (a new message or
            # a stop bumped its generation), even if the run is not yet revoked.
            self._refuse(ident, chan, run_id, _guess_id(body), "?", None, ErrorCode.STALE_GENERATION,
                         f"generation {int(gen_b)} is not current ({chan.current.value})", t)
            return
        try:
            req = schema.decode_request(body)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            self._refuse(ident, chan, run_id, _guess_id(body), "?", None, ErrorCode.MALFORMED,
                         f"invalid request body: {exc}", t)
            return
        if chan.paused and not isinstance(req, schema.Ping):
            chan.held.append((ident, req, t))
            self.journal.egress(run_id, t, req.id, _verb(req), _name(req), "held")
            return
        self._dispatch(ident, chan, req, t)

    def _dispatch(self, ident: bytes, chan: Channel, req: schema.Request, t: int) -> None:
        run_id = chan.run_id
        if isinstance(req, schema.Call):
            self._call(ident, chan, req, t)
        elif isinstance(req, schema.Emit):
            self.journal.egress(run_id, t, req.id, "emit", req.kind, "allowed")
            self.sink.on_event(run_id, req.kind, req.data, t)
            self._reply(ident, schema.Reply(id=req.id, ok=True))
        elif isinstance(req, schema.Result):
            self.journal.egress(run_id, t, req.id, "result", None, "allowed")
            self.sink.on_result(run_id, req.value)
            self._reply(ident, schema.Reply(id=req.id, ok=True))
        elif isinstance(req, schema.Failure):
            self.journal.egress(run_id, t, req.id, "error", req.type[:200], "allowed")
            self.sink.on_failure(run_id, req.type, req.message, req.traceback)
            self._reply(ident, schema.Reply(id=req.id, ok=True))
        elif isinstance(req, schema.Inbox):
            self.journal.egress(run_id, t, req.id, "inbox", None, "allowed")
            self._reply(ident, schema.Reply(id=req.id, ok=True, result=self.sink.inbox_of(run_id)))
        else:  # Ping
            self._reply(ident, schema.Reply(id=req.id, ok=True, result={"state": self.sink.state_of(run_id)}))

    # -- tool calls ----------------------------------------------------------------
    def _call(self, ident: bytes, chan: Channel, req: schema.Call, t: int) -> None:
        run_id = chan.run_id
        # Allow-list first: a run cannot probe which tools exist beyond its own.
        if req.tool not in chan.allowed:
            self._refuse(ident, chan, run_id, req.id, "call", req.tool, ErrorCode.TOOL_DENIED,
                         f"tool {req.tool!r} is not on run {run_id}'s allow-list", t)
            return
        tool = self.tools.get(req.tool)
        if tool is None:  # allowed at start, unregistered since
            self._refuse(ident, chan, run_id, req.id, "call", req.tool, ErrorCode.UNKNOWN_TOOL,
                         f"no tool named {req.tool!r} is registered", t)
            return
        if chan.max_calls is not None and chan.calls >= chan.max_calls:
            self._refuse(ident, chan, run_id, req.id, "call", req.tool, ErrorCode.QUOTA_EXCEEDED,
                         f"run {run_id} reached its limit of {chan.max_calls} tool calls", t)
            self.sink.on_quota(run_id, "tool_calls")
            return
        ctx = ToolContext(run_id, req.tool, req.id, chan.gate, chan.revoked_reason)
        try:
            args, kwargs = tool.bind(req.args, req.kwargs, ctx)
        except TypeError as exc:
            self._refuse(ident, chan, run_id, req.id, "call", req.tool, ErrorCode.BAD_ARGUMENTS,
                         f"arguments do not fit tool {req.tool!r}: {exc}", t)
            return
        # Dispatch decision. Revocation happens on this same thread, so the
        # check above and this timestamp are ordered with `revoked_at`.
        ctx.started_at = time.monotonic_ns()
        chan.calls += 1
        self.journal.egress(run_id, ctx.started_at, req.id, "call", req.tool, "dispatched")
        if tool.is_async:
            handle: Any = self._start_eagerly(tool.fn(*args, **kwargs))
        else:
            handle = self.loop.run_in_executor(self.executor, _run_sync_handler, tool, ctx, chan, args, kwargs)
        # Keyed by a broker-wide sequence, not the run's request id: two calls
        # of one run may carry the same id (forked processes, hostile code),
        # and revoke must cancel every one of them.
        key = next(self._call_seq)
        if handle.done():  # an async handler that finished in its first step
            self._finished(ident, chan, key, req.id, ctx, handle)
            return
        chan.in_flight[key] = (handle, ctx)
        handle.add_done_callback(lambda fut: self._finished(ident, chan, key, req.id, ctx, fut))

    def _start_eagerly(self, coro: Any) -> asyncio.Future:
        """Run an async handler's first step now, in the dispatching loop turn.

        Most tool handlers finish without ever suspending (or suspend late);
        running the first step here saves two loop turns per call, and the
        handler's first line runs in the very step that checked the run was
        not revoked. A handler that suspends continues in a task (what
        Python 3.12's eager tasks do).
        """
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            fut = self.loop.create_future()
            fut.set_result(stop.value)
            return fut
        except BaseException as exc:
            fut = self.loop.create_future()
            fut.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
            return fut
        return self.loop.create_task(_continue(coro, yielded))

    def _finished(self, ident: bytes, chan: Channel, key: int, req_id: int, ctx: ToolContext,
                  fut: asyncio.Future) -> None:
        chan.in_flight.pop(key, None)
        try:
            self._answer(ident, chan, req_id, ctx, fut)
        finally:
            # Usage last: a call that crosses a token limit still gets its
            # result (its cost is spent); the stop it triggers then revokes
            # the run before anything else of it is dispatched.
            if ctx.usage:
                self.sink.on_usage(chan.run_id, ctx.tool, ctx.usage)

    def _answer(self, ident: bytes, chan: Channel, req_id: int, ctx: ToolContext, fut: asyncio.Future) -> None:
        t = time.monotonic_ns()
        if fut.cancelled() or ctx.cancelled or chan.revocation is not None:
            if not fut.cancelled():
                fut.exception()  # retrieve, so asyncio does not log it; the result is discarded
            self.journal.egress(chan.run_id, t, req_id, "call", ctx.tool, "cancelled", int(ErrorCode.CANCELLED),
                                chan.revoked_reason())
            self._reply_error(ident, req_id, ErrorCode.CANCELLED,
                              f"tool {ctx.tool!r} cancelled: run {chan.run_id} was revoked", chan.revoked_reason())
            return
        exc = fut.exception()
        if isinstance(exc, PolicyDenied):  # a built-in tool's policy refusal: the run sees code 15
            self.journal.egress(chan.run_id, t, req_id, "call", ctx.tool, "refused", int(exc.code), str(exc)[:4000])
            self._reply_error(ident, req_id, ErrorCode.POLICY_DENIED, str(exc))
            return
        if isinstance(exc, ToolCancelled):
            self.journal.egress(chan.run_id, t, req_id, "call", ctx.tool, "cancelled", int(ErrorCode.CANCELLED), str(exc))
            self._reply_error(ident, req_id, ErrorCode.CANCELLED, str(exc))
            return
        if exc is not None:
            text = f"{type(exc).__name__}: {exc}"[:4000]
            self.journal.egress(chan.run_id, t, req_id, "call", ctx.tool, "failed", int(ErrorCode.TOOL_ERROR), text)
            self._reply_error(ident, req_id, ErrorCode.TOOL_ERROR, f"tool {ctx.tool!r} failed: {text}")
            return
        try:
            body = schema.encode(schema.Reply(id=req_id, ok=True, result=fut.result()))
        except (TypeError, msgspec.EncodeError) as err:
            self.journal.egress(chan.run_id, t, req_id, "call", ctx.tool, "failed", int(ErrorCode.RESULT_NOT_JSON), str(err))
            self._reply_error(ident, req_id, ErrorCode.RESULT_NOT_JSON,
                              f"tool {ctx.tool!r} returned a value that is not JSON: {err}")
            return
        self.journal.egress(chan.run_id, t, req_id, "call", ctx.tool, "completed")
        self._send([ident, framing.VERSION, body])

    def close(self) -> None:
        self.loop.remove_reader(self._fd)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.sock.close(0)
        self.ctx.term()


async def _continue(coro: Any, yielded: Any) -> Any:
    """Drive a coroutine whose first step already ran, as its Task would have.

    Waits on what it yielded (a Future, or None for a bare yield), then
    resumes it with send(None), or throw() if the wait raised; cancelling
    this task cancels the awaited future, and the CancelledError is thrown
    into the handler at its await point.
    """
    try:
        while True:
            try:
                if yielded is None:
                    await asyncio.sleep(0)
                else:
                    # Take the future over from the handler, as Task.__step does,
                    # or awaiting it again is refused.
                    yielded._asyncio_future_blocking = False
                    await yielded
            except BaseException as exc:
                yielded = coro.throw(exc)
            else:
                yielded = coro.send(None)
    except StopIteration as stop:
        return stop.value


def _run_sync_handler(tool: Tool, ctx: ToolContext, chan: Channel, args: list[Any], kwargs: dict[str, Any]) -> Any:
    # Thread-start gate: a sync handler queued before the revoke but not yet
    # on a thread never starts.
    with chan.gate:
        if ctx.cancelled or chan.revocation is not None:
            raise ToolCancelled(f"run {chan.run_id}: tool {tool.name!r} revoked before it started")
    return tool.fn(*args, **kwargs)
