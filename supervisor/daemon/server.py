"""The daemon: one AsyncSupervisor, its control verbs on a ROUTER socket, its events on a PUB socket.

Every connection is a Principal. On the owner-only ipc:// endpoint the
kernel already limits who can connect (the runtime directory is 0700), so a
connection is trusted with every scope and named by the kind its client
declares in its routing id (`cli/...` is an operator, `gateway/...` a
gateway): stops it asks for are recorded with that source.

Reading: each wake-up drains what is queued (up to BATCH requests) and
starts the urgent verbs first (stop, kill, pause: their revoke happens in
the step that starts them, before any slow verb of the same batch gets a
turn); every request then runs as its own task, so a slow verb (a send
waiting for its run to start, a stop waiting out its grace) never holds up
the socket. A client that disconnects mid-call wedges nothing: its reply
is dropped by the ROUTER.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from ...ipc import gateway
from ...ipc.control import ControlFault, Fault
from .._version import __version__
from ..client.locate import FILE_NAME
from ..control.api import fault_of
from ..control.policy import ALL_SCOPES, Principal
from ..facades.async_supervisor import AsyncSupervisor
from . import config as config_mod
from .providers import Providers

log = logging.getLogger("deadstop.daemon")

#: Requests taken from the socket per wake-up before the urgent ones are started.
BATCH = 256
#: A push clients ignore: sent to tell a live peer from one that is gone (ROUTER_MANDATORY).
PING = b'{"push":"ping"}'


class DaemonRunning(ControlFault):
    def __init__(self, message: str):
        super().__init__(Fault.STATE_DIR_IN_USE, message)


class Daemon:
    def __init__(self, config_path: str | None, *, state_dir: str, runtime_dir: str, binds: list[str] | None = None):
        self.config_path = config_path
        self.config = config_mod.load(config_path)
        self.state_dir = state_dir
        self.runtime_dir = runtime_dir
        self.binds = list(binds or [])
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
        background: list[asyncio.Task[None]] = []
        try:
            self.providers = Providers(self.sup.tools, self._push, self._session_of)
            self._apply_config(cfg)
            self._open_sockets()
            self._write_connection_file()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stopping.set)
            loop.add_signal_handler(signal.SIGHUP, self._reload_from_signal)
            background = [loop.create_task(self._read(), name="deadstop-daemon-reader"),
                          loop.create_task(self._publish(), name="deadstop-daemon-events"),
                          loop.create_task(self._watch_connections(), name="deadstop-daemon-connections")]
            log.info("deadstop daemon %s serving on %s", self.sup.id, self.endpoints)
            await self._stopping.wait()
        finally:
            if background:
                background[0].cancel()  # no new request from here on
            await self.sup.close()  # every live run killed, its report journaled
            for task in [*background, *self._tasks]:
                task.cancel()
            self._remove_connection_file()
            for endpoints in getattr(self, "endpoints", {}).values():
                for ep in endpoints:
                    _unlink(ep)
            if hasattr(self, "ctx"):
                self.ctx.destroy(linger=0)  # every socket, whatever step failed
        return 0

    def _prepare_runtime_dir(self) -> None:
        os.makedirs(self.runtime_dir, mode=0o700, exist_ok=True)
        os.chmod(self.runtime_dir, 0o700)  # owner-only: who can connect is who can enter it
        path = os.path.join(self.runtime_dir, FILE_NAME)
        try:
            with open(path, "rb") as f:
                other = msgspec.json.decode(f.read(), type=gateway.ConnectionFile)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return
        if other.pid != os.getpid() and _alive(other.pid):
            raise DaemonRunning(f"a deadstop daemon (pid {other.pid}, state directory {other.state_dir}) already "
                                f"serves {self.runtime_dir}; stop it, or give this one --runtime-dir")

    def _open_sockets(self) -> None:
        self.ctx = zmq.asyncio.Context()
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a push to a peer that is gone fails instead of vanishing
        # A disconnect is seen on the monitor socket by its connection's fd; each message says its fd
        # (SRCFD), so a provider that goes away is known at once, not at its next call.
        self.monitor = self.control.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._idents_of_fd: dict[int, set[bytes]] = {}
        self.events = self.ctx.socket(zmq.PUB)
        self.events.setsockopt(zmq.LINGER, 0)
        self.events.setsockopt(zmq.SNDHWM, 100_000)  # past it, a slow subscriber loses messages (seq shows the gap)
        # Sends go through plain (blocking-API) shadows of the same sockets with NOBLOCK: an error is
        # raised here, at once, instead of landing in a future nobody reads.
        self._control_out: zmq.Socket[bytes] = zmq.Socket.shadow(self.control.underlying)
        self._events_out: zmq.Socket[bytes] = zmq.Socket.shadow(self.events.underlying)
        control_ep = f"ipc://{os.path.join(self.runtime_dir, 'control')}"
        events_ep = f"ipc://{os.path.join(self.runtime_dir, 'events')}"
        for ep in (control_ep, events_ep):
            _unlink(ep)
        self.control.bind(control_ep)
        self.events.bind(events_ep)
        for ep in (control_ep, events_ep):
            os.chmod(ep[len("ipc://"):], 0o600)
        self.endpoints = {"control": [control_ep], "events": [events_ep]}

    def _write_connection_file(self) -> None:
        info = gateway.ConnectionFile(control=self.endpoints["control"], events=self.endpoints["events"],
                                      pid=os.getpid(), started=self.started, state_dir=self.sup.state_dir,
                                      supervisor_id=self.sup.id)
        path = os.path.join(self.runtime_dir, FILE_NAME)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(msgspec.json.encode(info))
        os.replace(tmp, path)  # clients never read a half-written file

    def _remove_connection_file(self) -> None:
        path = os.path.join(self.runtime_dir, FILE_NAME)
        try:
            with open(path, "rb") as f:
                mine = msgspec.json.decode(f.read(), type=gateway.ConnectionFile).pid == os.getpid()
            if mine:
                os.unlink(path)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            pass

    # -- configuration ---------------------------------------------------------------------------------
    def _apply_config(self, cfg: config_mod.DaemonConfig) -> dict[str, list[str]]:
        for tool in cfg.tools:
            if tool.target is None:
                self.providers.declare(tool.name)
            else:
                self.sup.register_tool(tool.name, tool.target)
        for agent in cfg.agents:
            self.sup.register_agent(agent.name, agent.target, **agent.options)
        return {"agents": [a.name for a in cfg.agents], "tools": [t.name for t in cfg.tools]}

    def reload(self) -> dict[str, Any]:
        """Re-read agents and tools; live runs keep what they started with. ConfigError leaves all as it was."""
        cfg = config_mod.load(self.config_path)
        if (cfg.grace, cfg.containment, cfg.isolation) != (self.config.grace, self.config.containment,
                                                           self.config.isolation):
            log.warning("deadstop: [defaults] changed; they apply at the next start of the daemon")
        applied = self._apply_config(cfg)
        for name in {a.name for a in self.config.agents} - set(applied["agents"]):
            self.sup.registry.agents.pop(name, None)  # gone from the file: no new session may use it
        self.config = cfg
        return applied

    def _reload_from_signal(self) -> None:
        try:
            self.reload()
            log.info("deadstop: configuration reloaded (SIGHUP)")
        except Exception as exc:  # a bad file changes nothing
            log.error("deadstop: reload failed, configuration unchanged: %s", exc)

    # -- requests ------------------------------------------------------------------------------------------
    async def _read(self) -> None:
        while True:
            received: list[list[zmq.Frame]] = [await self.control.recv_multipart(copy=False)]
            while len(received) < BATCH:
                try:
                    received.append(self._control_out.recv_multipart(flags=zmq.NOBLOCK, copy=False))
                except zmq.Again:
                    break
            for frames in received:  # which connection each peer is on
                self._idents_of_fd.setdefault(int(frames[-1].get(zmq.SRCFD)), set()).add(frames[0].bytes)
            parsed = [self._parse([f.bytes for f in frames]) for frames in received]
            requests = [p for p in parsed if p is not None]
            requests.sort(key=lambda p: gateway.verb_of(p[2]).name not in gateway.URGENT_VERBS)
            for ident, req_id, request in requests:
                task = asyncio.get_running_loop().create_task(self._answer(ident, req_id, request))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _watch_connections(self) -> None:
        from zmq.utils.monitor import parse_monitor_message

        while True:
            fd = int(parse_monitor_message(await self.monitor.recv_multipart())["value"])  # an Event flag: as int
            for ident in self._idents_of_fd.pop(fd, ()):
                # The fd may already carry a new connection: a peer that still takes a ping is not gone.
                if self._send(ident, gateway.PUSH_ID, PING):
                    self._idents_of_fd.setdefault(fd, set()).add(ident)
                else:
                    self.providers.gone(ident)

    def _parse(self, frames: list[bytes]) -> tuple[bytes, bytes, Any] | None:
        ident = frames[0]
        if len(frames) != 4:
            self._send(ident, frames[2] if len(frames) > 2 else b"?", gateway.fault(ControlFault(
                Fault.BAD_ARGUMENTS, f"a request is 3 frames (version, id, body), not {len(frames) - 1}")))
            return None
        _ident, version, req_id, body = frames
        if version != gateway.VERSION:
            self._send(ident, req_id, gateway.fault(ControlFault(
                Fault.UNSUPPORTED_VERSION, f"version {version[:16]!r} is not spoken here; this daemon speaks "
                                           f"{gateway.VERSION.decode()}")))
            return None
        try:
            return ident, req_id, gateway.decode_request(body)
        except ControlFault as exc:
            self._send(ident, req_id, gateway.fault(exc))
            return None

    async def _answer(self, ident: bytes, req_id: bytes, request: Any) -> None:
        who = principal_of(ident)
        try:
            result = await self._dispatch(ident, who, request)
            body = gateway.ok(msgspec.to_builtins(result))
        except ControlFault as exc:
            body = gateway.fault(exc)
        except Exception as exc:
            body = gateway.fault(fault_of(exc))
        self._send(ident, req_id, body)

    async def _dispatch(self, ident: bytes, who: Principal, request: Any) -> Any:
        verb = gateway.verb_of(request)
        if verb.name not in gateway.DAEMON_VERBS:
            return await self.sup.control.call(who, request)
        self.sup.control.policy.check_scope(who, verb)
        if isinstance(request, gateway.ToolsProvide):
            return self.providers.provide(ident, request.names)
        if isinstance(request, gateway.ToolsResult):
            return self.providers.result(ident, request)
        if isinstance(request, gateway.DaemonInfo):
            return self.info()
        if isinstance(request, gateway.DaemonReload):
            try:
                return self.reload()
            except config_mod.ConfigError as exc:
                raise ControlFault(Fault.BAD_ARGUMENTS, f"reload refused, configuration unchanged: {exc}") from None
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
                "gateway_version": gateway.VERSION.decode()}

    def _send(self, ident: bytes, req_id: bytes, body: bytes) -> bool:
        try:
            self._control_out.send_multipart([ident, gateway.VERSION, req_id, body], flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False  # the client is gone or not reading: its reply is dropped, nothing waits on it

    def _push(self, ident: bytes, body: bytes) -> None:
        if not self._send(ident, gateway.PUSH_ID, body):
            self.providers.gone(ident)

    def _session_of(self, run_id: str) -> str | None:
        run = self.sup.find_run(run_id)
        return run.owner.key if run is not None and run.owner is not None else None

    # -- events -------------------------------------------------------------------------------------------
    async def _publish(self) -> None:
        daemon = Principal("library", "daemon event stream")
        async for event in self.sup.control.subscribe(daemon, None):
            seq = self._seqs[event.session] = self._seqs.get(event.session, 0) + 1
            message = gateway.EventMessage(seq=seq, session=event.session, run_id=event.run_id, kind=event.kind,
                                           data=event.data, t_ns=event.t_ns, generation=event.generation)
            try:
                self._events_out.send_multipart([gateway.event_topic(event.session), msgspec.json.encode(message)],
                                                flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass


def principal_of(ident: bytes) -> Principal:
    """The caller a connection on the owner-only ipc endpoint stands for, from its routing id."""
    kind, _, rest = ident.decode(errors="replace").partition("/")
    name = rest.rpartition("/")[0] or rest or "unnamed"
    if kind == "cli":
        return Principal("operator", name)
    if kind == "console":
        return Principal("console", name, ALL_SCOPES)
    return Principal("gateway", name if kind == "gateway" else ident.hex()[:16], ALL_SCOPES)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink(endpoint: str) -> None:
    try:
        os.unlink(endpoint[len("ipc://"):])
    except FileNotFoundError:
        pass


def serve(config_path: str | None, *, state_dir: str, runtime_dir: str, binds: list[str] | None = None) -> int:
    """Run a daemon in this process until it is told to stop; the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    daemon = Daemon(config_path, state_dir=state_dir, runtime_dir=runtime_dir, binds=binds)
    return asyncio.run(daemon.run())


__all__ = ["Daemon", "DaemonRunning", "principal_of", "serve"]
