"""One control endpoint of the daemon: its ROUTER socket, who its peers are, when they go away.

The ipc:// listener trusts every peer with every scope (the runtime
directory is owner-only); a tcp:// listener is a CURVE server, and a peer's
scopes are those its key was given (the ZAP handler puts the key in each
message's User-Id).

A disconnect is seen on the socket's monitor by the connection's fd, and
every message carries its fd (SRCFD), so a tool provider that goes away is
known at once, not at its next call. An fd can be reused by a new
connection before its old one's event is read; a peer on it that still
takes a ping (ROUTER_MANDATORY) is not the one that left.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from ...ipc import gateway
from ..control.policy import Principal

#: A push clients ignore: sent to tell a live peer from one that is gone.
PING = b'{"push": "ping"}'
#: Requests taken from the socket per wake-up.
BATCH = 256
#: Seconds after a disconnect at which a peer that still took a ping is pinged again.
RECHECKS = (0.01, 0.05, 0.2, 1.0)


class Listener:
    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, principal_of: Callable[[bytes, zmq.Frame], Principal | None],
                 *, curve_secret: bytes | None = None):
        self.endpoint = endpoint
        self.principal_of = principal_of
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a push to a peer that is gone fails instead of vanishing
        self.sock.setsockopt(zmq.MAXMSGSIZE, gateway.MAX_FRAME_BYTES)  # libzmq drops a peer that sends more
        if curve_secret is not None:
            self.sock.curve_server = True
            self.sock.curve_secretkey = curve_secret
            self.sock.zap_domain = b"deadstop"
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        # Every send and receive goes through the asyncio socket, never a shadow of it: the
        # socket's fd is edge-triggered, and pyzmq's asyncio socket re-checks for pending input
        # after its own sends; a send it does not see could swallow the edge of an arrival and
        # leave the reader asleep with a request queued.
        self._idents_of_fd: dict[int, set[bytes]] = {}
        self.sock.bind(endpoint)

    async def batch(self) -> list[list[zmq.Frame]]:
        """What is queued (at least one message, at most BATCH), each noted with its connection."""
        received: list[list[zmq.Frame]] = [await self.sock.recv_multipart(copy=False)]
        while len(received) < BATCH:
            more: asyncio.Future[list[zmq.Frame]] = self.sock.recv_multipart(  # type: ignore[assignment]
                flags=zmq.NOBLOCK, copy=False)  # done at once: a message, or Again
            if not more.done() or more.exception() is not None:
                if not more.done():
                    more.cancel()
                break
            received.append(more.result())
        for frames in received:
            try:
                fd = int(frames[-1].get(zmq.SRCFD))
            except zmq.ZMQError:  # its connection is already gone: nothing to watch
                continue
            if fd >= 0:
                self._idents_of_fd.setdefault(fd, set()).add(frames[0].bytes)
        return received

    def send(self, ident: bytes, req_id: bytes, body: bytes) -> bool:
        """Send now or not at all; False if the peer is gone or not reading (the message is dropped)."""
        sent: asyncio.Future[Any] = self.sock.send_multipart(  # type: ignore[assignment]
            [ident, gateway.VERSION, req_id, body], flags=zmq.NOBLOCK)
        if not sent.done():  # queued after all: its outcome is not waited for, but is read
            sent.add_done_callback(lambda f: f.cancelled() or f.exception())
            return True
        return sent.exception() is None

    async def departures(self, gone: Callable[[bytes], Any]) -> None:
        """Call `gone(ident)` for each peer whose connection closes, for ever."""
        while True:
            try:
                fd = int(parse_monitor_message(await self.monitor.recv_multipart())["value"])  # an Event flag: as int
            except (zmq.ZMQError, ValueError, KeyError):  # a malformed monitor message: wait for the next
                continue
            for ident in self._idents_of_fd.pop(fd, ()):
                self._probe(fd, ident, gone, list(RECHECKS))

    def _probe(self, fd: int, ident: bytes, gone: Callable[[bytes], Any], later: list[float]) -> None:
        """Ping a peer whose fd closed: gone at the first failed ping. A ping can still pass while
        the socket has yet to tear the dead pipe down, so a peer that passes is pinged again a
        few times; one that keeps passing is a new connection on a reused fd, and stays."""
        if not self.send(ident, gateway.PUSH_ID, PING):
            gone(ident)
        elif later:
            asyncio.get_running_loop().call_later(later.pop(0), self._probe, fd, ident, gone, later)
        else:
            self._idents_of_fd.setdefault(fd, set()).add(ident)
