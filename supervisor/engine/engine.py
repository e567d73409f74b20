"""The run engine: starts runs, routes the broker's callbacks to them, publishes events.

It knows runs, not sessions: a run's owner (a session, or nothing) is a
`RunOwner`, and the session layer builds on the engine from above
(facades/async_supervisor.py). Nor does it touch the operating system: the
host (host/local.py) provisions, launches, contains and releases each run.
The engine owns, for its lifetime: the state directory's lock, the journal,
a runtime directory (sockets; mode 0700, 0711 under per-run identities), the
egress broker, and its host.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
from typing import Any, AsyncIterator, Callable, Sequence

import cloudpickle
import psutil

from ...ipc import framing
from ..egress.broker import Broker
from ..egress.mcp import McpServers, McpServerSpec, server_environment
from ..egress.proxy import PROXY_PORT, Proxy, RunProxy
from ..egress.tools import ToolCancelled, ToolRegistry
from ..errors import DeadstopError, InvalidTarget, RunNotFound, StopIncomplete, SupervisorClosed
from ..host.local import LocalHost, Provisioned
from ..host.recovery import recover
from ..host.spawner_client import SpawnerClient, Started
from ..mechanisms import isolation as iso
from ..mechanisms import leftovers
from ..mechanisms.cgroups import CgroupTree
from ..mechanisms.identities import DEFAULT_UID_RANGE
from ..mechanisms.limits import TOKEN_KEYS, Limits
from ..mechanisms.statelock import StateLock
from ..store.journal import Journal
from ..store.report import StopReport
from .events import Event, HeldEvents, Subscription
from .run import AsyncRun, RunOwner, RunServices
from .states import LIVE, RunState
from .stop import RevokeSource, StopMode, StopRequest, abort_start

log = logging.getLogger("deadstop")

#: Events delivered even once their session moved on: they say what happened to it.
UNFENCED_KINDS = frozenset({"run.ended", "run.fenced", "events.dropped", "session.message", "session.stopped"})

#: Seconds between two `run.sample` events of a live run (lifecycle subscribers only): live
#: usage for consoles and gateways, at a cadence far below the limit sampler's.
USAGE_EVENT_INTERVAL = 1.0
#: Samples per second across all runs: up to this many runs each is sampled every
#: USAGE_EVENT_INTERVAL; beyond, the cadence stretches (1,000 runs: each every 100 s), so
#: watching many idle runs costs a bounded share of a core, not a share that grows with them.
USAGE_SAMPLE_BUDGET = 10
#: How often the sampler wakes to take its share of the budget: on an idle host each wake-up
#: costs far more than one sample (cold caches), so it wakes seldom and samples in a batch.
USAGE_TICK = 1.0

#: Ended runs kept as objects, newest first out, so that a caller who just saw a
#: run end can still read its result from it; every older run is only its
#: stored record (ControlAPI.run_info). Memory is O(live runs + this).
ENDED_RETAINED = 256


class Engine:
    """Start runs, broker their egress, stop them for good.

    Its options are AsyncSupervisor's (see there), which passes them through.
    """

    def __init__(self, *, state_dir: str | None = None, containment: str = "auto", grace: float = 1.0,
                 max_request_bytes: int = framing.MAX_REQUEST_BYTES, tool_threads: int = 32,
                 sample_interval: float = 0.1, isolation: str = "auto",
                 uid_range: tuple[int, int] = DEFAULT_UID_RANGE, spawner_timeout: float = 10.0):
        if grace < 0:
            raise ValueError("grace must be >= 0")
        self.id = secrets.token_hex(4)
        self.host = LocalHost(self.id, containment=containment, isolation=isolation, uid_range=uid_range,
                              spawner_timeout=spawner_timeout)
        self._state_dir_arg = state_dir
        self.grace = grace
        self._max_request_bytes = max_request_bytes
        self._tool_threads = tool_threads
        self.tools = ToolRegistry()
        self.mcp = McpServers(self.tools.register, self.tools.unregister)
        self.mcp.launch = self._launch_mcp_run
        self.mcp.session_of = self._session_of_run
        self.runs: dict[str, AsyncRun] = {}  # live runs (starting, running, paused, stopping)
        self._leaders: set[int] = set()  # their leader pids (the sweeps skip these subtrees)
        self._cancelled_starts: set[asyncio.Task[None]] = set()  # starts seen through after their caller left
        self._held: dict[str, HeldEvents] = {}  # run id -> its output while it is starting
        self._ended: collections.OrderedDict[str, AsyncRun] = collections.OrderedDict()
        self._subscribers: list[Subscription] = []
        self._lifecycle_subscribers = 0  # how many of them want lifecycle events (egress path: one int test)
        self._sampler: asyncio.Task | None = None
        self._usage_task: asyncio.Task | None = None
        self._sampled: dict[str, AsyncRun] = {}  # live runs whose limits need sampling
        self.sample_interval = sample_interval
        self.closed = False
        self._opened = False

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
        try:
            await self.host.open(self.loop, self.runtime_dir, self._spawner_lost)
        except BaseException:
            self.journal.close()
            self._cleanup_dirs()
            raise
        self.broker = Broker(self.loop, framing.ipc_address(self.runtime_dir, "egress"), self.journal, self.tools,
                             self, max_request_bytes=self._max_request_bytes, tool_threads=self._tool_threads)
        self._services = RunServices(self.loop, self.journal, self.broker, self.host.spawner, self.host.watcher,
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
        if self._cancelled_starts:  # runs the spawner forks after their caller left: attached (and killing) first
            await asyncio.gather(*self._cancelled_starts, return_exceptions=True)
        live = [r for r in self.runs.values() if r.state in LIVE and r.containment is not None]
        results = await asyncio.gather(
            *(r.kill(source="supervisor", reason="supervisor closing") for r in live), return_exceptions=True)
        for r, res in zip(live, results):
            if isinstance(res, BaseException):
                log.error("run %s: kill at close failed: %s", r.id, res)
        await self.host.close()
        self.broker.close()
        await self.mcp.close()  # after every run is gone: nothing of theirs is in flight at a server
        for sub in self._subscribers:
            sub.close()
        for task in (self._sampler, self._usage_task):
            if task is not None:
                task.cancel()
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

    # -- what the host set up, for callers and reports ----------------------------------------
    @property
    def containment(self) -> str:
        """The containment layer every run gets here: cgroup, process-group(+subreaper), ..."""
        return self.host.containment

    @property
    def containment_degraded_reason(self) -> str:
        return self.host.containment_degraded_reason

    @property
    def isolation(self) -> iso.IsolationProfile:
        """The isolation layers runs get here, and why any is missing."""
        return self.host.isolation

    @property
    def spawner(self) -> SpawnerClient:
        return self.host.spawner

    @property
    def cgroups(self) -> CgroupTree | None:
        return self.host.cgroups

    def _cleanup_dirs(self) -> None:
        self._state_lock.release()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        if self._state_dir_arg is None:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def _spawner_lost(self) -> None:
        if self.closed:
            return
        why = self.host.lost_reason
        log.error("deadstop: %s; killing every live run through its containment", why)
        for run in list(self.runs.values()):
            if run.state in LIVE and run.containment is not None:
                self.loop.create_task(run.kill(source="spawner", reason=why))

    # -- tools -----------------------------------------------------------------------
    def register_tool(self, name: str, fn: Callable[..., Any], *, isolated: bool = False, network: str = "none",
                      cwd: str | None = None, env: dict[str, str] | None = None) -> None:
        """Make `fn` callable from runs whose allow-list names `name`.

        isolated: each call runs `fn` in a helper run of its own (contained
        and isolated like any run, with this network, cwd and env), which the
        caller's revoke kills in the same step: a blocking handler with no
        ctx.check() is cut mid-call instead of finishing its effect. It takes
        no ctx (the kill is its cancellation) and JSON arguments and result.
        """
        if not isolated:
            self.tools.register(name, fn)
            return
        signature = inspect.signature(fn)
        if "ctx" in signature.parameters:
            raise ValueError(f"isolated tool {name!r}: takes no ctx (the caller's revoke kills it instead)")
        self.check_run_options((), cwd, network)

        def fits(args: list[Any], kwargs: dict[str, Any]) -> None:
            signature.bind(*args, **kwargs)

        async def isolated_handler(*args: Any, ctx: Any, **kwargs: Any) -> Any:
            return await self._isolated_call(fn, list(args), kwargs, ctx, network, cwd, env)

        isolated_handler.__qualname__ = f"isolated:{name}"
        self.tools.register(name, isolated_handler, fits)

    async def _isolated_call(self, fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any], ctx: Any,
                             network: str, cwd: str | None, env: dict[str, str] | None) -> Any:
        caller = self.broker.channels.get(ctx.run_id)
        if caller is None or caller.revocation is not None:
            raise ToolCancelled(f"run {ctx.run_id} is revoked: its isolated tool does not start")
        start = asyncio.ensure_future(self.start(fn, *args, kwargs=kwargs, network=network, cwd=cwd, env=env, grace=0.0))

        async def end_helper() -> StopReport | None:
            try:
                helper = await asyncio.shield(start)  # still starting at the revoke: it is killed once it is up
            except BaseException:
                return None  # it never started (an aborted start kills whatever it forked)
            return await helper.begin_end(StopMode.KILL, "parent", f"its caller, run {ctx.run_id}, was revoked")

        def on_revoke() -> "asyncio.Task[StopReport | None]":
            return self.loop.create_task(end_helper())

        # In place before the helper exists: a revoke at any point from here ends it, and the stop waits for that.
        caller.on_revoke.append(on_revoke)
        try:
            helper = await asyncio.shield(start)
            return await helper.result()
        finally:
            if on_revoke in caller.on_revoke:
                caller.on_revoke.remove(on_revoke)

    async def register_mcp_server(self, name: str, command: Sequence[str], *, env: dict[str, str] | None = None,
                                  cwd: str | None = None, timeout: float = 60.0, scope: str = "supervisor",
                                  network: Any = "none") -> list[str]:
        """Start an MCP server (stdio) and register each of its tools as `NAME.TOOL`; their names.

        Runs call them like any tool (on their allow-list, keyword arguments
        checked against the tool's input schema). See supervisor/egress/mcp.py
        for cancellation at the revoke and what happens when a server fails.
        Registering a name again replaces that server.

        scope="session": each session's calls go to a server of its own,
        started as a run (contained and isolated like any run, with this
        network and cwd) at the session's first call, and killed when the
        session stops, so an effect still running inside the server is cut.
        """
        self.check_open()
        spec = McpServerSpec(name, list(command), dict(env) if env else None, cwd, float(timeout), scope, network)
        if scope == "session":
            self.check_run_options((), cwd, network)
        return await self.mcp.add(spec)

    async def _launch_mcp_run(self, spec: McpServerSpec) -> tuple[AsyncRun, socket.socket]:
        """A session-scoped MCP server as a run: an argv run whose stdin and stdout are our socket."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            kind, desc, blob, argv = self.prepare_target(list(spec.command), (), {})
            run = await self.launch(kind, f"mcp:{spec.name} {desc}", blob, argv, [], 0.0,
                                    {**server_environment(), **(spec.env or {})}, spec.cwd, network=spec.network,
                                    stdio_fd=theirs.fileno())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        return run, ours

    def _session_of_run(self, run_id: str) -> str | None:
        run = self.runs.get(run_id)
        return run.owner.key if run is not None and run.owner is not None else None

    # -- runs ----------------------------------------------------------------------------
    def check_open(self) -> None:
        if self.closed:
            raise SupervisorClosed("supervisor is closed")
        if not self._opened:
            raise SupervisorClosed("supervisor is not open: use 'async with AsyncSupervisor()' or await open()")
        if not self.host.alive:
            raise SupervisorClosed(f"{self.host.lost_reason}: every run was killed; open a new supervisor")

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
                    private_tmp: bool | None = None, isolation: str | None = None) -> AsyncRun:
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
                                  limits=Limits.coerce(limits), network=network, private_tmp=private_tmp,
                                  isolation=isolation)

    def check_run_options(self, tools: Sequence[str], cwd: str | None, network: "str | Proxy",
                          isolation: str | None = None) -> None:
        """Refuse what no run could use, at registration instead of at the first message."""
        self._check_tools(tools)
        if isinstance(network, Proxy):
            why = self.host.proxy_unavailable(isolation)
            if why:
                raise InvalidTarget(f"network=Proxy(...) cannot be served here: {why}")
            network = "none"
        self.host.check_options(cwd, network, isolation)

    def _check_tools(self, tools: Sequence[str]) -> None:
        for name in tools:
            if name not in self.tools:
                raise InvalidTarget(f"tool {name!r} is not registered (registered: {self.tools.names()})")

    async def launch(self, kind: str, desc: str, blob: bytes | None, argv: list[str] | None, tools: list[str],
                     grace: float | None, env: dict[str, str] | None, cwd: str | None, *,
                     limits: Limits | None = None, owner: RunOwner | None = None,
                     inbox: dict[str, Any] | None = None, network: str = "none",
                     private_tmp: bool | None = None, isolation: str | None = None,
                     stdio_fd: int | None = None) -> AsyncRun:
        """Start a prepared target (see prepare_target) as a run of `owner` (a session, or none).
        stdio_fd: an argv run's stdin and stdout (the caller keeps the other end of the socket)."""
        if grace is not None and grace < 0:
            raise ValueError("grace must be >= 0")
        self.check_run_options(tools, cwd, network, isolation)
        plan = self.check_limits(limits)  # LimitUnenforceable before anything exists
        run_id = secrets.token_hex(framing.RUN_ID_CHARS // 2)
        proxy = network if isinstance(network, Proxy) else None
        if proxy is not None:
            network = "none"  # a namespace of its own, whose only way out is the proxy on its loopback
            address = f"http://127.0.0.1:{PROXY_PORT}"
            env = {**(env or {}), **{k: address for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy",
                                                           "https_proxy", "all_proxy")}, "NO_PROXY": "", "no_proxy": ""}
        prov = self.host.provision(run_id, argv, cwd, env, network, private_tmp, limits, plan,
                                   masks=self.journal.files() + [self._state_lock.path, self.state_dir],
                                   trusted=isolation == "off")
        credential = framing.new_credential()
        generation = owner.generation if owner is not None else 0
        self.journal.run_created(run_id, self.id, kind, desc, tools, self.containment,
                                 prov.cgroup.path if prov.cgroup else None, owner.key if owner else None, generation)
        channel = self.broker.open_channel(run_id, credential, frozenset(tools), generation,
                                           owner.gen if owner is not None else None,
                                           limits.tool_calls if limits else None, peer_uid=prov.uid,
                                           peer_gid=prov.uid, endpoint_dir=prov.confined.endpoint_dir)
        run = AsyncRun(self._services, run_id, kind, desc, tools, self.grace if grace is None else grace, channel,
                       owner=owner, limits=limits, inbox=inbox)
        run.uid = prov.uid
        run.kernel_limits, run.limits_enforcement = prov.kernel, plan
        run.isolation = prov.confined.summary
        self.runs[run_id] = run
        self._held[run_id] = HeldEvents()  # its output waits for its run.started (_attach_started)
        if owner is not None:
            owner.run_created(run)  # a stop of its session from here on reaches it, still starting or not
        msg = self.host.start_message(prov, blob=blob, argv=argv, generation=generation, egress=channel.address,
                                      limits=limits)
        if proxy is not None:
            msg.proxy_port = PROXY_PORT
        # Shielded: a caller that gives up (a cancel, a timeout) does not take the spawner's answer with it.
        # The launch then outlives the caller's stdio descriptor, which it closes when it leaves: the launch
        # sends a copy of its own, never a number that may name another file by then.
        stdio = os.dup(stdio_fd) if stdio_fd is not None else None
        launch = asyncio.ensure_future(self.host.launch(msg, credential, stdio,
                                                        still_wanted=lambda: channel.revocation is None))
        if stdio is not None:
            launch.add_done_callback(lambda _: os.close(stdio))
        try:
            started = await asyncio.shield(launch)
        except asyncio.CancelledError:
            # The spawner may be forking the run at this very moment (or have forked it, its answer on the
            # way): the run is ended like any other, killed the moment it is attached, or never forked if
            # it was still queued for a start slot (the revocation makes still_wanted False).
            run.end_for(StopRequest(StopMode.KILL, RevokeSource.SUPERVISOR, "start cancelled", 0.0, time.monotonic_ns()))
            ending = self.loop.create_task(self._end_cancelled_start(run, prov, launch, proxy),
                                           name=f"deadstop-cancelled-start-{run_id}")
            self._cancelled_starts.add(ending)
            ending.add_done_callback(self._cancelled_starts.discard)
            raise
        except BaseException as exc:
            self._abort_start(run, prov, f"start failed: {exc}")
            if isinstance(exc, DeadstopError):
                raise
            raise DeadstopError(f"run {run_id} could not be started: {exc}") from exc
        await self._attach_started(run, prov, started, proxy)
        return run

    def _abort_start(self, run: AsyncRun, prov: Provisioned, why: str) -> None:
        """A start that failed before attach: whatever was forked killed, the run FAILED, its record written."""
        report = abort_start(run, self.host.cgroup_layer(prov.cgroup) if prov.cgroup else None, why)
        self.broker.close_channel(run.id)
        self.journal.run_ended(run.id, RunState.FAILED.value, report.reaped_at, None, None, report.to_dict())
        self.host.abort(prov)
        self._held.pop(run.id, None)  # it never started, as far as any subscriber heard: its output neither
        self._retire(run)

    async def _end_cancelled_start(self, run: AsyncRun, prov: Provisioned, launch: "asyncio.Future[Started]",
                                   proxy: Proxy | None) -> None:
        """See a start its caller cancelled through: a run the spawner forked anyway is attached and killed."""
        try:
            started = await launch
        except BaseException as exc:  # never forked (given up in the queue, or failed): nothing to kill
            self._abort_start(run, prov, f"start cancelled ({exc})" if str(exc) else "start cancelled")
            return
        await self._attach_started(run, prov, started, proxy)  # its deferred kill begins there

    async def _attach_started(self, run: AsyncRun, prov: Provisioned, started: Started, proxy: Proxy | None) -> None:
        """The spawner forked the run: its proxy, its leader watched, its stop possible from here."""
        run_id, channel, limits = run.id, run.channel, run.limits
        if proxy is not None and started.proxy_fd is not None:
            channel.proxy = RunProxy(run_id, started.proxy_fd, proxy, self.journal)
            if channel.revocation is not None:
                channel.proxy.cut()  # revoked while it started (abuse, stop_all): its network never opens
        self._leaders.add(started.pid)
        run.attach(started.pid, started.create_time, started.pidfd,
                   self.host.containment_for(prov, started.pid, lambda: self._leaders))
        if channel.proxy is not None and channel.proxy.cut_at is None:
            # After attach, so that a failure or a cancel here ends a run that can be signalled; its first
            # connection waits in the listener's backlog until then.
            try:
                await channel.proxy.start()
            except BaseException as exc:
                run.begin_end(StopMode.KILL, "supervisor", f"its network proxy did not start: {exc!r}"[:500])
                raise
        held = self._held.pop(run.id, None)  # first run.started, then what the run did before it was out
        self._lifecycle(run, "run.started", {"pid": started.pid, "kind": run.kind, "target": run.target})
        self._publish_held(held)
        self._ensure_usage_events()
        if limits is not None and (limits.cpu_seconds or limits.memory_bytes or limits.processes):
            self._sampled[run.id] = run
            self._ensure_sampler()

    def check_limits(self, limits: Limits | None) -> dict[str, str]:
        """How each limit would be enforced here (limit -> mechanism); raises
        LimitUnenforceable for a memory_bytes / processes limit no kernel
        controller can enforce, unless Limits(enforcement="sampled")."""
        return self.host.check_limits(limits)

    @property
    def limit_enforcement(self) -> dict[str, str]:
        """memory_bytes / processes -> the kernel mechanism this host offers, or "sampled only: <why>"."""
        return self.host.limit_support.describe()

    async def stop_all(self, grace: float | None = None, *, source: str = "api",
                       reason: str = "stop all") -> list[StopReport]:
        """Stop every live run at once (concurrently); returns their reports in start order.

        Every run is revoked first, in this one step, and the revocations are
        committed to the journal once (not once per run) before any signal.
        A run still starting is among them: stopped as soon as it is attached.
        """
        requested_at = time.monotonic_ns()  # every report's requested_at: before any revoke
        StopRequest.of(StopMode.STOP, source, reason, 0.0, 0)  # an unknown source fails before any revoke
        live = [r for r in self.runs.values() if r.state in LIVE]
        for run in live:
            run.revoke(source, reason, commit=False)
        self.journal.commit_now()
        tasks = [run.begin_end(StopMode.STOP, source, reason, grace, requested_at) for run in live]
        reports = await asyncio.gather(*(asyncio.shield(t) for t in tasks))
        left = [r for r in reports if r.survivors]
        if left:
            raise StopIncomplete(left[0])
        return list(reports)

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
        if run.pid is not None:
            self._leaders.discard(run.pid)
        self._ended[run.id] = run
        while len(self._ended) > ENDED_RETAINED:
            self._ended.popitem(last=False)

    def run_finished(self, run: AsyncRun) -> None:
        self._retire(run)
        self._sampled.pop(run.id, None)
        self.broker.close_channel(run.id)
        if run.report is not None and run.report.survivors:
            run.uid = None  # quarantined: a uid is reused only once nothing of its run lives
        self.host.release(run.id, run.uid)
        if run.owner is not None:
            run.owner.run_ended(run)
        self._publish_held(self._held.pop(run.id, None))  # ended before its start was out (its proxy failed)
        self._publish(Event(run.id, "run.ended", {"state": run.state.value}, time.monotonic_ns(),
                            run.owner.key if run.owner else None, run.generation))

    # -- BrokerSink --------------------------------------------------------------------------
    def _stale(self, run: AsyncRun | None) -> bool:
        return run is not None and run.owner is not None and not run.owner.is_current(run.generation)

    def on_event(self, run_id: str, kind: str, data: Any, t_ns: int) -> None:
        run = self.runs.get(run_id)
        if run is not None and self._stale(run):
            self.journal.fenced(run_id, t_ns, "emit", f"event {kind!r} of generation {run.generation}")
            self._lifecycle(run, "run.fenced", {"what": "emit", "kind": kind})
            return
        event = Event(run_id, kind, data, t_ns, run.owner.key if run and run.owner else None,
                      run.generation if run else 0)
        self._publish_of(run_id, event)

    def _publish_of(self, run_id: str, event: Event) -> None:
        """An event of a run: published, or held if the run's run.started is not out yet."""
        held = self._held.get(run_id)
        if held is not None:
            held.hold(event)  # the run acted before the spawner's word that it started
        else:
            self._publish(event)

    def _publish_held(self, held: HeldEvents | None) -> None:
        if held is not None:
            for event in held.released():
                self._publish(event)

    def on_result(self, run_id: str, value: Any) -> None:
        run = self.runs.get(run_id)
        if run is None:
            return
        run.set_result(value)
        if run.owner is not None and not run.owner.offer_answer(run, value):
            self.journal.fenced(run_id, time.monotonic_ns(), "result",
                                f"result of generation {run.generation}; its owner is at {run.owner.generation}")
            self._lifecycle(run, "run.fenced", {"what": "result"})

    def on_failure(self, run_id: str, type_name: str, message: str, traceback: str) -> None:
        run = self.runs.get(run_id)
        if run is not None:
            run.set_failure(type_name, message, traceback)

    def on_usage(self, run_id: str, tool: str, usage: dict[str, float]) -> None:
        run = self.runs.get(run_id)
        if run is not None:
            self._lifecycle(run, "run.usage", {"tool": tool, "usage": usage})
            tokens = sum(v for k, v in usage.items() if k in TOKEN_KEYS)
            if tokens:
                run.add_tokens(tokens)

    def on_tool_call(self, run_id: str, tool: str, req_id: int) -> None:
        if self._lifecycle_subscribers:  # every dispatched call comes here: nothing to do without a listener
            run = self.runs.get(run_id)
            if run is not None:
                self._lifecycle(run, "run.tool_call", {"tool": tool, "id": req_id})

    def _lifecycle(self, run: AsyncRun, kind: str, data: Any) -> None:
        """A supervisor-made event about a run (nothing is built when no one subscribes)."""
        if self._lifecycle_subscribers:
            self._publish_of(run.id, Event(run.id, kind, data, time.monotonic_ns(),
                                           run.owner.key if run.owner else None, run.generation))

    def publish_session(self, key: str, kind: str, data: Any, generation: int) -> None:
        """A supervisor-made event about a session (session.message, session.stopped)."""
        if self._lifecycle_subscribers:
            self._publish(Event("", kind, data, time.monotonic_ns(), key, generation))

    def on_quota(self, run_id: str, limit: str) -> None:
        run = self.runs.get(run_id)
        if run is not None:
            run.quota(limit)

    def on_abuse(self, run_id: str, detail: str) -> None:
        """The broker revoked a run for spending its refusal budget: stop it (source "abuse"), at
        once, or the moment it is attached if the spawner has not said yet that it started."""
        run = self.runs.get(run_id)
        if run is not None:
            run.end_for(StopRequest(StopMode.STOP, RevokeSource.ABUSE, detail, run.grace, time.monotonic_ns()))

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

    async def events(self, session: str | None = None, *, lifecycle: bool = False) -> AsyncIterator[Event]:
        """Events emitted by runs (of one session, or all), plus run.ended, until close.

        Stale output fence: an event is checked again as it is handed out; if
        its session has moved to a newer generation meanwhile, it is dropped
        (and journaled as fenced) instead of delivered.

        A subscriber that falls behind by SUBSCRIBER_BACKLOG events loses the
        newest ones (never a `run.ended`), and then receives one
        `events.dropped` event whose data says how many it missed, so the
        supervisor's memory does not grow with a slow reader.
        """
        entry = Subscription(session, lifecycle)
        self._subscribers.append(entry)
        self._lifecycle_subscribers += lifecycle
        self._ensure_usage_events()
        try:
            while True:
                event = await entry.get()
                if event is None:
                    return
                owner = self.owner_of(event.session) if event.session else None
                if owner is not None and event.kind not in UNFENCED_KINDS and not owner.is_current(event.generation):
                    self.journal.fenced(event.run_id, time.monotonic_ns(), "emit",
                                        f"event {event.kind!r} of generation {event.generation} held back at delivery")
                    continue
                yield event
        finally:
            self._subscribers.remove(entry)
            self._lifecycle_subscribers -= lifecycle

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

    def _ensure_usage_events(self) -> None:
        if self._lifecycle_subscribers and self.runs and (self._usage_task is None or self._usage_task.done()):
            self._usage_task = self.loop.create_task(self._usage_events(), name="deadstop-usage-events")

    async def _usage_events(self) -> None:
        """`run.sample` events of live runs while a lifecycle subscriber listens.

        Round robin under a budget: each tick samples the next runs whose last
        sample is USAGE_EVENT_INTERVAL old, at most USAGE_SAMPLE_BUDGET a
        second in all. A run is first sampled an interval after it is first
        seen (a sample at its first instant says nothing). What a sample
        carries is what is true now (CPU so far, memory and processes at this
        moment, tokens and tool calls so far), not the run's peaks: a chart of
        it shows a run at rest as at rest.
        """
        per_tick = max(1, int(USAGE_SAMPLE_BUDGET * USAGE_TICK))
        due: dict[str, float] = {}  # run id -> when it is next sampled
        queue: collections.deque[str] = collections.deque()  # in order of `due`: each joins at the back
        while not self.closed and self._lifecycle_subscribers and self.runs:
            await asyncio.sleep(USAGE_TICK)
            now = self.loop.time()
            for run_id in self.runs:  # new runs join the back, sampled an interval from now
                if run_id not in due:
                    due[run_id] = now + USAGE_EVENT_INTERVAL
                    queue.append(run_id)
            taken = 0
            while queue and taken < per_tick and due[queue[0]] <= now:
                run_id = queue.popleft()
                run = self.runs.get(run_id)
                if run is None:  # ended: leaves the round
                    del due[run_id]
                    continue
                due[run_id] = now + USAGE_EVENT_INTERVAL
                queue.append(run_id)
                if run.state not in (RunState.RUNNING, RunState.PAUSED) or run.containment is None:
                    continue
                taken += 1
                try:
                    cpu, memory, processes = run.containment.measure()
                except Exception:  # ended under us
                    continue
                run.note_measurement(cpu, memory, processes)
                usage = run.live_usage()
                self._lifecycle(run, "run.sample", {
                    "cpu_seconds": max(cpu, usage.cpu_seconds), "memory_bytes": memory, "processes": processes,
                    "tokens": usage.tokens, "tool_calls": usage.tool_calls, "state": run.state.value})
