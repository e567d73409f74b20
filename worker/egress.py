"""The run's only way to act on the world: tool calls brokered by the supervisor.

Inside a Python run::

    from . import egress
    egress.call("send_email", to="a@b.c", body="hi")   # result, or raises
    egress.emit("progress", {"pct": 40})
    await egress.acall("search", q="...")              # many may be in flight

A refusal raises the exception its wire code stands for (`Revoked`,
`ToolDenied`, `ToolError`, ...). ZeroMQ sockets are neither fork- nor
thread-safe, so each (process, thread) pair gets its own socket, created on
first use; a run that forks children can call egress from them too.

While waiting for a reply the client also watches the supervisor through a
pidfd: if the supervisor dies the call raises `Revoked` at once instead of
blocking forever (heartbeat loss, G5).

Once the broker says the run's channel is revoked (the revocation notice, a
reply with id 0 and code REVOKED, any REVOKED reply, or a CANCELLED reply
that quotes the revocation), the waiting call
raises `Revoked` and every later call in this process, and in children it
forks afterwards, raises `Revoked` without sending anything: revocation is
permanent, so asking again could only add load to a broker that will refuse.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
from typing import TYPE_CHECKING, Any

import zmq

if TYPE_CHECKING:
    import asyncio

from ..ipc import framing, schema
from ..ipc.errors import DeadstopError, EgressRefused, ErrorCode, Revoked, refusal_from_wire

ENV_SUPERVISOR_PID = "DEADSTOP_SUPERVISOR_PID"


class EgressUnavailable(DeadstopError):
    """This process is not inside a deadstop run (no egress address configured)."""


class _Config:
    __slots__ = ("address", "run_id", "credential", "generation", "supervisor_pid")

    def __init__(self, address: str, run_id: str, credential: bytes, generation: int, supervisor_pid: int | None):
        self.address = address
        self.run_id = run_id.encode("ascii")
        self.credential = credential
        self.generation = str(generation).encode("ascii")
        self.supervisor_pid = supervisor_pid


_config: _Config | None = None
_ids = itertools.count(1)
_local = threading.local()
_owner_pid = os.getpid()
_context: zmq.Context | None = None
_supervisor_fd: int | None = None
#: (message, reason) of the broker's REVOKED answer, once it came; kept across fork.
_revocation: tuple[str, str | None] | None = None


def configure(address: str, run_id: str, credential: bytes, generation: int = 0,
              supervisor_pid: int | None = None) -> None:
    """Point this process at its run's egress channel (done by the bootstrap)."""
    global _config, _revocation
    _config = _Config(address, run_id, credential, generation, supervisor_pid)
    _revocation = None  # a new channel
    _reset_after_fork()


def _configure_from_environment() -> _Config:
    """Argv runs (or their Python children) learn their channel from the environment."""
    address = os.environ.get(framing.ENV_EGRESS)
    run_id = os.environ.get(framing.ENV_RUN_ID)
    cred_fd = os.environ.get(framing.ENV_CREDENTIAL_FD)
    if not (address and run_id and cred_fd):
        raise EgressUnavailable(
            "no egress channel: this process was not started by a deadstop supervisor "
            f"({framing.ENV_EGRESS}/{framing.ENV_RUN_ID}/{framing.ENV_CREDENTIAL_FD} unset)")
    credential = read_credential(int(cred_fd))
    sup = os.environ.get(ENV_SUPERVISOR_PID)
    configure(address, run_id, credential, int(os.environ.get(framing.ENV_GENERATION, "0")),
              int(sup) if sup else None)
    assert _config is not None
    return _config


def read_credential(fd: int) -> bytes:
    """Read the run's credential without consuming it, so the run's children can read it too.

    The supervisor passes a sealed memfd; pread at offset 0 leaves the shared
    file offset alone. Platforms without memfd get a pipe, readable once.
    """
    try:
        return os.pread(fd, 4096, 0).strip()
    except OSError as exc:
        if exc.errno != errno.ESPIPE:
            raise
        return os.read(fd, 4096).strip()


def _reset_after_fork() -> None:
    global _owner_pid, _context, _local, _supervisor_fd
    _owner_pid = os.getpid()
    _context = None  # the parent's context belongs to the parent; never touch it here
    _local = threading.local()
    _supervisor_fd = None


def _cfg() -> _Config:
    if _config is None:
        return _configure_from_environment()
    if os.getpid() != _owner_pid:
        _reset_after_fork()
    return _config


def _ctx() -> zmq.Context:
    global _context
    if _context is None:
        _context = zmq.Context()
    return _context


def _supervisor_pidfd() -> int | None:
    global _supervisor_fd
    cfg = _cfg()
    if _supervisor_fd is None and cfg.supervisor_pid and hasattr(os, "pidfd_open"):
        try:
            _supervisor_fd = os.pidfd_open(cfg.supervisor_pid)
        except OSError:
            _supervisor_fd = -1  # already gone: every call will report it
    return _supervisor_fd


def _sync_socket() -> tuple[zmq.Socket, zmq.Poller, int | None]:
    """This thread's socket, and a poller watching it and the supervisor's pidfd."""
    state = getattr(_local, "sync", None)
    if state is None:
        sock = _ctx().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(_cfg().address)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        sup_fd = _supervisor_pidfd()
        if sup_fd is not None and sup_fd >= 0:
            poller.register(sup_fd, zmq.POLLIN)
        state = _local.sync = (sock, poller, sup_fd)
    return state


def _frames(body: bytes, version: bytes = framing.VERSION) -> list[bytes]:
    cfg = _cfg()
    return [version, cfg.run_id, cfg.credential, cfg.generation, body]


def _check_size(body: bytes) -> None:
    """Refused here rather than by the broker: its TOO_LARGE reply carries id 0
    (the body is never parsed) and could not name this request."""
    cfg = _cfg()
    size = len(framing.VERSION) + len(cfg.run_id) + len(cfg.credential) + len(cfg.generation) + len(body)
    if size > framing.MAX_REQUEST_BYTES:
        raise EgressRefused(f"egress request of {size} bytes exceeds the {framing.MAX_REQUEST_BYTES}-byte limit",
                            code=ErrorCode.TOO_LARGE)


def _encode_request(body_obj: Any) -> bytes:
    try:
        return schema.ensure_jsonable(body_obj)
    except TypeError as exc:
        what = getattr(body_obj, "tool", None) or getattr(body_obj, "kind", None) or type(body_obj).__name__
        raise TypeError(f"egress request for {what!r} carries a value that is not JSON: {exc}") from None


def _unwrap(reply: schema.Reply) -> Any:
    if reply.ok:
        return reply.result
    err = reply.error
    if err is not None and _says_revoked(err):
        _note_revoked(err.message, err.reason)
    raise refusal_from_wire({"code": err.code, "message": err.message, "reason": err.reason} if err else {})


def _says_revoked(err: schema.ErrorBody) -> bool:
    """REVOKED, or a call cancelled by the revocation (CANCELLED quoting its record)."""
    return err.code == ErrorCode.REVOKED or (err.code == ErrorCode.CANCELLED and err.reason is not None)


def _note_revoked(message: str, reason: str | None) -> None:
    global _revocation
    if _revocation is None:
        _revocation = (message, reason)


def _check_revoked() -> None:
    """Raise Revoked, sending nothing, if the broker already said this run's channel is revoked."""
    if _revocation is not None:
        raise _revoked_error()


def _revoked_error() -> Revoked:
    assert _revocation is not None
    message, reason = _revocation
    return Revoked(message, code=ErrorCode.REVOKED, reason=reason)


def _supervisor_lost() -> Revoked:
    return Revoked("the supervisor is gone; egress is closed", code=ErrorCode.REVOKED, reason="supervisor lost")


def request(body_obj: Any, timeout: float | None = None) -> Any:
    """Send one request and block for its reply (or for the supervisor's death, or the revocation notice)."""
    _check_revoked()
    body = _encode_request(body_obj)
    sock, poller, sup_fd = _sync_socket()
    if sup_fd is not None and sup_fd < 0:
        raise _supervisor_lost()
    req_id = body_obj.id
    _check_size(body)
    framing.send_frames(sock, _frames(body))
    deadline_ms = None if timeout is None else int(timeout * 1000)
    while True:
        events = dict(poller.poll(deadline_ms))
        if not events:
            raise TimeoutError(f"no reply to egress request {req_id} within {timeout}s")
        if sock in events:
            frames = sock.recv_multipart()
            reply = schema.decode_reply(frames[-1])
            # id 0 is a refusal issued before the broker read our body (bad
            # credential, size, framing), which answers the request just sent,
            # or the revocation notice, which answers every request.
            if reply.id == req_id or (reply.id == 0 and not reply.ok):
                return _unwrap(reply)
            continue  # a late reply to an earlier timed-out request
        if sup_fd is not None and sup_fd in events:
            raise _supervisor_lost()


def call(tool: str, *args: Any, **kwargs: Any) -> Any:
    """Run a tool through the supervisor and return its JSON result."""
    return request(schema.Call(id=next(_ids), tool=tool, args=list(args), kwargs=kwargs))


def emit(kind: str, data: Any = None) -> None:
    """Publish an event; raises if the supervisor refuses it (for example after revoke)."""
    request(schema.Emit(id=next(_ids), kind=kind, data=data))


def inbox() -> Any:
    """The message(s) this run was started with: {"message", "messages", "context"}.

    A Python agent receives its message as its first argument; an argv agent
    (any language) asks for it with this verb.
    """
    return request(schema.Inbox(id=next(_ids)))


def ping() -> Any:
    return request(schema.Ping(id=next(_ids)))


def report_result(value: Any) -> None:
    request(schema.Result(id=next(_ids), value=value))


def report_failure(type_name: str, message: str, traceback_text: str) -> None:
    request(schema.Failure(id=next(_ids), type=type_name, message=message, traceback=traceback_text))


#: Refusals with id 0 that say the channel itself is unusable (REVOKED: the
#: revocation notice). This client never sends a request the broker could
#: refuse with another id-0 code.
_CHANNEL_LEVEL = frozenset({ErrorCode.UNAUTHENTICATED, ErrorCode.BAD_VERSION, ErrorCode.MALFORMED,
                            ErrorCode.TOO_LARGE, ErrorCode.REVOKED})


class _AsyncChannel:
    """One DEALER per event loop, read from the loop's own reader callback.

    Replies are matched to futures by id. The socket is driven directly
    (non-blocking sends, a drain on the ZeroMQ fd) rather than through
    zmq.asyncio, whose per-message futures cost more than the whole broker
    round trip when many calls are in flight.

    It speaks ds2: a request made while nothing else is in flight leaves at
    once (a batch of one); the others made in the same loop step leave
    together, as one batch, at the end of that step, and the broker answers
    with arrays of replies. Many calls in flight then cost the broker one
    message, not one each.
    """

    def __init__(self, loop: "asyncio.AbstractEventLoop"):
        self.loop = loop
        self.sock = _ctx().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, framing.SOCKET_HWM)
        self.sock.connect(_cfg().address)
        self.fd = self.sock.getsockopt(zmq.FD)
        self.pending: dict[int, "asyncio.Future"] = {}
        self.outbox: list[tuple[int, bytes]] = []  # (id, encoded request) of this loop step, not yet sent
        self.flush_scheduled = False
        self.lost = False
        loop.add_reader(self.fd, self._drain)
        fd = _supervisor_pidfd()
        if fd is not None and fd >= 0:
            loop.add_reader(fd, self._lost)
        elif fd is not None:
            self.lost = True

    def _lost(self) -> None:
        self.lost = True
        self.outbox.clear()
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(_supervisor_lost())
        self.pending.clear()

    def _drain(self) -> None:
        # The ZeroMQ fd is edge-triggered: read until there is nothing left.
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if frames[0] == framing.VERSION_BATCH:
                for reply in schema.decode_replies(frames[-1]):
                    self._deliver(reply)
            else:  # ds1: a refusal of a message the broker could not read as ds2
                self._deliver(schema.decode_reply(frames[-1]))

    def _deliver(self, reply: schema.Reply) -> None:
        if reply.id == 0 and not reply.ok:
            if reply.error is None or reply.error.code not in _CHANNEL_LEVEL:
                return  # cannot be matched to one call; the others keep their own replies
            # Refused before the body was read, for a reason that holds for
            # every request on this channel (credential, framing, revocation).
            if reply.error.code == ErrorCode.REVOKED:
                _note_revoked(reply.error.message, reply.error.reason)
            err = refusal_from_wire({"code": reply.error.code, "message": reply.error.message,
                                     "reason": reply.error.reason})
            for waiting in self.pending.values():
                if not waiting.done():
                    waiting.set_exception(err)
            self.pending.clear()
            return
        fut = self.pending.pop(reply.id, None)
        if fut is None or fut.done():
            return
        try:
            fut.set_result(_unwrap(reply))
        except DeadstopError as exc:
            fut.set_exception(exc)

    async def request(self, body_obj: Any) -> Any:
        if self.lost:
            raise _supervisor_lost()
        _check_revoked()
        body = _encode_request(body_obj)
        _check_size(body)
        fut = self.loop.create_future()
        self.pending[body_obj.id] = fut
        self.outbox.append((body_obj.id, body))
        if len(self.pending) == 1 and not self.flush_scheduled:
            self._flush()  # nothing else in flight: no reason to wait (a lone call's round trip stays short)
        elif not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)  # after the other requests this loop step makes
        return await fut

    def _flush(self) -> None:
        """Send the outbox as ds2 batches (MAX_BATCH requests, MAX_REQUEST_BYTES at most each)."""
        self.flush_scheduled = False
        if _revocation is not None or self.lost:
            # Revoked (or the supervisor lost) meanwhile: nothing more is sent, and what was not sent fails.
            unsent, self.outbox = self.outbox, []
            for req_id, _body in unsent:
                fut = self.pending.pop(req_id, None)
                if fut is not None and not fut.done():
                    fut.set_exception(_supervisor_lost() if self.lost else _revoked_error())
            return
        room = framing.MAX_REQUEST_BYTES - sum(len(f) for f in _frames(b"[]", framing.VERSION_BATCH))
        outbox = self.outbox
        while outbox:
            n, size = 0, 0
            while n < len(outbox) and n < framing.MAX_BATCH and (n == 0 or size + len(outbox[n][1]) + 1 <= room):
                size += len(outbox[n][1]) + 1
                n += 1
            try:
                body = schema.join_batch([b for _id, b in outbox[:n]])
                framing.send_frames(self.sock, _frames(body, framing.VERSION_BATCH))
            except zmq.Again:  # SOCKET_HWM batches already queued: let the broker catch up
                self.flush_scheduled = True
                self.loop.call_later(0.001, self._flush)
                break
            del outbox[:n]
        if self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self.loop.call_soon(self._drain)  # a send can swallow the fd's edge


def _async_channel() -> _AsyncChannel:
    import asyncio  # imported on first async use: runs that never need it die faster (smaller RSS)

    loop = asyncio.get_running_loop()
    chans = getattr(_local, "async_channels", None)
    if chans is None:
        chans = _local.async_channels = {}
    chan = chans.get(id(loop))
    if chan is None or chan.loop is not loop:
        chan = chans[id(loop)] = _AsyncChannel(loop)
    return chan


async def acall(tool: str, *args: Any, **kwargs: Any) -> Any:
    """Async `call`: many may be in flight on one socket."""
    return await _async_channel().request(schema.Call(id=next(_ids), tool=tool, args=list(args), kwargs=kwargs))


async def aemit(kind: str, data: Any = None) -> None:
    await _async_channel().request(schema.Emit(id=next(_ids), kind=kind, data=data))
