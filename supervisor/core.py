"""AsyncSupervisor: the asyncio core. Everything else is a thin wrapper.

It owns, for its lifetime: a runtime directory (sockets, mode 0700), the
journal, the egress broker, the spawner process and, where cgroup v2 is
writable, a cgroup subtree. Containment is probed once here and the chosen
layer is named in every report.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import shutil
import tempfile
import time
from typing import Any, AsyncIterator, Callable, Sequence

import cloudpickle
import psutil

from ipc import framing
from supervisor.broker import Broker
from supervisor.cgroups import CgroupTree, InotifyWatcher
from supervisor.containment import (CGROUP, PGROUP, PGROUP_SUBREAPER, CgroupContainment, Containment,
                                    ProcessGroupContainment)
from supervisor.errors import ContainmentDegraded, DeadstopError, InvalidTarget, RunNotFound, SupervisorClosed
from supervisor.journal import Journal
from supervisor.run import AsyncRun
from supervisor.spawner_client import SpawnerClient
from supervisor.states import LIVE, RunState
from supervisor.tools import ToolRegistry

log = logging.getLogger("deadstop")

CONTAINMENT_CHOICES = ("auto", CGROUP, "process-group")


@dataclasses.dataclass(frozen=True)
class Event:
    """Something a run emitted (or a lifecycle change), as delivered to subscribers."""

    run_id: str
    kind: str
    data: Any
    t_ns: int


class AsyncSupervisor:
    """Start runs, broker their egress, stop them for good.

    Use as ``async with AsyncSupervisor() as sup:``. Options:

    state_dir     where the journal lives (default: a temporary directory
                  removed at close); pass one to keep the journal.
    containment   "auto" (strongest available), "cgroup" (fail if cgroup v2
                  is not writable) or "process-group" (force the fallback).
    grace         default seconds between SIGTERM and SIGKILL.
    """

    def __init__(self, *, state_dir: str | None = None, containment: str = "auto", grace: float = 1.0,
                 max_request_bytes: int = framing.MAX_REQUEST_BYTES, tool_threads: int = 32):
        if containment not in CONTAINMENT_CHOICES:
            raise ValueError(f"containment must be one of {CONTAINMENT_CHOICES}, not {containment!r}")
        if grace < 0:
            raise ValueError("grace must be >= 0")
        self.id = secrets.token_hex(4)
        self._state_dir_arg = state_dir
        self._containment_choice = containment
        self.grace = grace
        self._max_request_bytes = max_request_bytes
        self._tool_threads = tool_threads
        self.tools = ToolRegistry()
        self.runs: dict[str, AsyncRun] = {}
        self._subscribers: list[asyncio.Queue] = []
        self.closed = False
        self._opened = False
        self.containment_degraded_reason = ""

    # -- lifecycle -------------------------------------------------------------
    async def open(self) -> "AsyncSupervisor":
        self.loop = asyncio.get_running_loop()
        self.state_dir = self._state_dir_arg or tempfile.mkdtemp(prefix="deadstop-state-")
        os.makedirs(self.state_dir, exist_ok=True)
        self.runtime_dir = framing.make_runtime_dir()
        self.journal = Journal(os.path.join(self.state_dir, "journal.db"))
        self.journal.bind(self.loop)
        self.cgroups: CgroupTree | None = None
        self.watcher: InotifyWatcher | None = None
        if self._containment_choice != "process-group":
            self.cgroups, why = CgroupTree.create(self.id)
            if self.cgroups is None:
                if self._containment_choice == CGROUP:
                    self._cleanup_dirs()
                    raise ContainmentDegraded(f"cgroup containment required but unavailable: {why}")
                self.containment_degraded_reason = why
                log.warning("deadstop: cgroup v2 not usable (%s); using process groups", why)
            else:
                self.watcher = InotifyWatcher(self.loop)
        else:
            self.containment_degraded_reason = "process-group containment forced by configuration"
        self.broker = Broker(self.loop, framing.ipc_address(self.runtime_dir, "egress"), self.journal, self.tools,
                             self, max_request_bytes=self._max_request_bytes, tool_threads=self._tool_threads)
        self.spawner = await SpawnerClient.launch(self.cgroups.child("spawner") if self.cgroups else None)
        self.spawner.on_lost = self._spawner_lost
        if self.cgroups is not None:
            self.spawner.configure(cgroup_root=self.cgroups.root.path, home_procs=self.cgroups.home_procs)
            self.containment = CGROUP
        else:
            self.containment = PGROUP_SUBREAPER if self.spawner.subreaper else PGROUP
        me = psutil.Process()
        self.journal.supervisor_started(self.id, me.pid, me.create_time(), self.containment)
        self._opened = True
        return self

    async def __aenter__(self) -> "AsyncSupervisor":
        return await self.open()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Kill every live run (revoke first), stop the spawner, remove sockets and cgroups."""
        if self.closed:
            return
        self.closed = True
        if not self._opened:
            return
        live = [r for r in self.runs.values() if r.state in LIVE and r.containment is not None]
        results = await asyncio.gather(
            *(r.kill(source="supervisor", reason="supervisor closing") for r in live), return_exceptions=True)
        for r, res in zip(live, results):
            if isinstance(res, BaseException):
                log.error("run %s: kill at close failed: %s", r.id, res)
        await self.spawner.shutdown()
        self.broker.close()
        for q in self._subscribers:
            q.put_nowait(None)
        if self.watcher is not None:
            self.watcher.close()
        if self.cgroups is not None:
            self.cgroups.remove()
        self.journal.supervisor_ended(self.id)
        self.journal.close()
        self._cleanup_dirs()

    def _cleanup_dirs(self) -> None:
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        if self._state_dir_arg is None:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def _spawner_lost(self) -> None:
        if self.closed:
            return
        log.error("deadstop: spawner died; killing every live run")
        for run in list(self.runs.values()):
            if run.state in LIVE and run.containment is not None:
                self.loop.create_task(run.kill(source="spawner", reason="spawner process died"))

    # -- tools -----------------------------------------------------------------------
    def register_tool(self, name: str, fn: Callable[..., Any]) -> None:
        """Make `fn` callable from runs whose allow-list names `name`."""
        self.tools.register(name, fn)

    # -- runs ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise SupervisorClosed("supervisor is closed")
        if not self._opened:
            raise SupervisorClosed("supervisor is not open: use 'async with AsyncSupervisor()' or await open()")
        if not self.spawner.alive:
            raise SupervisorClosed("the spawner process died; open a new supervisor")

    @staticmethod
    def _prepare_target(target: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[str, str, bytes | None, list[str] | None]:
        if callable(target):
            try:
                blob = cloudpickle.dumps((target, tuple(args), dict(kwargs)))
            except Exception as exc:
                raise InvalidTarget(f"target {target!r} (or its arguments) cannot be pickled: {exc}") from exc
            name = getattr(target, "__qualname__", None) or repr(target)
            return "python", f"{getattr(target, '__module__', '?')}.{name}", blob, None
        if isinstance(target, (list, tuple)) and target and all(isinstance(a, str) for a in target):
            if args or kwargs:
                raise InvalidTarget("an argv target takes no extra arguments; put them in the list")
            argv = list(target)
            if os.sep not in argv[0] and shutil.which(argv[0]) is None:
                raise InvalidTarget(f"command {argv[0]!r} not found on PATH")
            if os.sep in argv[0] and not os.access(argv[0], os.X_OK):
                raise InvalidTarget(f"command {argv[0]!r} is not an executable file")
            return "argv", " ".join(argv)[:500], None, argv
        raise InvalidTarget(f"target must be a callable or a non-empty list of strings, not {type(target).__name__}")

    async def start(self, target: Any, *args: Any, tools: Sequence[str] = (), grace: float | None = None,
                    kwargs: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                    cwd: str | None = None) -> AsyncRun:
        """Start `target` as a new run in its own process group (and cgroup)."""
        self._check_open()
        tools = list(tools)
        for name in tools:
            if name not in self.tools:
                raise InvalidTarget(f"tool {name!r} is not registered (registered: {self.tools.names()})")
        if grace is not None and grace < 0:
            raise ValueError("grace must be >= 0")
        kind, desc, blob, argv = self._prepare_target(target, args, kwargs or {})
        run_id = secrets.token_hex(framing.RUN_ID_CHARS // 2)
        credential = framing.new_credential()
        cgroup = self.cgroups.child(f"run-{run_id}") if self.cgroups else None
        self.journal.run_created(run_id, self.id, kind, desc, tools, self.containment, cgroup.path if cgroup else None)
        channel = self.broker.open_channel(run_id, credential, frozenset(tools))
        run = AsyncRun(self, run_id, kind, desc, tools, self.grace if grace is None else grace, channel)
        self.runs[run_id] = run
        msg = {
            "run_id": run_id, "blob": blob, "argv": argv, "env": dict(env or {}), "cwd": cwd,
            "cgroup_procs": cgroup.procs_file if cgroup else None, "pin_group": cgroup is None,
            "credential": credential,
            "generation": channel.generation, "egress": self.broker.address,
            "supervisor_pid": os.getpid(),
        }
        try:
            started = await self.spawner.start(msg)
        except BaseException as exc:
            self.broker.revoke(channel, "supervisor", f"start failed: {exc}")
            run.machine.to(RunState.FAILED)
            if cgroup is not None:
                cgroup.remove()
            if isinstance(exc, DeadstopError):
                raise
            raise DeadstopError(f"run {run_id} could not be started: {exc}") from exc
        run.attach(started.pid, started.create_time, started.pidfd, self._containment_for(run_id, started.pid, cgroup))
        return run

    def _containment_for(self, run_id: str, pid: int, cgroup) -> Containment:
        if cgroup is not None:
            assert self.watcher is not None and self.cgroups is not None
            return CgroupContainment(cgroup, self.watcher, self.cgroups.has_kill)
        return ProcessGroupContainment(pid, f"{framing.ENV_MARKER}={run_id}", self.spawner.pid, self.spawner.subreaper)

    async def stop_all(self, grace: float | None = None, *, source: str = "api",
                       reason: str = "stop all") -> list:
        """Stop every live run at once (concurrently); returns their reports in start order."""
        live = [r for r in self.runs.values() if r.state in LIVE and r.containment is not None]
        return list(await asyncio.gather(*(r.stop(grace, source=source, reason=reason) for r in live)))

    def get_run(self, run_id: str) -> AsyncRun:
        try:
            return self.runs[run_id]
        except KeyError:
            raise RunNotFound(f"no run {run_id!r} in supervisor {self.id}") from None

    def run_finished(self, run: AsyncRun) -> None:
        self._publish(Event(run.id, "run.ended", {"state": run.state.value}, time.monotonic_ns()))

    # -- BrokerSink ------------------------------------------------------------------------
    def on_event(self, run_id: str, kind: str, data: Any, t_ns: int) -> None:
        self._publish(Event(run_id, kind, data, t_ns))

    def on_result(self, run_id: str, value: Any) -> None:
        run = self.runs.get(run_id)
        if run is not None:
            run.set_result(value)

    def on_failure(self, run_id: str, type_name: str, message: str, traceback: str) -> None:
        run = self.runs.get(run_id)
        if run is not None:
            run.set_failure(type_name, message, traceback)

    def on_usage(self, run_id: str, tool: str, usage: dict[str, float]) -> None:
        pass  # accounted per session (quotas) in the session layer

    def state_of(self, run_id: str) -> str:
        run = self.runs.get(run_id)
        return run.state.value if run else "unknown"

    # -- events ------------------------------------------------------------------------------
    def _publish(self, event: Event) -> None:
        for q in self._subscribers:
            q.put_nowait(event)

    async def subscribe(self) -> AsyncIterator[Event]:
        """Every event emitted by any run, plus run.ended, until the supervisor closes."""
        q: asyncio.Queue = asyncio.Queue()
        self._subscribers.append(q)
        try:
            while True:
                event = await q.get()
                if event is None:
                    return
                yield event
        finally:
            self._subscribers.remove(q)
