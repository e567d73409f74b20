"""The egress broker: one ZeroMQ ROUTER socket, every run's only way out.

Each request is checked cheapest first (size, version, frame count, peer
identity and credential, revocation, generation, schema, tool allow-list) and
every refusal is answered with a typed error and journaled; hostile input
never raises out of the receive loop. Nothing from a worker is ever
unpickled: bodies are JSON decoded by msgspec into fixed types.

A run with an identity of its own gets an endpoint of its own on the same
socket, in a directory only that identity can open. Its requests must come
from its uid as the kernel attests it (SO_PEERCRED), so a credential stolen by
another run is useless, and revoking it closes the endpoint with every
connection accepted through it: revocation is physical, not only a check.

Refusals are budgeted: a run that draws them faster than an honest agent ever
would is revoked and stopped for abuse, and repeated refusals reach the
journal as counted summary rows, so a flood can fill neither the journal nor
the supervisor's memory.

The socket is read with plain non-blocking receives from an asyncio reader
callback, in batches, yielding to the event loop between batches so that a
tool-call flood cannot delay a revoke queued behind it.

Two wire versions are spoken on the same socket (ipc/framing.py). A `ds2`
message carries a batch of requests under one set of frames: the frame,
credential and generation checks run once for the batch, then each request
is checked and carried out as a `ds1` request would be, revocation and
generation looked at again before each, since a handler earlier in the batch
may have ended the run. Replies to a `ds2` connection are queued and leave
as one array per connection at the end of the receive step (or of the loop
step that produced them), before any revocation notice or unbind.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import sys
import time
from typing import Any, Protocol

import msgspec
import zmq

from ...ipc import framing, schema
from ...ipc.errors import ErrorCode
from .channel import Channel, GenerationCell, RevokeRecord, TokenBucket
from ..store.journal import Journal
from .threads import ToolThreads
from .tools import PolicyDenied, Tool, ToolCancelled, ToolContext, ToolFailure, ToolRegistry

log = logging.getLogger("deadstop.broker")

BATCH = 64
#: Requests read in one receive step at most (a ds2 message counts its
#: requests): with MAX_BATCH, what bounds the time a revoke waits behind a flood.
STEP_REQUESTS = 256
#: Bytes of replies joined into one ds2 reply message at most (a larger
#: single reply still goes alone).
REPLY_BATCH_BYTES = 1 << 20
#: Refusal budget of each run: an honest agent meets a refusal now and then
#: (a denied tool, a takeover), never hundreds a second; a run that floods
#: garbage or guesses credentials does, and past this budget it is stopped
#: (revocation source "abuse"). Traffic that no run can be blamed for shares
#: one budget of the same size, whose exhaustion only silences the journal.
REFUSAL_RATE = 50.0  # per second, sustained
REFUSAL_BURST = 200
#: What a paused run may have held. A frozen run sends nothing, so only a
#: burst just before the freeze or a process that escaped it fills this; past
#: it requests are refused QUEUE_FULL instead of growing the supervisor.
MAX_HELD = 1000
MAX_HELD_BYTES = 8 << 20
#: Frames of one message kept as bytes: a request's and its identity. The
#: rest of a longer message is only counted (and refused MALFORMED).
KEEP_FRAMES = framing.REQUEST_FRAMES + 1

_NOBLOCK = int(zmq.NOBLOCK)
_IPC = "ipc://"


class _IdOnly(msgspec.Struct):
    """Just the id of a body; the rest is skipped (three times faster than decoding it as a dict)."""

    id: Any = 0


_id_only = msgspec.json.Decoder(_IdOnly)


class BatchPeer(bytes):
    """The routing identity of a connection that speaks ds2: its replies are queued and sent as arrays.

    A bytes subclass, so it is the identity frame itself and keys the same
    dictionaries; only its type says how to answer.
    """

    __slots__ = ()


class BrokerSink(Protocol):
    """What the broker hands upwards: events, final results, liveness questions."""

    def on_event(self, run_id: str, kind: str, data: Any, t_ns: int) -> None: ...

    def on_result(self, run_id: str, value: Any) -> None: ...

    def on_failure(self, run_id: str, type_name: str, message: str, traceback: str) -> None: ...

    def on_usage(self, run_id: str, tool: str, usage: dict[str, float]) -> None: ...

    def on_tool_call(self, run_id: str, tool: str, req_id: int) -> None: ...

    def on_quota(self, run_id: str, limit: str) -> None: ...

    def on_abuse(self, run_id: str, detail: str) -> None:
        """The run spent its refusal budget; its channel is already revoked (source "abuse"): stop it."""

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
        value = _id_only.decode(body).id
    except Exception:  # not JSON, not an object, nested too deeply...
        return 0
    return value if type(value) is int and 0 <= value <= schema.MAX_ID else 0


def _peer_uid(frame: zmq.Frame) -> int | None:
    """The uid the kernel attests for the connection a frame came on, or None.

    On ipc:// libzmq reads SO_PEERCRED when it accepts a connection and
    exposes it as the frame property "Peer-Address", "<host>:<uid>:<gid>:<pid>"
    (for example "localhost:2100000123:2100000123:5919"): the identity of the
    process that connected, which no frame content can change.
    """
    try:
        fields = str(frame.get("Peer-Address")).rsplit(":", 3)
    except zmq.ZMQError:  # not a connection that has the property
        return None
    return int(fields[1]) if len(fields) == 4 and fields[1].isdigit() else None


def _unlink_socket(address: str) -> None:
    """Remove an ipc:// socket file; libzmq (4.3) leaves it behind on unbind."""
    try:
        os.unlink(address[len(_IPC):])
    except FileNotFoundError:
        pass


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
        self._by_uid: dict[int, str] = {}  # peer uid -> run id, for runs with an identity of their own
        self._shared_budget = TokenBucket(REFUSAL_RATE, REFUSAL_BURST)
        self.threads = ToolThreads(loop, tool_threads)
        # One I/O thread (the default), on which the revocation notice relies: see _notify_revoked.
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max(framing.HARD_FRAME_BYTES, 2 * max_request_bytes))
        self.sock.setsockopt(zmq.RCVHWM, framing.SOCKET_HWM)
        self.sock.setsockopt(zmq.SNDHWM, framing.SOCKET_HWM)
        self.sock.bind(address)
        if address.startswith(_IPC):
            # The supervisor's own uid only, whatever the umask: runs with an
            # identity of their own use their own endpoints.
            os.chmod(address[len(_IPC):], 0o600)
        self._fd: int = self.sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        self._drain_scheduled = False
        self._step_requests = 0  # requests read in the current receive step
        self._outbox: dict[bytes, list[bytes]] = {}  # ds2 connection -> its encoded replies, not yet sent
        self._flush_scheduled = False
        self._call_seq = itertools.count()
        loop.add_reader(self._fd, self._drain)

    # -- channels --------------------------------------------------------------
    def open_channel(self, run_id: str, credential: bytes, allowed: frozenset[str], generation: int = 0,
                     current: GenerationCell | None = None, max_calls: int | None = None, *,
                     peer_uid: int | None = None, peer_gid: int | None = None,
                     endpoint_dir: str | None = None) -> Channel:
        """Open a run's channel; `chan.address` is what the run must connect to.

        peer_uid: every request must come from this uid (kernel-attested);
        unauthenticated traffic from it is charged to this run.
        endpoint_dir: give the run an endpoint of its own, `<dir>/egress`,
        closed when the run is revoked. The caller creates the directory,
        root-owned, mode 0o710, group `peer_gid`, so that only the run's
        identity can reach the socket in it.
        """
        chan = Channel(run_id, credential, allowed, generation, current, max_calls,
                       budget=TokenBucket(REFUSAL_RATE, REFUSAL_BURST), address=self.address,
                       peer_uid=peer_uid, peer_gid=peer_gid)
        chan.emit = functools.partial(self._emit_for, chan)  # made once: each call's ToolContext shares it
        if endpoint_dir is not None:
            chan.address = chan.endpoint = self._bind_endpoint(endpoint_dir, peer_gid)
        self.channels[run_id] = chan
        if peer_uid is not None:
            self._by_uid[peer_uid] = run_id
        return chan

    def _bind_endpoint(self, endpoint_dir: str, gid: int | None) -> str:
        address = framing.ipc_address(endpoint_dir, "egress")
        self.sock.bind(address)
        path = address[len(_IPC):]
        try:
            # Group first, then the mode: until both are set only root can
            # connect (the file is created with the umask, group not writable).
            if gid is not None:
                os.chown(path, -1, gid)
            os.chmod(path, 0o660)
        except OSError:
            self.sock.unbind(address)
            _unlink_socket(address)
            raise
        return address

    def close_channel(self, run_id: str) -> None:
        """Forget a run's channel at the run's end: close its endpoint, write its refusal summaries.

        From here on its credential is unknown (UNAUTHENTICATED, not
        REVOKED) and its uid attributes nothing.
        """
        chan = self.channels.pop(run_id, None)
        if chan is None:
            return
        if chan.proxy is not None:
            chan.proxy.cut()
        self._unbind(chan)
        if chan.peer_uid is not None and self._by_uid.get(chan.peer_uid) == run_id:
            del self._by_uid[chan.peer_uid]
        self.journal.flush_refusals(run_id)

    def revoke(self, chan: Channel, source: str, reason: str, *, commit: bool = True) -> RevokeRecord:
        """Revoke, journal, cancel in-flight handlers; idempotent.

        From here the run's credential is gone and every request of it is
        refused. The journal row is committed before returning unless the
        caller revokes several runs at once and commits them together (before
        any signal: G1 still holds). The endpoint itself is closed by
        `disconnect`, which the stop sequence calls right after its first
        signal: nothing can pass the revoke in between, and the notice and
        the unbind (0.15 ms, measured) then delay no signal.
        """
        rec, first = chan.revoke(source, reason)
        if not first:
            return rec
        self.journal.revoked(chan.run_id, rec.at, source, reason, commit=commit)
        if chan.proxy is not None:
            chan.proxy.cut()  # its network too, in this step: listener closed, every connection reset
        for hook in list(chan.on_revoke):
            chan.revoke_tasks.append(hook())  # an isolated tool's helper: revoked and killed from this step
        for key, (handle, ctx) in list(chan.in_flight.items()):
            ctx.cancelled = True  # ctx.check() refuses from here on
            if ctx.on_thread:
                # A thread cannot be stopped: its effect may still happen. It is not called cancelled;
                # the stop waits for it within the grace and the report names it (outlived the revoke).
                chan.outliving[key] = (handle, ctx)
                chan.outlived.append(ctx)
                continue
            handle.cancel()  # an async handler stops at its next await; a queued sync one never starts
            chan.cancelled_at_revoke += 1
        now = time.monotonic_ns()
        for ident, req, _arrived in chan.take_held():  # held while paused: refused now, never dispatched
            self._refuse(ident, chan, req.id, _verb(req), _name(req), ErrorCode.REVOKED,
                         f"run {chan.run_id} is revoked ({chan.revoked_reason()})", now, charge=False)
        return rec

    def disconnect(self, chan: Channel) -> None:
        """Physical revocation of a revoked run: tell its connections, then close its endpoint."""
        assert chan.revocation is not None, "disconnect follows revoke"
        self._notify_revoked(chan)
        self._unbind(chan)

    def _notify_revoked(self, chan: Channel) -> None:
        """Tell each connection the run authenticated on that its channel is revoked.

        The notice is a reply with id 0 and code REVOKED: a client blocked in
        a call raises Revoked at once, and sends nothing more. Best-effort: it
        is queued before the unbind that follows, and libzmq's one I/O thread
        handles the two in that order, writing the notice to the connection
        before closing it (in trials every notice arrived, also with LINGER
        0); a peer that has stopped reading loses it with its connection. The
        revocation itself depends on none of this.
        """
        if not chan.peers:
            return
        why = chan.revoked_reason()
        body = schema.encode(schema.Reply(id=0, ok=False, error=schema.ErrorBody(
            int(ErrorCode.REVOKED), ErrorCode.REVOKED.name, f"run {chan.run_id} is revoked ({why})", why)))
        for ident in chan.peers:
            if type(ident) is BatchPeer:
                self._send([ident, framing.VERSION_BATCH, schema.join_batch([body])])
            else:
                self._send([ident, framing.VERSION, body])
        chan.peers.clear()
        # Replies still queued for ds2 connections go after the notice, not before: a large array ahead
        # of it could still be in libzmq's hands when the unbind drops the connection, and the notice
        # with it. The client takes the notice as final, so they change nothing for the run.
        self._flush_replies()

    def _unbind(self, chan: Channel) -> None:
        """Close the run's own endpoint, if it has one still open.

        libzmq closes the listener and every connection accepted through it
        (once this socket next processes its commands, which the reader
        callback does at once); the socket file is removed, so nothing can
        connect there again.
        """
        endpoint, chan.endpoint = chan.endpoint, None
        if endpoint is None:
            return
        self._flush_replies()  # queued replies to its connections go before they close
        try:
            self.sock.unbind(endpoint)
        except zmq.ZMQError:
            log.warning("egress: could not unbind %s of run %s", endpoint, chan.run_id)
        _unlink_socket(endpoint)

    # -- pause ---------------------------------------------------------------------
    def hold(self, chan: Channel) -> None:
        """From now on requests of the run queue up instead of being dispatched."""
        if chan.held is None:
            chan.held = []

    def release(self, chan: Channel) -> None:
        """Dispatch what was held, in arrival order, re-checking each request."""
        for ident, req, _arrived in chan.take_held():  # journaled at release time, in arrival order
            t = time.monotonic_ns()
            if chan.revocation is not None:
                self._refuse(ident, chan, req.id, _verb(req), _name(req), ErrorCode.REVOKED,
                             f"run {chan.run_id} is revoked ({chan.revoked_reason()})", t, charge=False)
            elif chan.stale:
                self._refuse(ident, chan, req.id, _verb(req), _name(req), ErrorCode.STALE_GENERATION,
                             f"generation {chan.generation} is not current ({chan.current.value})", t, charge=False)
            else:
                self._dispatch(ident, chan, req, t)

    def _hold(self, ident: bytes, chan: Channel, req: schema.Request, size: int, t: int) -> None:
        """Queue a paused run's request, within MAX_HELD requests and MAX_HELD_BYTES of bodies."""
        assert chan.held is not None
        if len(chan.held) >= MAX_HELD or chan.held_bytes + size > MAX_HELD_BYTES:
            self._refuse(ident, chan, req.id, _verb(req), _name(req), ErrorCode.QUEUE_FULL,
                         f"run {chan.run_id} is paused and holds {len(chan.held)} requests ({chan.held_bytes} "
                         f"bytes); at most {MAX_HELD} ({MAX_HELD_BYTES} bytes) are held", t)
            return
        chan.held.append((ident, req, t))
        chan.held_bytes += size
        self.journal.egress(chan.run_id, t, req.id, _verb(req), _name(req), "held")

    # -- receive loop ------------------------------------------------------------
    def _drain(self) -> None:
        self._drain_scheduled = False
        self._step_requests = 0
        try:
            self._drain_step()
        finally:
            self._flush_replies()

    def _drain_step(self) -> None:
        for _ in range(BATCH):
            if self._step_requests >= STEP_REQUESTS:
                break
            try:
                first, frames, count, size = self._recv()
            except zmq.Again:
                return
            except zmq.ZMQError:
                return  # closed under us
            self._step_requests += 1
            try:
                self._handle(first, frames, count, size)
            except Exception as exc:  # a bug must never take the broker down
                log.exception("egress: unexpected error handling a request")
                try:
                    self.journal.refused(None, time.monotonic_ns(), 0, "?", None, int(ErrorCode.INTERNAL),
                                         f"{type(exc).__name__}: {exc}"[:500])
                except Exception:
                    pass
                self._reply_error(frames[0], 0, ErrorCode.INTERNAL, "internal error; the request had no effect")
        self._schedule_drain()  # batch full: let other callbacks (a revoke) run first

    def _recv(self) -> tuple[zmq.Frame, list[bytes], int, int]:
        """One message: its identity frame, the frames kept as bytes, the frame count, the size.

        The identity frame is returned as received, for its properties (the
        peer's uid). The size counts every frame but the identity; frames
        past KEEP_FRAMES, or past the size cap, are counted but not copied.
        Frame by frame with copy=False instead of recv_multipart: that is
        also cheaper (3.1 against 5.2 us for a request; 3.8 us with the uid
        read, measured).
        """
        recv = self.sock.recv
        first = recv(_NOBLOCK, copy=False)
        frames = [first.bytes]
        count, size, more = 1, 0, first.more
        cap = self.max_request_bytes
        while more:
            part = recv(_NOBLOCK, copy=False)
            count += 1
            size += len(part)
            if count <= KEEP_FRAMES and size <= cap:
                frames.append(part.bytes)
            more = part.more
        return first, frames, count, size

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
        if int(self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self._schedule_drain()

    def _reply(self, ident: bytes, reply: schema.Reply) -> None:
        self._send_body(ident, schema.encode(reply))

    def _send_body(self, ident: bytes, body: bytes) -> None:
        """One encoded reply: at once to a ds1 connection, queued for a ds2 one (sent by _flush_replies)."""
        if type(ident) is not BatchPeer:
            self._send([ident, framing.VERSION, body])
            return
        queue = self._outbox.get(ident)
        if queue is None:
            queue = self._outbox[ident] = []
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self.loop.call_soon(self._flush_replies)  # a reply made outside a receive step
        queue.append(body)

    def _flush_replies(self) -> None:
        """Send every queued ds2 reply: one array per connection (split past REPLY_BATCH_BYTES or MAX_BATCH)."""
        self._flush_scheduled = False
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, {}
        for ident, bodies in outbox.items():
            start, size = 0, 0
            for i, body in enumerate(bodies):
                if i > start and (size + len(body) > REPLY_BATCH_BYTES or i - start >= framing.MAX_BATCH):
                    self._send([ident, framing.VERSION_BATCH, schema.join_batch(bodies[start:i])])
                    start, size = i, 0
                size += len(body) + 1
            self._send([ident, framing.VERSION_BATCH, schema.join_batch(bodies[start:])])

    def _reply_error(self, ident: bytes, req_id: int, code: ErrorCode, message: str, reason: str | None = None) -> None:
        self._reply(ident, schema.Reply(id=req_id, ok=False,
                                        error=schema.ErrorBody(int(code), code.name, message, reason)))

    def _refuse(self, ident: bytes, chan: Channel | None, req_id: int, verb: str, tool: str | None,
                code: ErrorCode, message: str, t_ns: int, *, charge: bool = True) -> None:
        """Answer a refusal, journal it (counted, not written, when repeated) and charge it.

        `chan` is the run the request is attributed to: by its credential,
        or, unauthenticated, by its kernel-attested uid. Its budget pays
        (`charge`, unless the refusal is the supervisor's own doing: held
        requests at a revoke or release); an exhausted budget stops the run
        for abuse. Unattributed refusals pay from the shared budget, whose
        exhaustion only keeps them out of the journal's individual rows.
        """
        quiet = False
        if chan is None:
            quiet = not self._shared_budget.take(t_ns)
        elif chan.revocation is not None:
            chan.refused_after_revoke += 1
        elif charge and not chan.budget.take(t_ns):
            self._abuse(chan, code)
        reason = chan.revoked_reason() if chan is not None and code is ErrorCode.REVOKED else None
        self.journal.refused(chan.run_id if chan is not None else None, t_ns, req_id, verb, tool, int(code),
                             message, quiet=quiet)
        self._reply_error(ident, req_id, code, message, reason)

    def _abuse(self, chan: Channel, code: ErrorCode) -> None:
        """The run spent its refusal budget: revoke it in this step, and have the supervisor stop it."""
        detail = (f"run {chan.run_id} drew more than {REFUSAL_BURST} refusals at over {REFUSAL_RATE:g}/s"
                  f" (the last: {code.name})")
        self.revoke(chan, "abuse", detail)
        self.disconnect(chan)  # a flooder's connections go at once, before its stop is even scheduled
        self.sink.on_abuse(chan.run_id, detail)

    def _attributed(self, first: zmq.Frame) -> Channel | None:
        """The run whose identity sent this frame, by its kernel-attested uid, if it has one of its own."""
        if not self._by_uid:
            return None
        uid = _peer_uid(first)
        run_id = self._by_uid.get(uid) if uid is not None else None
        return self.channels.get(run_id) if run_id is not None else None

    def _handle(self, first: zmq.Frame, frames: list[bytes], count: int, size: int) -> None:
        t = time.monotonic_ns()
        batched = len(frames) > 1 and frames[1] == framing.VERSION_BATCH
        ident = BatchPeer(frames[0]) if batched else frames[0]
        # Refusals before authentication answer with id 0 and never parse the
        # body: an unauthenticated peer gets no JSON decoding for free.
        if size > self.max_request_bytes:
            self._refuse(ident, self._attributed(first), 0, "?", None, ErrorCode.TOO_LARGE,
                         f"request of {size} bytes exceeds the {self.max_request_bytes}-byte limit", t)
            return
        if count < 2 or frames[1] not in framing.VERSIONS:
            version = frames[1][:16] if count > 1 else b""
            self._refuse(ident, self._attributed(first), 0, "?", None, ErrorCode.BAD_VERSION,
                         f"protocol version {version!r} not supported; this broker speaks "
                         f"{framing.VERSION!r} and {framing.VERSION_BATCH!r}", t)
            return
        if count != framing.REQUEST_FRAMES + 1:
            self._refuse(ident, self._attributed(first), 0, "?", None, ErrorCode.MALFORMED,
                         f"expected {framing.REQUEST_FRAMES} frames, got {count - 1}", t)
            return
        _, _version, run_id_b, credential, gen_b, body = frames
        run_id = run_id_b.decode("ascii", "replace")[:64]
        chan = self.channels.get(run_id)
        if chan is None or not (chan.peer_uid is None or _peer_uid(first) == chan.peer_uid) \
                or not chan.authenticates(credential):
            # A credential of run B presented from run A's uid is A's doing.
            self._refuse(ident, self._attributed(first), 0, "?", None, ErrorCode.UNAUTHENTICATED,
                         f"unknown run {run_id!r} or wrong credential", t)
            return
        if chan.revocation is not None:
            self._refuse_each(ident, chan, body, batched, ErrorCode.REVOKED,
                              f"run {run_id} is revoked ({chan.revoked_reason()})", t)
            return
        chan.saw(ident)
        if not (gen_b.isdigit() and gen_b.isascii() and len(gen_b) <= 19):
            self._refuse_each(ident, chan, body, batched, ErrorCode.MALFORMED,
                              f"generation frame {gen_b[:20]!r} is not a decimal integer", t)
            return
        if int(gen_b) != chan.generation or chan.stale:
            # Pre-tool gate: the run's session has moved on (a new message or
            # a stop bumped its generation), even if the run is not yet revoked.
            self._refuse_each(ident, chan, body, batched, ErrorCode.STALE_GENERATION,
                              f"generation {int(gen_b)} is not current ({chan.current.value})", t)
            return
        if not batched:
            self._request(ident, chan, body, t)
            return
        items = self._batch_items(ident, chan, body, t)
        self._step_requests += max(len(items) - 1, 0)  # the message itself was counted as one
        for i, item in enumerate(items):
            if i:  # an earlier request of the batch may have ended the run or moved its session on
                t = time.monotonic_ns()
                if chan.revocation is not None:
                    self._refuse(ident, chan, _guess_id(item), "?", None, ErrorCode.REVOKED,
                                 f"run {run_id} is revoked ({chan.revoked_reason()})", t)
                    continue
                if chan.stale:
                    self._refuse(ident, chan, _guess_id(item), "?", None, ErrorCode.STALE_GENERATION,
                                 f"generation {chan.generation} is not current ({chan.current.value})", t)
                    continue
            self._request(ident, chan, item, t)

    def _batch_items(self, ident: bytes, chan: Channel, body: bytes, t: int) -> list[Any]:
        """The requests of a ds2 body, still encoded; a body that is no array of 1..MAX_BATCH is refused (id 0)."""
        try:
            items = schema.decode_batch(body)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            self._refuse(ident, chan, 0, "?", None, ErrorCode.MALFORMED,
                         f"a {framing.VERSION_BATCH.decode()} body must be a JSON array of requests: {exc}", t)
            return []
        if not 1 <= len(items) <= framing.MAX_BATCH:
            self._refuse(ident, chan, 0, "?", None, ErrorCode.MALFORMED,
                         f"a {framing.VERSION_BATCH.decode()} body holds 1 to {framing.MAX_BATCH} requests, "
                         f"not {len(items)}", t)
            return []
        return items

    def _refuse_each(self, ident: bytes, chan: Channel, body: bytes, batched: bool, code: ErrorCode, message: str,
                     t: int) -> None:
        """A refusal that holds for the whole message: once for ds1, once per request of a ds2 batch."""
        if not batched:
            self._refuse(ident, chan, _guess_id(body), "?", None, code, message, t)
            return
        try:
            items = schema.decode_batch(body)
        except Exception:  # not an array: one refusal, id 0
            items = []
        if not 1 <= len(items) <= framing.MAX_BATCH:
            self._refuse(ident, chan, 0, "?", None, code, message, t)
            return
        self._step_requests += len(items) - 1
        for item in items:
            self._refuse(ident, chan, _guess_id(item), "?", None, code, message, t)

    def _request(self, ident: bytes, chan: Channel, body: Any, t: int) -> None:
        """One authenticated, current request (a ds1 body or an element of a ds2 one): steps 8 on."""
        try:
            req = schema.decode_request(body)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            self._refuse(ident, chan, _guess_id(body), "?", None, ErrorCode.MALFORMED,
                         f"invalid request body: {exc}", t)
            return
        if isinstance(req, schema.Emit) and req.kind.startswith(schema.RESERVED_KIND_PREFIXES):
            self._refuse(ident, chan, req.id, "emit", req.kind, ErrorCode.RESERVED_KIND,
                         f"event kind {req.kind!r} is the supervisor's own ({', '.join(schema.RESERVED_KIND_PREFIXES)}"
                         f"*); a run may not emit it", t)
            return
        if chan.held is not None and not isinstance(req, schema.Ping):
            self._hold(ident, chan, req, len(body), t)
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
            self._refuse(ident, chan, req.id, "call", req.tool, ErrorCode.TOOL_DENIED,
                         f"tool {req.tool!r} is not on run {run_id}'s allow-list", t)
            return
        tool = self.tools.get(req.tool)
        if tool is None:  # allowed at start, unregistered since
            self._refuse(ident, chan, req.id, "call", req.tool, ErrorCode.UNKNOWN_TOOL,
                         f"no tool named {req.tool!r} is registered", t)
            return
        if chan.max_calls is not None and chan.calls >= chan.max_calls:
            self._refuse(ident, chan, req.id, "call", req.tool, ErrorCode.QUOTA_EXCEEDED,
                         f"run {run_id} reached its limit of {chan.max_calls} tool calls", t)
            self.sink.on_quota(run_id, "tool_calls")
            return
        ctx = ToolContext(run_id, req.tool, req.id, chan.gate, chan.revoked_reason, chan.emit)
        try:
            args, kwargs = tool.bind(req.args, req.kwargs, ctx)
        except TypeError as exc:
            self._refuse(ident, chan, req.id, "call", req.tool, ErrorCode.BAD_ARGUMENTS,
                         f"arguments do not fit tool {req.tool!r}: {exc}", t)
            return
        # Dispatch decision. Revocation happens on this same thread, so the
        # check above and this timestamp are ordered with `revoked_at`.
        ctx.started_at = time.monotonic_ns()
        chan.calls += 1
        self.journal.egress(run_id, ctx.started_at, req.id, "call", req.tool, "dispatched")
        self.sink.on_tool_call(run_id, req.tool, req.id)
        if tool.is_async:
            handle: Any = self._start_eagerly(tool.fn(*args, **kwargs))
        else:
            handle = self.threads.submit(_run_sync_handler, tool, ctx, chan, args, kwargs)
        # Keyed by a broker-wide sequence, not the run's request id: two calls
        # of one run may carry the same id (forked processes, hostile code),
        # and revoke must cancel every one of them.
        key = next(self._call_seq)
        if handle.done():  # an async handler that finished in its first step
            self._finished(ident, chan, key, req.id, ctx, handle)
            return
        chan.in_flight[key] = (handle, ctx)
        handle.add_done_callback(lambda fut: self._finished(ident, chan, key, req.id, ctx, fut))

    def _emit_for(self, chan: Channel, kind: str, data: Any) -> bool:
        """A tool handler's event on behalf of its run: the run's own rules (reserved kinds, revoke, fence)."""
        if kind.startswith(schema.RESERVED_KIND_PREFIXES):
            raise ValueError(f"event kind {kind!r} is the supervisor's own")
        if chan.revocation is not None or chan.stale:
            return False
        self.sink.on_event(chan.run_id, kind, data, time.monotonic_ns())
        return True

    def _start_eagerly(self, coro: Any) -> asyncio.Future:
        """Run an async handler's first step now, in the dispatching loop turn.

        Most tool handlers finish without ever suspending (or suspend late);
        running the first step here saves two loop turns per call, and the
        handler's first line runs in the very step that checked the run was
        not revoked (a tool that pauses its caller holds the rest of the same
        batch). It runs inside its Task from that first line, so aiohttp's and
        anyio's timeouts, contextvars and current_task() work in it: an eager
        Task on Python 3.12 and later, the same made by hand on 3.11.
        """
        if _EAGER_TASKS:
            return asyncio.Task(coro, loop=self.loop, eager_start=True)  # type: ignore[call-arg]
        return _eager_task_311(self.loop, coro)

    def _finished(self, ident: bytes, chan: Channel, key: int, req_id: int, ctx: ToolContext,
                  fut: asyncio.Future) -> None:
        chan.in_flight.pop(key, None)
        if chan.outliving.pop(key, None) is not None:
            self._outlived(ident, chan, req_id, ctx, fut)
            return
        try:
            self._answer(ident, chan, req_id, ctx, fut)
        finally:
            # Usage last: a call that crosses a token limit still gets its
            # result (its cost is spent); the stop it triggers then revokes
            # the run before anything else of it is dispatched.
            if ctx.usage:
                self.sink.on_usage(chan.run_id, ctx.tool, ctx.usage)

    def _outlived(self, ident: bytes, chan: Channel, req_id: int, ctx: ToolContext, fut: asyncio.Future) -> None:
        """A synchronous handler that was running at the revoke has returned: say when, and how."""
        ctx.returned_at = t = time.monotonic_ns()
        exc = None if fut.cancelled() else fut.exception()
        revoked_at = chan.revocation.at if chan.revocation is not None else t
        if isinstance(exc, ToolCancelled):  # its ctx.check() refused: the effect never happened
            chan.outlived.remove(ctx)
            chan.cancelled_at_revoke += 1
            self.journal.egress(chan.run_id, t, req_id, "call", ctx.tool, "cancelled", int(ErrorCode.CANCELLED),
                                f"refused at its commit gate {(t - revoked_at) / 1e6:.1f} ms after the revoke")
            self._reply_error(ident, req_id, ErrorCode.CANCELLED, str(exc))
            return
        how = "returned" if exc is None else f"raised {type(exc).__name__}: {exc}"[:500]
        self.journal.egress(chan.run_id, t, req_id, "call", ctx.tool, "outlived_revoke", int(ErrorCode.CANCELLED),
                            f"running on a thread at the revoke; {how} {(t - revoked_at) / 1e6:.1f} ms after it "
                            "(its effect may have happened)")
        self._reply_error(ident, req_id, ErrorCode.CANCELLED,
                          f"tool {ctx.tool!r}: run {chan.run_id} was revoked while it ran", chan.revoked_reason())

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
        if isinstance(exc, ToolFailure):  # a failure with its own code (a tool server down, a timeout)
            self.journal.egress(chan.run_id, t, req_id, "call", ctx.tool, "failed", int(exc.code), str(exc)[:4000])
            self._reply_error(ident, req_id, ErrorCode(exc.code), f"tool {ctx.tool!r}: {exc}")
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
        self._send_body(ident, body)

    def close(self) -> None:
        self.loop.remove_reader(self._fd)
        self.threads.close()
        self.sock.close(0)
        self.ctx.term()


_EAGER_TASKS = sys.version_info >= (3, 12)


def _eager_task_311(loop: asyncio.AbstractEventLoop, coro: Any) -> asyncio.Future:
    """Python 3.11's missing eager task: a Task whose first step runs now, inside it.

    A Task schedules its first step with loop.call_soon from its constructor.
    Here that one call is caught (an instance attribute shadows the method
    for the constructor's duration; nothing else runs meanwhile: the loop is
    single-threaded and this is its thread) and the step is run at once, in
    the task's own context, so current_task() is the task (both Task
    implementations look call_soon up on the loop object). Private asyncio
    names are used (_enter_task, _leave_task), on 3.11 only, where nothing
    public does this.
    """
    caught: list[tuple[Any, tuple[Any, ...], Any]] = []

    def catch(callback: Any, *args: Any, context: Any = None) -> None:
        caught.append((callback, args, context))

    setattr(loop, "call_soon", catch)  # an instance attribute: shadows the method until deleted
    try:
        task = asyncio.Task(coro, loop=loop)
    finally:
        delattr(loop, "call_soon")
    ((step, args, context),) = caught
    # Dispatched from inside another task (held requests released by resume()): that task steps
    # aside for this one's first step, as 3.12's eager start does.
    outer = asyncio.current_task(loop)
    if outer is not None:
        asyncio.tasks._leave_task(loop, outer)
    try:
        context.run(step, *args)
    finally:
        if outer is not None:
            asyncio.tasks._enter_task(loop, outer)
    return task


def _run_sync_handler(tool: Tool, ctx: ToolContext, chan: Channel, args: list[Any], kwargs: dict[str, Any]) -> Any:
    # Thread-start gate: a sync handler queued before the revoke but not yet
    # on a thread never starts.
    with chan.gate:
        if ctx.cancelled or chan.revocation is not None:
            raise ToolCancelled(f"run {chan.run_id}: tool {tool.name!r} revoked before it started")
        ctx.on_thread = True  # under the gate: a revoke sees either this or the refusal above
    return tool.fn(*args, **kwargs)
