"""A run's network, through the gate: an HTTP proxy on the run's own loopback, served by the supervisor.

A proxied run has a network namespace of its own with nothing in it but
loopback. Before the run exists, the spawner binds a listener on
127.0.0.1:PROXY_PORT inside that namespace and hands it over (a socket
stays in the namespace it was made in, wherever its descriptor goes); the
run's HTTP_PROXY / HTTPS_PROXY / ALL_PROXY point at it. The supervisor
accepts on it and forwards plain HTTP (absolute-form requests) and
`CONNECT` tunnels, only to destinations on the run's allow-list; anything
else is answered 403 with the reason, and journaled.

Every connection is a pair of egress rows: `dispatched` when it is let
through (so the "nothing dispatched after the revoke" check covers the
network too) and, when it ends, `completed` or `cut` with the bytes each
way and how long it was open. At the revoke, in the same loop step, the
listener is closed and every connection of the run aborted, its upstream
half with SO_LINGER 0: bytes the kernel had not yet sent are discarded
rather than delivered, so nothing the run queued reaches its destination
afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import logging
import socket
import struct
import time
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from ..store.journal import Journal

log = logging.getLogger("deadstop.proxy")

#: Where the proxy listens inside each proxied run's namespace (the namespace is the run's alone).
PROXY_PORT = 3128
HEAD_LIMIT = 64 * 1024  # a request head larger than this is refused
CHUNK = 64 * 1024
CONNECT_TIMEOUT = 30.0


@dataclasses.dataclass(frozen=True)
class Proxy:
    """`network=Proxy(allow=[...])`: the run reaches only these destinations, through the supervisor.

    Each entry is `HOST:PORT`, `HOST` (any port), `*.example.org` (a
    shell-style pattern on the host name) or `*:443`. Names are matched as
    the run wrote them (no resolution on the run's behalf before the check).
    """

    allow: tuple[str, ...] = ()

    def __init__(self, allow: Iterable[str] = ()):
        entries = tuple(allow)
        for entry in entries:
            if not isinstance(entry, str) or not entry or any(c.isspace() for c in entry):
                raise ValueError(f"a proxy allow-list entry is HOST[:PORT], not {entry!r}")
            host, _, port = entry.rpartition(":") if ":" in entry else (entry, "", "")
            if port and port != "*" and not port.isdigit():
                raise ValueError(f"a proxy allow-list entry's port is a number or *, not {entry!r}")
        object.__setattr__(self, "allow", entries)

    def permits(self, host: str, port: int) -> bool:
        host = host.lower().strip("[]")
        for entry in self.allow:
            pattern, sep, want = entry.rpartition(":")
            if not sep or not pattern:
                pattern, want = entry, "*"
            if fnmatch.fnmatchcase(host, pattern.lower().strip("[]")) and want in ("*", str(port)):
                return True
        return False


class _Pipe:
    """One proxied connection: the run's side and the destination's, with their byte counts."""

    __slots__ = ("dest", "opened_at", "up", "down", "client", "upstream", "req_id", "journaled")

    def __init__(self, dest: str, client: asyncio.StreamWriter, req_id: int):
        self.dest = dest
        self.opened_at = time.monotonic_ns()
        self.up = self.down = 0
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.req_id = req_id
        self.journaled = False  # its closing row is written


class RunProxy:
    """The proxy of one run: serves its listener until cut()."""

    def __init__(self, run_id: str, listener_fd: int, policy: Proxy, journal: "Journal"):
        self.run_id = run_id
        self.policy = policy
        self.journal = journal
        self._listener = socket.socket(fileno=listener_fd)
        self._listener.setblocking(False)
        self._server: asyncio.base_events.Server | None = None
        self._pipes: set[_Pipe] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._seq = 0
        self.cut_at: int | None = None

    async def start(self) -> None:
        server = await asyncio.start_server(self._serve, sock=self._listener, limit=HEAD_LIMIT)
        if self.cut_at is not None:  # revoked while the server was being set up: it serves nothing
            server.close()
            return
        self._server = server

    # -- the revoke ---------------------------------------------------------------------------------
    def cut(self) -> None:
        """Close the listener and abort every connection, now (the revoke's loop step; synchronous)."""
        if self.cut_at is not None:
            return
        self.cut_at = time.monotonic_ns()
        if self._server is not None:
            self._server.close()
        else:
            self._listener.close()
        for pipe in list(self._pipes):
            if pipe.upstream is not None:
                _abort_now(pipe.upstream)
            _abort_now(pipe.client)
        for task in list(self._tasks):
            task.cancel()

    # -- one connection --------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._one(reader, writer)
        except (asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except Exception:
            log.exception("run %s: proxy connection failed", self.run_id)
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if self.cut_at is not None:
            return
        line, _, rest = head.partition(b"\r\n")
        try:
            method, target, version = line.decode("latin-1").split(" ")
        except ValueError:
            await self._refuse(writer, "-", 400, "not an HTTP request line")
            return
        if method.upper() == "CONNECT":
            host, port = _split_hostport(target, 443)
            forward = b""
        else:
            if not target.lower().startswith("http://"):
                await self._refuse(writer, target[:200], 400, "a proxied request is absolute-form http://HOST/...; "
                                                               "use CONNECT for https")
                return
            authority, _, path = target[len("http://"):].partition("/")
            host, port = _split_hostport(authority, 80)
            headers = [h for h in rest.split(b"\r\n") if h and not h.lower().startswith((b"proxy-", b"connection:"))]
            forward = b"\r\n".join([f"{method} /{path} {version}".encode("latin-1"), *headers, b"Connection: close",
                                    b"", b""])
        dest = f"{host}:{port}"
        if host is None or not self.policy.permits(host, port):
            await self._refuse(writer, dest, 403, f"{dest} is not on this run's network allow-list")
            return
        self._seq += 1
        pipe = _Pipe(dest, writer, self._seq)
        self.journal.egress(self.run_id, pipe.opened_at, pipe.req_id, "connect", dest, "dispatched")
        self._pipes.add(pipe)
        try:
            try:
                up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as exc:
                await self._answer(writer, 502, f"cannot reach {dest}: {exc}")
                self._closed(pipe, "failed", f"cannot reach it: {exc}")
                return
            if self.cut_at is not None:
                _abort_now(up_writer)
                return
            pipe.upstream = up_writer
            if forward:
                up_writer.write(forward)
                pipe.up += len(forward)
            else:
                writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            await asyncio.gather(self._relay(reader, up_writer, pipe, "up"), self._relay(up_reader, writer, pipe, "down"))
        finally:
            self._pipes.discard(pipe)
            if self.cut_at is not None:
                self._closed(pipe, "cut", "by the revoke")
            else:
                self._closed(pipe, "completed")

    async def _relay(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, pipe: _Pipe, way: str) -> None:
        try:
            while self.cut_at is None:
                data = await src.read(CHUNK)
                if not data or self.cut_at is not None:
                    break
                dst.write(data)
                if way == "up":
                    pipe.up += len(data)
                else:
                    pipe.down += len(data)
                await dst.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if self.cut_at is None and dst.can_write_eof():
                try:
                    dst.write_eof()
                except (OSError, RuntimeError):
                    pass

    def _closed(self, pipe: _Pipe, decision: str, why: str = "") -> None:
        if pipe.journaled:
            return
        pipe.journaled = True
        # A cut connection's row carries the cut's own time (the revoke's step), not when its task wound down.
        now = self.cut_at if decision == "cut" and self.cut_at is not None else time.monotonic_ns()
        detail = f"sent {pipe.up} bytes, received {pipe.down} bytes, open {(now - pipe.opened_at) / 1e6:.1f} ms" + \
            (f"; {why}" if why else "")
        self.journal.egress(self.run_id, now, pipe.req_id, "connect", pipe.dest, decision, None, detail)

    async def _refuse(self, writer: asyncio.StreamWriter, dest: str, status: int, why: str) -> None:
        self.journal.egress(self.run_id, time.monotonic_ns(), None, "connect", dest[:200], "refused", 7, why)
        await self._answer(writer, status, why)

    async def _answer(self, writer: asyncio.StreamWriter, status: int, why: str) -> None:
        reason = {400: "Bad Request", 403: "Forbidden", 502: "Bad Gateway"}.get(status, "Error")
        body = (why + "\n").encode()
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                     f"X-Deadstop-Refused: {why[:200]}\r\nConnection: close\r\n\r\n".encode("latin-1", "replace") + body)
        try:
            await writer.drain()
        except ConnectionError:
            pass

def _split_hostport(text: str, default: int) -> tuple[str | None, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = text, ""
    if not host or (port and not port.isdigit()) or (port and not 0 < int(port) < 65536):
        return None, default
    return host, int(port) if port else default


def _abort_now(writer: asyncio.StreamWriter) -> None:
    """Close at once with a reset: what the kernel still holds for the peer is discarded, not sent."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


__all__ = ["PROXY_PORT", "Proxy", "RunProxy"]
