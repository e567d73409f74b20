"""The daemon: one AsyncSupervisor, its control verbs on ROUTER sockets, its events on PUB sockets.

Every connection is a Principal (listener.py): on the owner-only ipc://
endpoint every peer holds every scope and is named by the kind its client
declares in its routing id (`cli/...` an operator, `gateway/...` a gateway),
so a stop is recorded with that source; on tcp:// (CURVE only) a peer holds
the scopes its key was given.

Reading: each wake-up drains what is queued and starts the urgent verbs
first (stop, kill, pause: their revoke happens in the step that starts
them, before any slow verb of the same batch gets a turn); every request
then runs as its own task, so a slow verb (a send waiting for its run to
start, a stop waiting out its grace) never holds up the socket. A client
that disconnects mid-call wedges nothing: its reply is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any, Callable

import msgspec
import zmq
import zmq.asyncio

from ...ipc import gateway
from ...ipc.control import ControlFault, Fault, Scope
from .._version import __version__
from ..errors import DeadstopError
from ..console.server import ConsoleError, ConsoleServer, ConsoleSettings
from ..client.locate import FILE_NAME, default_runtime_dir, pid_alive, well_known_file
from ..control.api import fault_of
from ..control.policy import ALL_SCOPES, Principal
from ..facades.async_supervisor import AsyncSupervisor
from . import config as config_mod
from . import keys
from .listener import Listener
from .providers import Peer, Providers

log = logging.getLogger("deadstop.daemon")


class DaemonRunning(ControlFault):
    def __init__(self, message: str):
        super().__init__(Fault.STATE_DIR_IN_USE, message)


class Daemon:
    def __init__(self, config_path: str | None, *, state_dir: str, runtime_dir: str, binds: list[str] | None = None,
                 keys_dir: str | None = None, console: ConsoleSettings | None = None):
        self.binds = list(binds or [])
        self.console_settings = console
        self.console: ConsoleServer | None = None
        self._console_login: str | None = None
        for bind in self.binds:
            host, _, port = bind[len("tcp://"):].rpartition(":")
            if not bind.startswith("tcp://") or not host or not port.isdigit():
                raise ControlFault(Fault.BAD_ARGUMENTS, f"--bind {bind!r}: only tcp://HOST:PORT (CURVE-authenticated; "
                                                        "its events go on PORT+1); the ipc endpoint is always in the "
                                                        "runtime directory")
        self.config_path = config_path
        self.config = config_mod.load(config_path)
        self.state_dir = state_dir
        self.runtime_dir = runtime_dir
        self.keys_dir = keys_dir or os.path.join(state_dir, "keys")
        self.listeners: list[Listener] = []
        self._publishers: list[zmq.Socket[bytes]] = []
        self._pub_sockets: list[zmq.asyncio.Socket] = []
        self.clients: dict[str, tuple[str, frozenset[Any]]] = {}
        self.server_key: str | None = None
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._seqs: dict[str | None, int] = {}
        self.started = time.time()

    # -- lifetime ------------------------------------------------------------------------------------
    async def run(self) -> int:
        """Serve until SIGTERM / SIGINT / daemon.stop; every run is stopped before this returns 0."""
        self._prepare_runtime_dir()
        cfg = self.config
        self.sup = AsyncSupervisor(state_dir=self.state_dir, grace=cfg.grace, containment=cfg.containment,
                                   isolation=cfg.isolation)
        await self.sup.open()
        readers: list[asyncio.Task[None]] = []
        others: list[asyncio.Task[None]] = []
        try:
            self.providers = Providers(self.sup.tools, self._push, self._session_of)
            await self._apply_config(cfg)
            self._open_sockets()
            await self._start_console()
            self._write_connection_file()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stopping.set)
            loop.add_signal_handler(signal.SIGHUP, self._reload_from_signal)
            readers = [loop.create_task(self._read(lst), name=f"deadstop-daemon-{lst.endpoint}") for lst in self.listeners]
            others = [loop.create_task(lst.departures(self._departed(lst))) for lst in self.listeners]
            others.append(loop.create_task(self._publish(), name="deadstop-daemon-events"))
            log.info("deadstop daemon %s serving on %s", self.sup.id, self.endpoints)
            await self._stopping.wait()
        finally:
            if self.console is not None:
                await asyncio.to_thread(self.console.stop)  # no click lands while the runs are stopped
            for task in readers:
                task.cancel()  # no new request from here on
            await self.sup.close()  # every live run killed, its report journaled
            for task in [*others, *self._tasks]:
                task.cancel()
            self._remove_connection_file()
            for endpoints in getattr(self, "endpoints", {}).values():
                for ep in endpoints:
                    _unlink(ep)
            if hasattr(self, "auth"):
                self.auth.stop()
            if hasattr(self, "ctx"):
                self.ctx.destroy(linger=0)  # every socket, whatever step failed
        return 0

    def _prepare_runtime_dir(self) -> None:
        parent = os.path.dirname(os.path.abspath(self.runtime_dir))
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=0o711)  # the shared base: traversable, never narrowed by the daemon
        os.makedirs(self.runtime_dir, mode=0o700, exist_ok=True)
        os.chmod(self.runtime_dir, 0o700)  # its own directory, owner-only: who can connect is who can enter it
        path = os.path.join(self.runtime_dir, FILE_NAME)
        try:
            with open(path, "rb") as f:
                other = msgspec.json.decode(f.read(), type=gateway.ConnectionFile)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return
        if other.pid != os.getpid() and pid_alive(other.pid):
            raise DaemonRunning(f"a deadstop daemon (pid {other.pid}, state directory {other.state_dir}) already "
                                f"serves {self.runtime_dir}; stop it, or give this one --runtime-dir")

    def _open_sockets(self) -> None:
        self.ctx = zmq.asyncio.Context()
        control_ep = f"ipc://{os.path.join(self.runtime_dir, 'control')}"
        events_ep = f"ipc://{os.path.join(self.runtime_dir, 'events')}"
        for ep in (control_ep, events_ep):
            _unlink(ep)
        self.listeners.append(Listener(self.ctx, control_ep, _ipc_principal))
        self._publishers.append(self._publisher(events_ep))
        for ep in (control_ep, events_ep):
            os.chmod(ep[len("ipc://"):], 0o600)
        self.endpoints = {"control": [control_ep], "events": [events_ep]}
        if self.binds:
            self._open_tcp()

    def _publisher(self, endpoint: str, curve_secret: bytes | None = None) -> zmq.Socket[bytes]:
        pub = self.ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, 100_000)  # past it, a slow subscriber loses messages (seq shows the gap)
        if curve_secret is not None:
            pub.curve_server = True
            pub.curve_secretkey = curve_secret
            pub.zap_domain = b"deadstop"
        pub.bind(endpoint)
        self._pub_sockets.append(pub)  # the shadow below does not own it: it must stay referenced
        return zmq.Socket.shadow(pub.underlying)  # sent to without awaiting (NOBLOCK)

    def _open_tcp(self) -> None:
        """tcp:// only with CURVE: the ZAP handler admits the keys in authorized/, each with its scopes."""
        from zmq.auth.asyncio import AsyncioAuthenticator

        public, secret = keys.server_keys(self.keys_dir)
        self.server_key = public.decode()
        self.auth = AsyncioAuthenticator(self.ctx)
        self.auth.start()
        self._load_keys()
        for bind in self.binds:
            host, _, port = bind[len("tcp://"):].rpartition(":")
            events_ep = f"tcp://{host}:{int(port) + 1}"
            self.listeners.append(Listener(self.ctx, bind, self._tcp_principal, curve_secret=secret))
            self._publishers.append(self._publisher(events_ep, secret))
            self.endpoints["control"].append(bind)
            self.endpoints["events"].append(events_ep)

    def _load_keys(self) -> None:
        self.clients = keys.authorized(self.keys_dir)
        self.auth.configure_curve(domain="deadstop", location=os.path.join(self.keys_dir, "authorized"))

    def _tcp_principal(self, ident: bytes, frame: zmq.Frame) -> Principal | None:
        name, scopes = self.clients.get(str(frame.get("User-Id")), (None, frozenset()))
        if name is None:
            return None  # admitted under an older list of keys; no longer authorized
        return Principal("gateway", name, scopes)

    async def _start_console(self) -> None:
        if self.console_settings is None:
            return
        where = gateway.ConnectionFile(control=self.endpoints["control"], events=self.endpoints["events"],
                                       pid=os.getpid(), started=self.started, state_dir=self.sup.state_dir,
                                       supervisor_id=self.sup.id)
        self.console = ConsoleServer(self.console_settings, where)
        try:
            url = await asyncio.to_thread(self.console.start)
        except ConsoleError as exc:
            self.console = None
            raise ControlFault(Fault.BAD_ARGUMENTS, f"console: {exc}") from None
        self._new_file_login()
        log.info("deadstop console on %s (`deadstop console` prints a login link)", url)

    def _new_file_login(self) -> None:
        """The connection file's login link: good once; when it is used, the file gets a fresh one.

        The login is answered only once the file holds the fresh link (or after a bound), so whoever
        reads the file after a login never reads the link that login spent."""
        assert self.console is not None
        loop = asyncio.get_running_loop()

        def used() -> None:  # on the console's thread, inside the login's request
            try:
                asyncio.run_coroutine_threadsafe(self._file_login_used(), loop).result(5.0)
            except Exception:  # not in time, or the file could not be written: the login itself stands
                log.warning("deadstop console: the connection file's login link was not replaced", exc_info=True)

        self._console_login = self.console.login_link("write", ttl=None, on_use=used)

    async def _file_login_used(self) -> None:
        if self.console is not None and not self._stopping.is_set():
            self._new_file_login()
            self._write_connection_file()

    def console_login(self, who: Principal, scope: str) -> gateway.ConsoleLink:
        if self.console is None:
            raise ControlFault(Fault.NOT_RUNNING, "this daemon serves no console (it was started with --no-console)")
        if scope not in ("read", "write"):
            raise ControlFault(Fault.BAD_ARGUMENTS, f"a console login is for scope read or write, not {scope!r}")
        if scope == "write" and Scope.WRITE not in who.scopes:
            raise ControlFault(Fault.FORBIDDEN, f"{who.describe()} holds no write scope: ask for scope read")
        ttl = 300.0
        return gateway.ConsoleLink(url=self.console.url, login=self.console.login_link(scope, ttl), scope=scope,
                                   expires_in=ttl)

    def _write_connection_file(self) -> None:
        info = gateway.ConnectionFile(control=self.endpoints["control"], events=self.endpoints["events"],
                                      server_key=self.server_key, pid=os.getpid(), started=self.started,
                                      state_dir=self.sup.state_dir, supervisor_id=self.sup.id,
                                      console=self.console.url if self.console else None,
                                      console_login=self._console_login)
        path = os.path.join(self.runtime_dir, FILE_NAME)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(msgspec.json.encode(info))
        os.replace(tmp, path)  # clients never read a half-written file
        if os.path.abspath(self.runtime_dir) == default_runtime_dir():
            link = well_known_file()  # where clients look with no flags
            staged = f"{link}.{os.getpid()}.tmp"
            if os.path.lexists(staged):
                os.unlink(staged)
            os.symlink(path, staged)
            os.replace(staged, link)

    def _remove_connection_file(self) -> None:
        path = os.path.join(self.runtime_dir, FILE_NAME)
        try:
            with open(path, "rb") as f:
                mine = msgspec.json.decode(f.read(), type=gateway.ConnectionFile).pid == os.getpid()
            if mine:
                os.unlink(path)
                link = well_known_file()
                if os.path.islink(link) and os.readlink(link) == path:
                    os.unlink(link)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            pass

    # -- configuration ---------------------------------------------------------------------------------
    async def _apply_config(self, cfg: config_mod.DaemonConfig) -> dict[str, list[str]]:
        """Tools, then MCP servers (their tools), then agents, whose allow-lists may name any of them."""
        for tool in cfg.tools:
            if tool.target is None:
                self.providers.declare(tool.name)
            else:
                self.sup.register_tool(tool.name, tool.target)
        running = {s.name: s for s in self.config.mcp_servers} if cfg is not self.config else {}
        mcp_tools: list[str] = []
        for server in cfg.mcp_servers:
            if running.get(server.name) == server and server.name in self.sup.mcp.servers:
                mcp_tools += sorted(t.qualified for t in self.sup.mcp.servers[server.name].tools.values())
                continue  # unchanged: its process (and any call in flight) is left alone
            if running.get(server.name) == server and server.name in self.sup.mcp.session_scoped:
                mcp_tools += self.sup.mcp.session_tools[server.name]
                continue
            try:
                mcp_tools += await self.sup.register_mcp_server(server.name, list(server.command), env=dict(server.env),
                                                                cwd=server.cwd, timeout=server.timeout,
                                                                scope=server.scope, network=server.network)
            except DeadstopError as exc:
                raise config_mod.ConfigError(f"{cfg.path}: mcp_servers.{server.name}: {exc}") from None
        for gone in (set(self.sup.mcp.servers) | set(self.sup.mcp.session_scoped)) - {s.name for s in cfg.mcp_servers}:
            await self.sup.mcp.remove(gone)
        for agent in cfg.agents:
            self.sup.register_agent(agent.name, agent.target, **agent.options)
        return {"agents": [a.name for a in cfg.agents], "tools": [t.name for t in cfg.tools] + mcp_tools}

    async def reload(self) -> dict[str, Any]:
        """Re-read agents, tools and MCP servers; live runs keep what they started with. ConfigError leaves
        agents and tools as they were (a server that fails to start is named)."""
        cfg = config_mod.load(self.config_path)
        if (cfg.grace, cfg.containment, cfg.isolation) != (self.config.grace, self.config.containment,
                                                           self.config.isolation):
            log.warning("deadstop: [defaults] changed; they apply at the next start of the daemon")
        applied = await self._apply_config(cfg)
        if hasattr(self, "auth"):
            self._load_keys()  # a key removed from authorized/ is refused from its next connection
        for name in {a.name for a in self.config.agents} - set(applied["agents"]):
            self.sup.registry.agents.pop(name, None)  # gone from the file: no new session may use it
        self.config = cfg
        return applied

    def _reload_from_signal(self) -> None:
        task = asyncio.get_running_loop().create_task(self._reload_logged())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
            log.info("deadstop: configuration reloaded (SIGHUP)")
        except Exception as exc:  # a bad file changes nothing
            log.error("deadstop: reload failed, configuration unchanged: %s", exc)

    # -- requests ------------------------------------------------------------------------------------------
    async def _read(self, listener: Listener) -> None:
        """Serve the listener for ever: nothing a peer sends (or a failure of ours) may end this loop."""
        while True:
            try:
                await self._read_batch(listener)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("deadstop: serving %s: a batch failed; serving on", listener.endpoint)

    async def _read_batch(self, listener: Listener) -> None:
        received = await listener.batch()
        parsed = [self._parse(listener, frames) for frames in received]
        requests = [p for p in parsed if p is not None]
        requests.sort(key=lambda p: gateway.verb_of(p[3]).name not in gateway.URGENT_VERBS)
        for who, ident, req_id, request in requests:
            task = asyncio.get_running_loop().create_task(self._answer(listener, who, ident, req_id, request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _parse(self, listener: Listener, frames: list[zmq.Frame]) -> tuple[Principal, bytes, bytes, Any] | None:
        ident = frames[0].bytes
        if len(frames) != 4:
            listener.send(ident, frames[2].bytes if len(frames) > 2 else b"?", gateway.fault(ControlFault(
                Fault.BAD_ARGUMENTS, f"a request is 3 frames (version, id, body), not {len(frames) - 1}")))
            return None
        version, req_id, body = (f.bytes for f in frames[1:])
        who = listener.principal_of(ident, frames[-1])
        if who is None:
            listener.send(ident, req_id, gateway.fault(ControlFault(Fault.FORBIDDEN, "this key is not authorized")))
            return None
        if version != gateway.VERSION:
            listener.send(ident, req_id, gateway.fault(ControlFault(
                Fault.UNSUPPORTED_VERSION, f"version {version[:16]!r} is not spoken here; this daemon speaks "
                                           f"{gateway.VERSION.decode()}")))
            return None
        try:
            return who, ident, req_id, gateway.decode_request(body)
        except ControlFault as exc:
            listener.send(ident, req_id, gateway.fault(exc))
            return None

    async def _answer(self, listener: Listener, who: Principal, ident: bytes, req_id: bytes, request: Any) -> None:
        try:
            result = await self._dispatch((listener, ident), who, request)
            body = gateway.ok(msgspec.to_builtins(result))
        except ControlFault as exc:
            body = gateway.fault(exc)
        except Exception as exc:
            body = gateway.fault(fault_of(exc))
        listener.send(ident, req_id, body)

    async def _dispatch(self, peer: Peer, who: Principal, request: Any) -> Any:
        verb = gateway.verb_of(request)
        if verb.name not in gateway.DAEMON_VERBS:
            return await self.sup.control.call(who, request)
        self.sup.control.policy.check_scope(who, verb)
        if isinstance(request, gateway.ToolsProvide):
            return self.providers.provide(peer, request.names)
        if isinstance(request, gateway.ToolsResult):
            return self.providers.result(peer, request)
        if isinstance(request, gateway.DaemonInfo):
            return self.info()
        if isinstance(request, gateway.DaemonReload):
            try:
                return await self.reload()
            except config_mod.ConfigError as exc:
                raise ControlFault(Fault.BAD_ARGUMENTS, f"reload refused, configuration unchanged: {exc}") from None
        if isinstance(request, gateway.EventsPing):
            self._send_event(request.session, "", "stream.ping", {"token": request.token}, 0)
            return True
        if isinstance(request, gateway.ConsoleLogin):
            return self.console_login(who, request.scope)
        if isinstance(request, gateway.DaemonStop):
            asyncio.get_running_loop().call_soon(self._stopping.set)
            return True
        raise ControlFault(Fault.UNKNOWN_VERB, f"verb {verb.name} is not served")

    def info(self) -> dict[str, Any]:
        health = msgspec.to_builtins(self.sup.control.health())
        return {**health, "daemon_pid": os.getpid(), "started": self.started, "config": self.config_path,
                "state_dir": self.sup.state_dir, "runtime_dir": self.runtime_dir, "endpoints": self.endpoints,
                "agents": sorted(self.sup.registry.agents), "tools": self.sup.tools.names(),
                "provided_tools": sorted(self.providers.by_tool), "version": __version__,
                "console": self.console.url if self.console else None,
                "mcp_servers": {**{name: sorted(t.qualified for t in server.tools.values())
                                   for name, server in self.sup.mcp.servers.items()}, **self.sup.mcp.session_tools},
                "gateway_version": gateway.VERSION.decode()}

    def _departed(self, listener: Listener) -> Callable[[bytes], Any]:
        return lambda ident: self.providers.gone((listener, ident))

    def _push(self, peer: Peer, body: bytes) -> None:
        listener, ident = peer
        if not listener.send(ident, gateway.PUSH_ID, body):
            self.providers.gone(peer)

    def _session_of(self, run_id: str) -> str | None:
        run = self.sup.find_run(run_id)
        return run.owner.key if run is not None and run.owner is not None else None

    # -- events -------------------------------------------------------------------------------------------
    async def _publish(self) -> None:
        daemon = Principal("library", "daemon event stream")
        async for event in self.sup.control.subscribe(daemon, None, lifecycle=True):
            seq = self._seqs[event.session] = self._seqs.get(event.session, 0) + 1
            self._send_event(event.session, event.run_id, event.kind, event.data, event.generation, seq, event.t_ns)

    def _send_event(self, session: str | None, run_id: str, kind: str, data: Any, generation: int,
                    seq: int = 0, t_ns: int | None = None) -> None:
        message = gateway.EventMessage(seq=seq, session=session, run_id=run_id, kind=kind, data=data,
                                       t_ns=time.monotonic_ns() if t_ns is None else t_ns, generation=generation)
        frames = [gateway.event_topic(session), msgspec.json.encode(message)]
        for pub in self._publishers:
            try:
                pub.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # a subscriber at its high-water mark: it sees a gap in seq


def _ipc_principal(ident: bytes, frame: zmq.Frame) -> Principal:
    return principal_of(ident)


def principal_of(ident: bytes) -> Principal:
    """The caller a connection on the owner-only ipc endpoint stands for, from its routing id."""
    kind, _, rest = ident.decode(errors="replace").partition("/")
    name = rest.rpartition("/")[0] or rest or "unnamed"
    if kind == "cli":
        return Principal("operator", name)
    if kind == "console":
        return Principal("console", name, ALL_SCOPES)
    if kind == "console-read":  # the console acting for a read-only login: the policy refuses the rest
        return Principal("console", name, frozenset({Scope.READ}))
    return Principal("gateway", name if kind == "gateway" else ident.hex()[:16], ALL_SCOPES)


def _unlink(endpoint: str) -> None:
    try:
        os.unlink(endpoint[len("ipc://"):])
    except FileNotFoundError:
        pass


def serve(config_path: str | None, *, state_dir: str, runtime_dir: str, binds: list[str] | None = None,
          keys_dir: str | None = None, console: ConsoleSettings | None = None) -> int:
    """Run a daemon in this process until it is told to stop; the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    daemon = Daemon(config_path, state_dir=state_dir, runtime_dir=runtime_dir, binds=binds, keys_dir=keys_dir,
                    console=console)
    return asyncio.run(daemon.run())


__all__ = ["Daemon", "DaemonRunning", "principal_of", "serve"]
