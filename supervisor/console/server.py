"""The console's server: aiohttp on its own thread and event loop, inside the daemon's process.

Its own loop, so that nothing a browser does (a slow page, a thousand open
streams, a large page of the egress log) takes a turn from the daemon's
loop, where stops are served; its own ZeroMQ connections to the daemon's
owner-only control socket, so that a button is the same verb, on the same
wire, as the CLI's. The daemon starts it after its sockets are up and stops
it before it stops its runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import ssl
import threading
from typing import Any

from aiohttp import web

from ...ipc import gateway
from ..client.aio import AsyncClient
from .app import ConsoleState, build
from .auth import Logins
from .feed import Feed

log = logging.getLogger("deadstop.console")

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7420
START_BOUND = 30.0  # seconds the daemon waits for the console to listen


class ConsoleError(Exception):
    """The console cannot serve as asked (a port in use, TLS settings missing for a non-loopback address)."""


@dataclasses.dataclass(frozen=True)
class ConsoleSettings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    certfile: str | None = None
    keyfile: str | None = None
    insecure: bool = False  # plain HTTP on a non-loopback address, said so at start
    explicit: bool = False  # the address was asked for: in use is an error, not a fallback

    @classmethod
    def parse(cls, text: str | None, **options: Any) -> "ConsoleSettings":
        """`[HOST:]PORT` (`[::1]:PORT` for IPv6); None: the default address."""
        if text is None:
            return cls(**options)
        host, sep, port = text.rpartition(":")
        host = host.strip("[]") if sep else DEFAULT_HOST
        if not port.isdigit() or not 0 <= int(port) <= 65535 or (sep and not host):
            raise ConsoleError(f"--console {text!r}: expected [HOST:]PORT, PORT 0..65535")
        return cls(host=host, port=int(port), explicit=True, **options)

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def check(self) -> None:
        if (self.certfile is None) != (self.keyfile is None):
            raise ConsoleError("--console-cert and --console-key go together")
        if not self.loopback and self.certfile is None and not self.insecure:
            raise ConsoleError(f"the console on {self.host} (not loopback) needs --console-cert and --console-key, "
                               "or --console-insecure to serve plain HTTP there")


class ConsoleServer:
    """The console thread: start() returns once it listens (or raises why it cannot); stop() ends it."""

    def __init__(self, settings: ConsoleSettings, where: gateway.ConnectionFile):
        settings.check()
        self.settings = settings
        self.where = where
        self.logins = Logins()
        self.url = ""
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> str:
        self._thread = threading.Thread(target=self._main, name="deadstop-console", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_BOUND):
            raise ConsoleError(f"the console did not come up within {START_BOUND:g} s")
        if self._error is not None:
            raise ConsoleError(str(self._error)) from self._error
        if not self.settings.loopback and self.settings.certfile is None:
            log.warning("deadstop console: serving PLAIN HTTP on %s (--console-insecure): login links and "
                        "cookies cross the network in the clear", self.url)
        return self.url

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)

    def login_link(self, scope: str, ttl: float | None = 300.0, on_use: Any = None) -> str:
        """A one-time login link (thread-safe: the daemon's loop calls this)."""
        return f"{self.url}login?token={self.logins.mint(scope, ttl, on_use)}"

    # -- the thread --------------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # before ready: start() raises it; after: logged
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
            else:
                log.exception("deadstop console: stopped by an error")

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        clients = {"write": AsyncClient(self.where, kind="console", name="web", timeout=None),
                   "read": AsyncClient(self.where, kind="console-read", name="web", timeout=None)}
        for client in clients.values():
            await client.open()
        feed = Feed(clients["write"])
        state = ConsoleState(self.logins, feed, clients, secure=self.settings.certfile is not None)
        runner = web.AppRunner(build(state), access_log=None, shutdown_timeout=1.0)
        follower = asyncio.ensure_future(feed.run())
        try:
            await runner.setup()
            await self._site(runner)
            host, port = runner.addresses[0][:2]
            scheme = "https" if self.settings.certfile else "http"
            shown = f"[{host}]" if ":" in host else host
            self.url = f"{scheme}://{shown}:{port}/"
            self._ready.set()
            await self._stop.wait()
        finally:
            state.closing.set()
            feed.close_pages()
            follower.cancel()
            await runner.cleanup()
            for client in clients.values():
                await client.close()

    async def _site(self, runner: web.AppRunner) -> web.TCPSite:
        tls = None
        if self.settings.certfile is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(self.settings.certfile, self.settings.keyfile)
        site = web.TCPSite(runner, self.settings.host, self.settings.port, ssl_context=tls)
        try:
            await site.start()
        except OSError as exc:
            if self.settings.explicit or self.settings.port == 0:
                raise ConsoleError(f"the console cannot listen on {self.settings.host}:{self.settings.port}: "
                                   f"{exc.strerror or exc}") from None
            log.warning("deadstop console: port %d is taken (%s); listening on a free one instead (see the "
                        "connection file or `deadstop console`)", self.settings.port, exc.strerror or exc)
            site = web.TCPSite(runner, self.settings.host, 0, ssl_context=tls)
            await site.start()
        return site


__all__ = ["ConsoleError", "ConsoleServer", "ConsoleSettings", "DEFAULT_HOST", "DEFAULT_PORT"]
