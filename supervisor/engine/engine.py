"""The run engine: starts runs, routes the broker's callbacks to them, publishes events.

It knows runs, not sessions: a run's owner (a session, or nothing) is a
`RunOwner`, and the session layer builds on the engine from above
(facades/async_supervisor.py). The engine owns, for its lifetime: a runtime directory (sockets, mode 0700), the
journal, the egress broker, the spawner process and, where cgroup v2 is
writable, a cgroup subtree. Containment is probed once here and the chosen
layer is named in every report.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from typing import Any, AsyncIterator, Callable, Sequence

import cloudpickle
import psutil

from ...ipc import framing, spawner_wire
from ..egress.broker import Broker
from ..mechanisms.cgroups import Cgroup, CgroupTree, InotifyWatcher
from ..mechanisms.containment import (CGROUP, PGROUP, PGROUP_SUBREAPER, CgroupContainment, Containment,
                                    ProcessGroupContainment, RunIdentity)
from ..errors import (ContainmentDegraded, DeadstopError, InvalidTarget, RunNotFound, SupervisorClosed)
from ..mechanisms import isolation as iso
from ..mechanisms.identities import DEFAULT_UID_RANGE, IdentityPool
from ..store.journal import Journal
from ..mechanisms.statelock import StateLock
from ..host.recovery import recover
from ..mechanisms import leftovers
from ..mechanisms.cgroup_v1 import V1Tree
from ..errors import LimitUnenforceable
from ..mechanisms.limits import TOKEN_KEYS, KernelLimits, Limits, LimitSupport, rlimits_for
from ..store.report import StopReport
from .events import Event, Subscription
from .run import AsyncRun, RunOwner, RunServices
from ..host.spawner_client import SpawnerClient
from .states import LIVE, RunState
from .stop import RevokeSource, StopMode, StopRequest, abort_start
from ..egress.tools import ToolRegistry

log = logging.getLogger("deadstop")

CONTAINMENT_CHOICES = ("auto", CGROUP, "process-group")

#: Ended runs kept as objects, newest first out, so that a caller who just saw a
#: run end can still read its result from it; every older run is only its
#: stored record (ControlAPI.run_info). Memory is O(live runs + this).
ENDED_RETAINED = 256


class Engine:
    """Start runs, broker their egress, stop them for good.

    Options (AsyncSupervisor passes its own through):

    state_dir     where the journal lives (default: a temporary directory
                  removed at close); pass one to keep the journal.
    containment   "auto" (strongest available), "cgroup" (fail if cgroup v2
                  is not writable) or "process-group" (force the fallback).
    grace         default seconds between SIGTERM and SIGKILL.
    isolation     "auto" (every layer the host gives; `sup.isolation` names
                  the missing ones), "strict" (refuse to open unless every
                  layer is there) or "off" (trusted code: runs share the
                  supervisor's identity, namespaces and environment).
    uid_range     (first uid, count) that per-run identities come from.
    spawner_timeout  seconds the spawner may take to answer a start; past
                  that it is declared lost and every run is killed through
                  its cgroup.
    """

    def __init__(self, *, state_dir: str | None = None, containment: str = "auto", grace: float = 1.0,
                 max_request_bytes: int = framing.MAX_REQUEST_BYTES, tool_threads: int = 32,
                 sample_interval: float = 0.1, isolation: str = "auto",
                 uid_range: tuple[int, int] = DEFAULT_UID_RANGE, spawner_timeout: float = 10.0):
        if containment not in CONTAINMENT_CHOICES:
            raise ValueError(f"containment must be one of {CONTAINMENT_CHOICES}, not {containment!r}")
        if isolation not in iso.ISOLATION_CHOICES:
            raise ValueError(f"isolation must be one of {iso.ISOLATION_CHOICES}, not {isolation!r}")
        self._isolation_choice = isolation
        self._spawner_timeout = spawner_timeout
        self._uid_range = uid_range
        self.identities: IdentityPool | None = None
        if grace < 0:
            raise ValueError("grace must be >= 0")
        self.id = secrets.token_hex(4)
        self._state_dir_arg = state_dir
        self._containment_choice = containment
        self.grace = grace
        self._max_request_bytes = max_request_bytes
        self._tool_threads = tool_threads
        self.tools = ToolRegistry()
        self.runs: dict[str, AsyncRun] = {}  # live runs (starting, running, paused, stopping)
        self._ended: collections.OrderedDict[str, AsyncRun] = collections.OrderedDict()
        self._subscribers: list[Subscription] = []
        self._sampler: asyncio.Task | None = None
        self._sampled: dict[str, AsyncRun] = {}  # live runs whose limits need sampling
        self.sample_interval = sample_interval
        self.closed = False
        self._opened = False
        self.containment_degraded_reason = ""

    # -- lifecycle -------------------------------------------------------------
    async def open(self) -> "Engine":
        self.loop = asyncio.get_running_loop()
        self.state_dir = self._state_dir_arg or tempfile.mkdtemp(prefix="deadstop-state-")
        os.makedirs(self.state_dir, exist_ok=True)
        self._state_lock = StateLock(self.state_dir, self.id)  # StateDirInUse before anything is touched
        try:
            self.journal = Journal(os.path.join(self.state_dir, "journal.db"))
            self.journal.bind(self.loop)
            self.recovered = await recover(self.journal, self.id)
            # After the journal's recovery (which records what it kills), before our own dirs exist.
            self.leftovers_removed = await leftovers.sweep()
            self.runtime_dir = leftovers.make_runtime_dir(self.id)
        except BaseException:
            self._state_lock.release()
            raise
        self._loaded()
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
        # Kernel limits: v2 controllers where delegated, else v1 memory/pids
        # hierarchies (hybrid hosts), whatever the containment layer.
        self.v1 = V1Tree.create(self.id)
        self.limit_support = LimitSupport(self.cgroups, self.containment_degraded_reason, self.v1)
        self.broker = Broker(self.loop, framing.ipc_address(self.runtime_dir, "egress"), self.journal, self.tools,
                             self, max_request_bytes=self._max_request_bytes, tool_threads=self._tool_threads)
        isolated = self._isolation_choice != "off"
        self.spawner = await SpawnerClient.launch(self.cgroups.child("spawner") if self.cgroups else None,
                                                  env=iso.spawner_environment() if isolated else None,
                                                  isolated=isolated)
        self.spawner.on_lost = self._spawner_lost
        self.spawner.answer_timeout = self._spawner_timeout
        try:
            await self._probe_isolation()
            # What the spawner (and its watchdog) must kill should we die.
            self.spawner.configure(spawner_wire.Config(
                cgroup_root=self.cgroups.root.path if self.cgroups else None,
                home_procs=self.cgroups.home_procs if self.cgroups else None,
                uid_block=[self.identities.first, self.identities.size] if self.identities else None))
        except BaseException:
            await self.spawner.shutdown()
            self.broker.close()
            if self.cgroups is not None:
                self.cgroups.remove()
            self.v1.remove()
            self.journal.close()
            self._cleanup_dirs()
            raise
        if self.cgroups is not None:
            self.containment = CGROUP
        else:
            self.containment = PGROUP_SUBREAPER if self.spawner.subreaper else PGROUP
        self._services = RunServices(self.loop, self.journal, self.broker, self.spawner, self.watcher,
                                     self.run_finished)
        me = psutil.Process()
        self.journal.supervisor_started(self.id, me.pid, me.create_time(), self.containment)
        self._opened = True
        return self

    async def close(self) -> None:
        """Kill every live run (revoke first), stop the spawner, remove sockets and cgroups."""
        if self.closed:
            return
        self.closed = True
        if not self._opened:
            return
        self._closing()
        live = [r for r in self.runs.values() if r.state in LIVE and r.containment is not None]
        results = await asyncio.gather(
            *(r.kill(source="supervisor", reason="supervisor closing") for r in live), return_exceptions=True)
        for r, res in zip(live, results):
            if isinstance(res, BaseException):
                log.error("run %s: kill at close failed: %s", r.id, res)
        await self.spawner.shutdown()
        self.broker.close()
        for sub in self._subscribers:
            sub.close()
        if self._sampler is not None:
            self._sampler.cancel()
        if self.watcher is not None:
            self.watcher.close()
        if self.cgroups is not None:
            self.cgroups.remove()
        self.v1.remove()
        if self.identities is not None:
            self.identities.close()
        self.journal.supervisor_ended(self.id)
        self.journal.close()
        self._cleanup_dirs()

    def _loaded(self) -> None:
        """Hook: the journal is open and recovered (the session layer rebuilds its sessions here)."""

    def _closing(self) -> None:
        """Hook: close() began and nothing new may start (the session layer drops its queues here)."""

    def owner_of(self, key: str) -> RunOwner | None:
        """The owner named `key` (its events are fenced by its generation), if any."""
        return None

    async def _probe_isolation(self) -> None:
        """Find which isolation layers this host gives (once), and refuse if strict and any is missing."""
        mode = self._isolation_choice
        if mode == "off":
            self.isolation = iso.profile_from_probe(mode, {})
            return
        if os.geteuid() == 0:
            self.identities = IdentityPool(self._uid_range)
        probe_uid = self.identities.allocate() if self.identities else None
        try:
            results = await self.spawner.probe(iso.probe_plan(probe_uid))
        finally:
            self._release_uid(probe_uid)
        self.isolation = iso.profile_from_probe(mode, results)
        if mode == "strict" and self.isolation.missing:
            raise ContainmentDegraded(f"isolation='strict' but these layers are missing: {self.isolation.missing}")
        if self.isolation.missing:
            log.warning("deadstop: isolation degraded: %s", self.isolation)
        if self.isolation.has("identity"):
            os.chmod(self.runtime_dir, 0o711)  # runs traverse it to their own endpoint, and list nothing
        self._voids = iso.make_voids(self.runtime_dir)
        paths = iso.interpreter_paths()
        if probe_uid is not None:
            run_uid, run_gid = probe_uid, probe_uid  # any run uid sees the host as every other does
        else:
            run_uid, run_gid = os.geteuid(), os.getegid()
        self._planners = {tmp: iso.base_planner(run_uid, run_gid, tmp, paths) for tmp in (False, True)}
        essential = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))}
        self._unreadable_interpreter = iso.unreadable(sorted(essential), run_uid, run_gid) if probe_uid else []

    def _cleanup_dirs(self) -> None:
        self._state_lock.release()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        if self._state_dir_arg is None:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def _spawner_lost(self) -> None:
        if self.closed:
            return
        why = self.spawner.lost_reason
        log.error("deadstop: %s; killing every live run through its containment", why)
        for run in list(self.runs.values()):
            if run.state in LIVE and run.containment is not None:
                self.loop.create_task(run.kill(source="spawner", reason=why))

    # -- tools -----------------------------------------------------------------------
    def register_tool(self, name: str, fn: Callable[..., Any]) -> None:
        """Make `fn` callable from runs whose allow-list names `name`."""
        self.tools.register(name, fn)

    # -- runs ----------------------------------------------------------------------------
    def check_open(self) -> None:
        if self.closed:
            raise SupervisorClosed("supervisor is closed")
        if not self._opened:
            raise SupervisorClosed("supervisor is not open: use 'async with AsyncSupervisor()' or await open()")
        if not self.spawner.alive:
            raise SupervisorClosed(f"{self.spawner.lost_reason}: every run was killed; open a new supervisor")

    @staticmethod
    def prepare_target(target: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[str, str, bytes | None, list[str] | None]:
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
                    cwd: str | None = None, limits: Limits | None = None, network: str = "none",
                    private_tmp: bool | None = None) -> AsyncRun:
        """Start `target` as a new run in its own process group (and cgroup).

        Under isolation the run starts from a clean environment (a few host
        variables, HOME = cwd, then `env`), in `cwd` (which its own uid must
        be able to use; default "/"), with no network but its own loopback
        unless network="host", and with a private /tmp if private_tmp (the
        default under isolation="strict").
        """
        self.check_open()
        kind, desc, blob, argv = self.prepare_target(target, args, kwargs or {})
        return await self.launch(kind, desc, blob, argv, list(tools), grace, env, cwd,
                                  limits=Limits.coerce(limits), network=network, private_tmp=private_tmp)

    def check_run_options(self, tools: Sequence[str], cwd: str | None, network: str) -> None:
        """Refuse what no run could use, at registration instead of at the first message."""
        self._check_tools(tools)
        if network not in iso.NETWORK_CHOICES:
            raise ValueError(f"network must be one of {iso.NETWORK_CHOICES}, not {network!r}")
        if cwd is not None and not os.path.isdir(cwd):
            raise InvalidTarget(f"cwd {cwd!r} is not a directory")

    def _check_tools(self, tools: Sequence[str]) -> None:
        for name in tools:
            if name not in self.tools:
                raise InvalidTarget(f"tool {name!r} is not registered (registered: {self.tools.names()})")

    async def launch(self, kind: str, desc: str, blob: bytes | None, argv: list[str] | None, tools: list[str],
                     grace: float | None, env: dict[str, str] | None, cwd: str | None, *,
                     limits: Limits | None = None, owner: RunOwner | None = None,
                     inbox: dict[str, Any] | None = None, network: str = "none",
                     private_tmp: bool | None = None) -> AsyncRun:
        """Start a prepared target (see prepare_target) as a run of `owner` (a session, or none)."""
        if grace is not None and grace < 0:
            raise ValueError("grace must be >= 0")
        self.check_run_options(tools, cwd, network)
        plan = self.check_limits(limits)  # LimitUnenforceable before anything exists
        run_id = secrets.token_hex(framing.RUN_ID_CHARS // 2)
        try:
            kernel = KernelLimits.create(run_id, limits, plan, self.v1)  # v1 groups, limits written
        except OSError as exc:
            raise LimitUnenforceable(f"run {run_id}: cannot set its kernel limits {plan}: {exc}") from exc
        uid = self.identities.allocate() if self.identities is not None and self.isolation.has("identity") else None
        try:
            confined = self._confinement(run_id, uid, argv, cwd, env, network, private_tmp)
        except BaseException:
            self._release_uid(uid)
            if kernel is not None:
                kernel.cleanup()
            raise
        credential = framing.new_credential()
        cgroup = self.cgroups.child(f"run-{run_id}") if self.cgroups else None
        if kernel is not None:
            try:
                kernel.apply_v2(cgroup)
            except OSError as exc:
                if cgroup is not None:
                    cgroup.remove()
                kernel.cleanup()
                if confined.endpoint_dir:
                    shutil.rmtree(confined.endpoint_dir, ignore_errors=True)
                self._release_uid(uid)
                raise LimitUnenforceable(f"run {run_id}: cannot set its kernel limits {plan}: {exc}") from exc
        generation = owner.generation if owner is not None else 0
        self.journal.run_created(run_id, self.id, kind, desc, tools, self.containment, cgroup.path if cgroup else None,
                                 owner.key if owner else None, generation)
        channel = self.broker.open_channel(run_id, credential, frozenset(tools), generation,
                                           owner.gen if owner is not None else None,
                                           limits.tool_calls if limits else None,
                                           peer_uid=uid, peer_gid=uid, endpoint_dir=confined.endpoint_dir)
        run = AsyncRun(self._services, run_id, kind, desc, tools, self.grace if grace is None else grace, channel,
                       owner=owner, limits=limits, inbox=inbox)
        run.uid = uid
        run.kernel_limits, run.limits_enforcement = kernel, plan
        run.isolation = confined.summary
        self.runs[run_id] = run
        msg = spawner_wire.Start(
            run_id=run_id, blob=blob, argv=argv, env=confined.env, clean_env=confined.clean_env,
            cwd=confined.cwd, cgroup_procs=cgroup.procs_file if cgroup else None, pin_group=cgroup is None,
            generation=generation, egress=channel.address, supervisor_pid=os.getpid(),
            rlimits=rlimits_for(limits, plan), sandbox=confined.plan,
            # v1 memory/pids groups, joined (as root, before any user code) right after the v2 cgroup
            join_cgroups=kernel.join_files() if kernel is not None else [])
        cred_fd = framing.credential_memfd(credential)
        try:
            started = await self.spawner.start(msg, cred_fd)
        except BaseException as exc:
            why = "start cancelled" if isinstance(exc, asyncio.CancelledError) else f"start failed: {exc}"
            layer = self._cgroup_layer(cgroup) if cgroup is not None else None
            report = abort_start(run, layer, why)
            self.broker.close_channel(run_id)
            if cgroup is not None:
                cgroup.remove()  # if still populated, close() removes the subtree after the spawner is gone
            self.journal.run_ended(run_id, RunState.FAILED.value, report.reaped_at, None, None, report.to_dict())
            if kernel is not None:
                kernel.cleanup()  # kills a child forked before the cancel, removes the v1 groups
            self._forget_confinement(run)
            self._retire(run)
            if isinstance(exc, (DeadstopError, asyncio.CancelledError)):
                raise
            raise DeadstopError(f"run {run_id} could not be started: {exc}") from exc
        finally:
            os.close(cred_fd)
        run.attach(started.pid, started.create_time, started.pidfd,
                   self._containment_for(run_id, started.pid, cgroup, uid))
        if limits is not None and (limits.cpu_seconds or limits.memory_bytes or limits.processes):
            self._sampled[run.id] = run
            self._ensure_sampler()
        return run

    def _confinement(self, run_id: str, uid: int | None, argv: list[str] | None, cwd: str | None,
                     env: dict[str, str] | None, network: str, private_tmp: bool | None) -> iso.Confinement:
        """The run's sandbox plan, environment and endpoint; InvalidTarget if its cwd is unusable."""
        if self.isolation.mode == "off":
            return iso.Confinement(None, dict(env or {}), False, cwd, None, {"mode": "off", "network": "host"})
        if private_tmp is None:
            private_tmp = self.isolation.mode == "strict"
        workdir = os.path.abspath(cwd) if cwd else "/"
        if uid is not None:
            why = iso.check_workspace(workdir, uid, uid)
            if why:
                raise InvalidTarget(why)
            blocked = self._unreadable_interpreter + iso.unreadable(
                [a for a in argv or () if os.path.isabs(a)], uid, uid)
            if blocked:
                raise InvalidTarget(f"the run's own uid could not read {', '.join(blocked)} even inside its "
                                    "namespace (the mode itself refuses others); make it world-readable, "
                                    "or pass isolation='off' for trusted code")
        endpoint_dir = None
        if uid is not None:
            endpoint_dir = os.path.join(self.runtime_dir, f"r-{run_id}")
            os.mkdir(endpoint_dir, 0o710)
            os.chown(endpoint_dir, 0, uid)
        plan = iso.sandbox_plan(self.isolation, run_id, uid, workdir, argv, network,
                                self._planners[bool(private_tmp)], endpoint_dir, self._voids,
                                masks=self.journal.files() + [self._state_lock.path, self.state_dir])
        summary = {**self.isolation.to_dict(), "network": network, "private_tmp": private_tmp}
        if network == "host":
            summary["missing"] = {**summary["missing"], "namespace:network": "network='host': the run is unconfined"}
            summary["active"] = [n for n in summary["active"] if n != "namespace:network"]
        return iso.Confinement(plan, iso.run_environment(env, workdir), True, workdir, endpoint_dir, summary)

    def _release_uid(self, uid: int | None) -> None:
        if uid is not None and self.identities is not None:
            self.identities.release(uid)

    def _cgroup_layer(self, cgroup: Cgroup, identity: RunIdentity | None = None) -> CgroupContainment:
        assert self.watcher is not None and self.cgroups is not None  # a run has a cgroup only then
        return CgroupContainment(cgroup, self.watcher, self.cgroups.has_kill, identity)

    def _forget_confinement(self, run: AsyncRun) -> None:
        """Give back what the run's confinement held: its endpoint directory, then its uid."""
        endpoint_dir = os.path.join(self.runtime_dir, f"r-{run.id}")
        try:
            os.rmdir(endpoint_dir)  # empty: the broker removed the socket when it closed the endpoint
        except FileNotFoundError:
            pass
        except OSError:
            shutil.rmtree(endpoint_dir, ignore_errors=True)
        self._release_uid(run.uid)

    def check_limits(self, limits: Limits | None) -> dict[str, str]:
        """How each limit would be enforced here (limit -> mechanism); raises
        LimitUnenforceable for a memory_bytes / processes limit no kernel
        controller can enforce, unless Limits(enforcement="sampled")."""
        if limits is not None and not isinstance(limits, Limits):
            raise InvalidTarget(f"limits must be a Limits, not {type(limits).__name__}")
        return self.limit_support.plan(limits)

    @property
    def limit_enforcement(self) -> dict[str, str]:
        """memory_bytes / processes -> the kernel mechanism this host offers, or "sampled only: <why>"."""
        return self.limit_support.describe()

    def _containment_for(self, run_id: str, pid: int, cgroup: Cgroup | None, uid: int | None) -> Containment:
        if cgroup is not None:
            identity = RunIdentity(uid, f"{framing.ENV_MARKER}={run_id}".encode(),
                                   self.spawner.pid if self.spawner.subreaper else None,
                                   lambda: {r.pid for r in self.runs.values() if r.pid is not None and r.pid != pid})
            return self._cgroup_layer(cgroup, identity)
        return ProcessGroupContainment(pid, f"{framing.ENV_MARKER}={run_id}", self.spawner.pid, self.spawner.subreaper,
                                       uid=uid)

    async def stop_all(self, grace: float | None = None, *, source: str = "api",
                       reason: str = "stop all") -> list[StopReport]:
        """Stop every live run at once (concurrently); returns their reports in start order."""
        live = [r for r in self.runs.values() if r.state in LIVE and r.containment is not None]
        return list(await asyncio.gather(*(r.stop(grace, source=source, reason=reason) for r in live)))

    def find_run(self, run_id: str) -> AsyncRun | None:
        """The run if it is in memory: live, or among the ENDED_RETAINED newest ended ones."""
        return self.runs.get(run_id) or self._ended.get(run_id)

    def get_run(self, run_id: str) -> AsyncRun:
        run = self.find_run(run_id)
        if run is None:
            raise RunNotFound(f"no run {run_id!r} in memory of supervisor {self.id} (an ended run's record "
                              "stays in the store: ControlAPI.run_info / Supervisor.run_records)")
        return run

    def runs_in_memory(self) -> list[AsyncRun]:
        """The retained ended runs (oldest first), then the live ones."""
        return list(self._ended.values()) + list(self.runs.values())

    def forget_runs(self, run_ids: Sequence[str]) -> None:
        """Drop ended runs whose records were removed (session cleanup)."""
        for run_id in run_ids:
            self._ended.pop(run_id, None)

    def _retire(self, run: AsyncRun) -> None:
        """The run's report is stored: it leaves the live table; only the newest few stay as objects."""
        self.runs.pop(run.id, None)
        self._ended[run.id] = run
        while len(self._ended) > ENDED_RETAINED:
            self._ended.popitem(last=False)

    def run_finished(self, run: AsyncRun) -> None:
        self._retire(run)
        self._sampled.pop(run.id, None)
        self.broker.close_channel(run.id)
        self.spawner.run_ended(run.id)
        if run.report is not None and run.report.survivors:
            run.uid = None  # quarantined: a uid is reused only once nothing of its run lives
        self._forget_confinement(run)
        if run.owner is not None:
            run.owner.run_ended(run)
        self._publish(Event(run.id, "run.ended", {"state": run.state.value}, time.monotonic_ns(),
                            run.owner.key if run.owner else None, run.generation))

    # -- BrokerSink --------------------------------------------------------------------------
    def _stale(self, run: AsyncRun | None) -> bool:
        return run is not None and run.owner is not None and not run.owner.is_current(run.generation)

    def on_event(self, run_id: str, kind: str, data: Any, t_ns: int) -> None:
        run = self.runs.get(run_id)
        if run is not None and self._stale(run):
            self.journal.fenced(run_id, t_ns, "emit", f"event {kind!r} of generation {run.generation}")
            return
        self._publish(Event(run_id, kind, data, t_ns, run.owner.key if run and run.owner else None,
                            run.generation if run else 0))

    def on_result(self, run_id: str, value: Any) -> None:
        run = self.runs.get(run_id)
        if run is None:
            return
        run.set_result(value)
        if run.owner is not None and not run.owner.offer_answer(run, value):
            self.journal.fenced(run_id, time.monotonic_ns(), "result",
                                f"result of generation {run.generation}; its owner is at {run.owner.generation}")

    def on_failure(self, run_id: str, type_name: str, message: str, traceback: str) -> None:
        run = self.runs.get(run_id)
        if run is not None:
            run.set_failure(type_name, message, traceback)

    def on_usage(self, run_id: str, tool: str, usage: dict[str, float]) -> None:
        run = self.runs.get(run_id)
        if run is not None:
            tokens = sum(v for k, v in usage.items() if k in TOKEN_KEYS)
            if tokens:
                run.add_tokens(tokens)

    def on_quota(self, run_id: str, limit: str) -> None:
        run = self.runs.get(run_id)
        if run is not None:
            run.quota(limit)

    def on_abuse(self, run_id: str, detail: str) -> None:
        """The broker revoked a run for spending its refusal budget: stop it (source "abuse").

        A run still starting has no containment to signal yet: it is left
        revoked (nothing it asks for happens) and is not stopped here.
        """
        run = self.runs.get(run_id)
        if run is not None and run.machine.live and run._stop_task is None and run.containment is not None:
            run._begin(StopRequest(StopMode.STOP, RevokeSource.ABUSE, detail, run.grace, time.monotonic_ns()))

    def inbox_of(self, run_id: str) -> Any:
        run = self.runs.get(run_id)
        return run.inbox if run is not None else None

    def state_of(self, run_id: str) -> str:
        run = self.runs.get(run_id)
        return run.state.value if run else "unknown"

    # -- events ------------------------------------------------------------------------------
    def _publish(self, event: Event) -> None:
        for sub in self._subscribers:
            if sub.session is None or sub.session == event.session:
                sub.offer(event)

    async def events(self, session: str | None = None) -> AsyncIterator[Event]:
        """Events emitted by runs (of one session, or all), plus run.ended, until close.

        Stale output fence: an event is checked again as it is handed out; if
        its session has moved to a newer generation meanwhile, it is dropped
        (and journaled as fenced) instead of delivered.

        A subscriber that falls behind by SUBSCRIBER_BACKLOG events loses the
        newest ones (never a `run.ended`), and then receives one
        `events.dropped` event whose data says how many it missed, so the
        supervisor's memory does not grow with a slow reader.
        """
        entry = Subscription(session)
        self._subscribers.append(entry)
        try:
            while True:
                event = await entry.get()
                if event is None:
                    return
                owner = self.owner_of(event.session) if event.session else None
                if owner is not None and event.kind not in ("run.ended", "events.dropped") \
                        and not owner.is_current(event.generation):
                    self.journal.fenced(event.run_id, time.monotonic_ns(), "emit",
                                        f"event {event.kind!r} of generation {event.generation} held back at delivery")
                    continue
                yield event
        finally:
            self._subscribers.remove(entry)

    # -- sampling ---------------------------------------------------------------------------------
    def _ensure_sampler(self) -> None:
        if self._sampler is None or self._sampler.done():
            self._sampler = self.loop.create_task(self._sample_forever(), name="deadstop-sampler")

    async def _sample_forever(self) -> None:
        """CPU, memory and process counts of live runs with such limits, every sample_interval.

        Walks only the runs that asked for it and are still live (`_sampled`,
        emptied as runs end), never every run ever started.
        """
        while not self.closed:
            if not self._sampled:
                return
            watched = [r for r in self._sampled.values() if r.state is RunState.RUNNING]
            for run in watched:
                try:
                    run.sample()
                except Exception:  # the run ended under us
                    continue
            await asyncio.sleep(self.sample_interval)
