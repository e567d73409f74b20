"""One run as the supervisor's event loop sees it (the asyncio core).

A run has exactly one end, produced by exactly one task running
supervisor.stop.stop_sequence. stop(), kill() and the leader's own exit all
join that task; kill() during a stop escalates it instead of starting a
second one, and a caller that is cancelled while waiting leaves the task to
finish (its report stays readable on the run).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time
from typing import Any, Callable, Protocol

from ..egress.broker import Broker
from ..egress.channel import Channel, GenerationCell, RevokeRecord
from ..mechanisms.containment import CgroupContainment, Containment
from ..errors import InvalidTransition, RunFailed, RunTimeout, StopIncomplete
from ..mechanisms import procs
from ..mechanisms.limits import KernelLimits, Limits, Usage, crossed
from ..host.spawner_client import SpawnerClient
from ..mechanisms.cgroups import InotifyWatcher
from ..store.journal import Journal
from ..store.report import StopReport
from .states import RunState, RunStateMachine
from .stop import KILL_BOUND, RevokeSource, StopMode, StopProgress, StopRequest, stop_sequence

log = logging.getLogger("deadstop.run")

#: live_usage() measures again when its last look is older than this.
FRESH_USAGE = 0.1


@dataclasses.dataclass(frozen=True)
class RunServices:
    """What a run may use of its engine, and nothing else: its loop, the journal it
    writes, the broker that holds its channel, the host that reaps its leader, the
    cgroup watcher, and the one callback that hands its end back to the engine."""

    loop: asyncio.AbstractEventLoop
    journal: Journal
    broker: Broker
    spawner: SpawnerClient
    watcher: InotifyWatcher | None
    finished: Callable[["AsyncRun"], None]


class RunOwner(Protocol):
    """Who a run serves (a session): the engine asks it, never the other way round,
    whether a run's generation is still current and whether its result counts."""

    key: str
    gen: GenerationCell

    @property
    def generation(self) -> int: ...

    def is_current(self, generation: int) -> bool: ...

    def run_created(self, run: "AsyncRun") -> None: ...

    def offer_answer(self, run: "AsyncRun", value: Any) -> bool: ...

    def run_ended(self, run: "AsyncRun") -> None: ...


@dataclasses.dataclass(frozen=True)
class ExitInfo:
    run_id: str
    state: RunState
    exit_code: int | None
    exit_signal: int | None
    report: StopReport


class AsyncRun:
    def __init__(self, services: RunServices, run_id: str, kind: str, target: str, tools: list[str],
                 grace: float, channel: Channel, *, owner: RunOwner | None = None, limits: Limits | None = None,
                 inbox: dict[str, Any] | None = None):
        self._services = services
        self.owner = owner  # the session this run serves, if any
        self.generation = channel.generation
        self.limits = limits
        self.usage = Usage()
        self.inbox = inbox or {}
        self._active_since: float | None = None  # monotonic seconds; None while paused or ended
        self._deadline: asyncio.TimerHandle | None = None
        self.id = run_id
        self._measured_at = 0.0  # monotonic seconds of the last look at CPU and memory
        self.uid: int | None = None  # its own identity, under isolation
        self.isolation: dict[str, Any] = {}  # the layers it runs under (also in its report)
        #: the kernel side of its memory_bytes / processes limits (supervisor/mechanisms/limits.py), if any
        self.kernel_limits: KernelLimits | None = None
        #: limit -> what enforces it: broker, timer, sampled, cgroup-v2:memory, cgroup-v1:pids, ...
        self.limits_enforcement: dict[str, str] = {}
        self.kind = kind  # "python" | "argv"
        self.target = target
        self.tools = tools
        self.grace = grace
        self.channel = channel
        self.machine = RunStateMachine(run_id, self._journal_transition)
        self.pid: int | None = None
        self.create_time: float | None = None
        self.pidfd: int | None = None
        self.containment: Containment | None = None
        self.leader_exited = asyncio.Event()
        self.report: StopReport | None = None
        #: its stop, once one began (supervisor/engine/stop.py StopProgress); None while it is not ending
        self.progress: StopProgress | None = None
        self._done = asyncio.Event()
        self._stop_task: asyncio.Task[StopReport] | None = None
        #: a stop the broker or a limit asked for while the run was still starting (nothing to signal
        #: yet): its egress is closed at once, its stop begins the moment the leader is attached
        self._deferred: tuple[StopRequest, str | None] | None = None
        #: set once the start is over either way: attached (any deferred stop begun) or aborted (report set)
        self._start_settled = asyncio.Event()
        self._end_of_start_task: asyncio.Task[StopReport] | None = None  # what _begin hands out meanwhile
        self._result: Any = None
        self._has_result = False
        self._failure: tuple[str, str, str] | None = None

    # -- state -----------------------------------------------------------------
    @property
    def state(self) -> RunState:
        return self.machine.state

    def _journal_transition(self, old: RunState, new: RunState, t_ns: int) -> None:
        self._services.journal.transition(self.id, old.value, new.value, t_ns)

    def attach(self, pid: int, create_time: float, pidfd: int | None, containment: Containment) -> None:
        """The spawner forked the leader: watch it and mark the run running."""
        self.pid, self.create_time, self.pidfd, self.containment = pid, create_time, pidfd, containment
        if self.kernel_limits is not None:
            self.kernel_limits.watch(self._services.loop, self._services.watcher, self.check_kernel_limits)
        self._services.journal.run_started(self.id, pid, create_time)
        if self.machine.state is RunState.STARTING:
            self.machine.to(RunState.RUNNING)
            self._clock_start()
        if pidfd is not None:
            self._services.loop.add_reader(pidfd, self._on_leader_exit)
        else:  # no pidfd (macOS): a thread waits on psutil for us
            self._services.loop.run_in_executor(None, self._wait_leader_psutil)
        if self._deferred is not None:
            self._begin(*self._deferred)
        self._start_settled.set()

    def start_aborted(self, report: StopReport) -> None:
        """The start failed or was cancelled before attach: `report` (stop.abort_start's) is its end."""
        self.report = report
        self._start_settled.set()

    def _wait_leader_psutil(self) -> None:
        import psutil

        try:
            psutil.Process(self.pid).wait()
        except psutil.Error:
            pass
        self._services.loop.call_soon_threadsafe(self._on_leader_exit)

    def _on_leader_exit(self) -> None:
        if self.leader_exited.is_set():
            return
        if self.pidfd is not None:
            self._services.loop.remove_reader(self.pidfd)
        self.leader_exited.set()
        if self.containment is not None:
            self.containment.changed()
        if self._stop_task is None:
            # The OOM killer counts its kill before it signals the victim: a
            # leader killed for the memory limit (or one that gave up when a
            # fork was refused) ended by crossing a limit, not by itself.
            self.check_kernel_limits()
        if self._stop_task is None:
            self._begin(StopRequest(StopMode.EXIT, RevokeSource.EXIT, "the run's leader process exited", 0.0, time.monotonic_ns()))

    # -- results reported over egress ----------------------------------------------
    def set_result(self, value: Any) -> None:
        self._result, self._has_result = value, True

    def set_failure(self, type_name: str, message: str, traceback: str) -> None:
        self._failure = (type_name, message, traceback)

    # -- the one end -----------------------------------------------------------------
    def revoke(self, source: str, reason: str, *, commit: bool = True) -> RevokeRecord:
        """Close the run's egress now (idempotent); the first call's record wins."""
        return self._services.broker.revoke(self.channel, source, reason, commit=commit)

    def disconnect(self) -> None:
        """Close the revoked run's endpoint and the connections accepted through it."""
        self._services.broker.disconnect(self.channel)

    def end_for(self, req: StopRequest, limit: str | None = None) -> None:
        """A stop nobody awaits (abuse, a crossed limit, a cancelled start), once."""
        if self._stop_task is None and self.machine.live:
            self._begin(req, limit)

    def _defer(self, req: StopRequest, limit: str | None) -> asyncio.Task[StopReport]:
        """An end asked before the leader is attached (nothing to signal yet): egress closed now, the stop
        begun at attach, or the aborted start's own kill as the end; the task is that end's report.

        A run's own requests can reach the broker before the spawner's word
        that it started, and a stop_all or a session stop can come in the
        middle of a start: none of them may leave the run running.
        """
        self.revoke(req.source, req.reason)
        if self._deferred is None or (req.mode is StopMode.KILL and self._deferred[0].mode is not StopMode.KILL):
            self._deferred = (req, limit)  # a kill asked meanwhile replaces a stop: no grace once it is up
        if self._end_of_start_task is None:
            self._end_of_start_task = self._services.loop.create_task(
                self._end_of_start(), name=f"deadstop-end-of-start-{self.id}")
        return self._end_of_start_task

    async def _end_of_start(self) -> StopReport:
        await self._start_settled.wait()
        if self._stop_task is not None:
            return await asyncio.shield(self._stop_task)
        assert self.report is not None, "an aborted start leaves its report"
        return self.report

    def _begin(self, req: StopRequest, limit: str | None = None) -> asyncio.Task[StopReport]:
        if self._stop_task is None and self.containment is None:  # still starting, or a start aborted
            return self._defer(req, limit)
        if self._stop_task is None:
            self.progress = StopProgress(req, limit=limit, was_paused=self.machine.state is RunState.PAUSED,
                                         kill_requested=req.mode is StopMode.KILL)
            self._clock_stop()
            if self.machine.state is not RunState.STOPPING:
                self.machine.to(RunState.STOPPING)  # buffered; the revoke's commit writes it
            # Revoke in the caller's own loop step, not in the task's first
            # step: nothing the run sends after this line is dispatched.
            self.revoke(req.source, req.reason)
            self._stop_task = self._services.loop.create_task(self._finish(req), name=f"deadstop-stop-{self.id}")
        return self._stop_task

    async def _finish(self, req: StopRequest) -> StopReport:
        try:
            report = await stop_sequence(self, req)  # raises only if cancelled: a failure is its "failsafe" report
        finally:
            self._done.set()
        self._final_kernel_counts()
        await self._sweep_kernel_groups(report)
        report.limit = self.progress.limit if self.progress else None
        report.limits_enforcement = dict(self.limits_enforcement)
        report.isolation = self.isolation
        if self.containment is not None:
            self._measure()  # the CPU its processes used, to the end (the cgroup still counts it)
        self.usage.tool_calls = self.channel.calls
        self.report = report
        self.machine.to(RunState(report.outcome))
        self._services.journal.run_ended(self.id, report.outcome, report.reaped_at, report.exit_code,
                                    report.exit_signal, report.to_dict(), self.usage.to_dict())
        self._release_handles()
        self._services.finished(self)
        return report

    def _final_kernel_counts(self) -> None:
        """The kernel's peaks, read once more before the groups go (usage is then final)."""
        if self.kernel_limits is None:
            return
        try:
            memory, processes = self.kernel_limits.peaks()
        except OSError:
            return
        if memory is not None:
            self.usage.peak_memory_bytes = max(self.usage.peak_memory_bytes, memory)
        if processes is not None:
            self.usage.peak_processes = max(self.usage.peak_processes, processes)

    async def _sweep_kernel_groups(self, report: StopReport) -> None:
        """Kill what is still alive in the run's v1 groups after the stop sequence.

        Every process of the run joined them at bootstrap and cannot leave
        them without privilege, so one alive there now is a process of the
        run the containment layer did not reach (it left its cgroup or
        process group): it is killed and reported as escaped, and as a
        survivor if it outlives the kill bound.
        """
        k = self.kernel_limits
        if k is None or k.v1 is None:
            return
        left = k.v1_live_members()
        if not left:
            return
        found = set(left)
        loop = self._services.loop
        deadline = loop.time() + KILL_BOUND
        while left and loop.time() < deadline:
            procs.signal_members(left, signal.SIGKILL, k.v1.members)
            await procs.wait_pids_gone(left, min(0.1, max(0.0, deadline - loop.time())))
            left = k.v1_live_members()
            found.update(left)
        log.warning("run %s: %d process(es) alive in its v1 groups after the stop sequence: %s",
                    self.id, len(found), sorted(found))
        new = sorted(found - set(report.escaped_pids))
        report.escaped += len(new)
        report.escaped_pids = sorted(set(report.escaped_pids) | found)
        if left:
            report.survivor_pids = sorted(set(report.survivor_pids) | set(left))
            report.survivors = len(report.survivor_pids)

    def _release_handles(self) -> None:
        if self.containment is not None:
            self.containment.cleanup()
        if self.kernel_limits is not None and not self.kernel_limits.cleanup():
            self._retry_kernel_cleanup(0.05)
        if self.pidfd is not None:
            if not self.leader_exited.is_set():
                self._services.loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None

    def _retry_kernel_cleanup(self, delay: float) -> None:
        """A v1 group is often busy for a moment after its processes died (an OOM kill
        still uncharging pages): try again on a backoff, then leave it to close()."""
        def retry() -> None:
            if self.kernel_limits is None or self.kernel_limits.cleanup():
                return
            if delay < 3.0:
                self._retry_kernel_cleanup(delay * 2)
            else:
                log.warning("run %s: its v1 cgroups are still busy; the supervisor removes them at close", self.id)
        self._services.loop.call_later(delay, retry)

    async def release_leader(self) -> int | None:
        """Wait for the leader to be gone, then let the spawner reap it (unpins the pgid)."""
        if self.pid is None:
            return None
        try:
            await asyncio.wait_for(self.leader_exited.wait(), KILL_BOUND)
        except asyncio.TimeoutError:
            log.error("run %s: leader pid %d survived SIGKILL for %.0fs", self.id, self.pid, KILL_BOUND)
            return None
        try:
            pinned = not isinstance(self.containment, CgroupContainment)
            return await asyncio.wait_for(self._services.spawner.release(self.pid, pinned), KILL_BOUND)
        except Exception:  # spawner gone: the leader was reaped elsewhere
            return None

    # -- limits and usage -------------------------------------------------------------
    def _clock_start(self) -> None:
        self._active_since = time.monotonic()
        if self.limits is not None and self.limits.wall_clock is not None:
            remaining = self.limits.wall_clock - self.usage.wall_clock
            self._deadline = self._services.loop.call_later(max(0.0, remaining), self.quota, "wall_clock")

    def _clock_stop(self) -> None:
        if self._active_since is not None:
            self.usage.wall_clock += time.monotonic() - self._active_since
            self._active_since = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def live_usage(self) -> Usage:
        """Usage now: counters are exact; CPU, memory and processes are measured
        on the spot when the last look is older than FRESH_USAGE, whether or not
        a limit asked for sampling."""
        if self.containment is not None and self.machine.live and \
                time.monotonic() - self._measured_at > FRESH_USAGE:
            self._measure()
        usage = Usage(**self.usage.to_dict())
        usage.tool_calls = self.channel.calls
        if self._active_since is not None:
            usage.wall_clock += time.monotonic() - self._active_since
        return usage

    def add_tokens(self, amount: float) -> None:
        self.usage.tokens += int(amount)
        self._check_limits()

    def sample(self) -> None:
        """One sample (supervisor's sampler): CPU, memory and processes, then the
        kernel's counts where a controller enforces memory_bytes / processes."""
        assert self.containment is not None
        cpu, memory, processes = self.containment.measure()
        k = self.kernel_limits
        if k is not None:
            # The kernel's own count replaces the sampled one where it enforces
            # the limit: it is what the limit applies to (a sum of RSS counts
            # pages shared with the spawner and misses memfds).
            k_memory, k_processes = k.peaks()
            memory = k_memory if k_memory is not None else memory
            processes = k_processes if k_processes is not None else processes
        self.record_sample(cpu, memory, processes)
        self.check_kernel_limits()

    def check_kernel_limits(self) -> None:
        """Stop the run if the kernel says it ran into a limit (an OOM kill, a refused fork)."""
        if self.kernel_limits is None or self._stop_task is not None or not self.machine.live:
            return
        try:
            limit = self.kernel_limits.crossed()
        except OSError:
            return
        if limit is not None:
            self.quota(limit)

    def record_sample(self, cpu_seconds: float, memory_bytes: int, processes: int) -> None:
        self._record(cpu_seconds, memory_bytes, processes)
        self._check_limits()

    def note_measurement(self, cpu_seconds: float, memory_bytes: int, processes: int) -> None:
        """A look taken by someone else (the usage events): recorded, so live_usage does not look again."""
        self._record(cpu_seconds, memory_bytes, processes)

    def _record(self, cpu_seconds: float, memory_bytes: int, processes: int) -> None:
        self._measured_at = time.monotonic()
        self.usage.cpu_seconds = max(self.usage.cpu_seconds, cpu_seconds)
        self.usage.peak_memory_bytes = max(self.usage.peak_memory_bytes, memory_bytes)
        self.usage.peak_processes = max(self.usage.peak_processes, processes)

    def _measure(self) -> None:
        """Look at the run's processes now (no limit check: the sampler does that)."""
        assert self.containment is not None
        try:
            self._record(*self.containment.measure())
        except Exception:  # ended under us: keep what we had
            self._measured_at = time.monotonic()

    def _check_limits(self) -> None:
        limit = crossed(self.limits, self.live_usage())
        if limit is not None:
            self.quota(limit)

    def quota(self, limit: str) -> None:
        """A limit was crossed: stop the run (once), naming the limit."""
        value = getattr(self.limits, limit, None)
        self.end_for(StopRequest(StopMode.STOP, RevokeSource.QUOTA, f"{limit} limit ({value}) crossed", self.grace,
                                 time.monotonic_ns()), limit=limit)

    # -- pause / resume -------------------------------------------------------------------
    async def pause(self, timeout: float = 5.0) -> bool:
        """Hold egress (requests queue, none is dispatched), then freeze every process.

        Returns True once the whole tree is frozen. Wall-clock limits do not
        count paused time. A paused run can be stopped or killed at once.
        """
        if self.machine.state is RunState.PAUSED:
            return True
        if self.machine.state is not RunState.RUNNING:
            raise InvalidTransition(f"run {self.id} is {self.state.value}; only a running run can be paused")
        self._services.broker.hold(self.channel)
        self.machine.to(RunState.PAUSED)
        self._clock_stop()
        assert self.containment is not None
        self.containment.freeze()
        return await self.containment.wait_frozen(True, timeout)

    async def resume(self, timeout: float = 5.0) -> bool:
        """Thaw the tree, then release held requests in the order they arrived."""
        if self.machine.state is not RunState.PAUSED:
            if self.machine.state is RunState.RUNNING:
                return True
            raise InvalidTransition(f"run {self.id} is {self.state.value}; only a paused run can be resumed")
        assert self.containment is not None
        self.containment.thaw()
        thawed = await self.containment.wait_frozen(False, timeout)
        if self.machine.state is not RunState.PAUSED:
            return thawed  # stopped meanwhile: the stop sequence owns it now
        self.machine.to(RunState.RUNNING)
        self._clock_start()
        self._services.broker.release(self.channel)
        return thawed

    def final_state(self, mode: str, exit_code: int | None) -> RunState:
        if mode == "exit":
            ok = exit_code == 0 and self._failure is None
            return RunState.EXITED if ok else RunState.FAILED
        if mode == "kill" or (self.progress is not None and self.progress.kill_requested):
            return RunState.KILLED
        return RunState.STOPPED

    # -- verbs ---------------------------------------------------------------------------
    def begin_end(self, mode: str, source: str, reason: str, grace: float | None = None,
                  requested_at: int | None = None) -> asyncio.Task[StopReport]:
        """Start ending the run without waiting: revoke now, signal when the task runs (a run still
        starting: once it is attached).

        The one entry of every verb that ends a run. A kill while a stop is in
        progress escalates that stop instead of starting another. A session
        ends a whole tree by calling this for every run first (all revoked in
        one loop step) and awaiting the tasks afterwards.
        """
        req = StopRequest.of(mode, source, reason, 0.0 if mode == StopMode.KILL else
                             (self.grace if grace is None else grace), requested_at or time.monotonic_ns())
        if req.mode is StopMode.KILL and self.progress is not None:  # a stop is under way: cut it short
            self.progress.kill_requested = True
            self.progress.escalated.set()
            return self._stop_task  # type: ignore[return-value]
        return self._begin(req)

    async def stop(self, grace: float | None = None, *, requested_at: int | None = None,
                   source: str = "api", reason: str = "stop requested") -> StopReport:
        """Revoke, SIGTERM, wait `grace`, SIGKILL, sweep. Returns the report.

        Raises StopIncomplete (carrying the report) if anything survived.
        """
        return await self._await_end(self.begin_end(StopMode.STOP, source, reason, grace, requested_at))

    async def kill(self, *, requested_at: int | None = None, source: str = "api",
                   reason: str = "kill requested") -> StopReport:
        """Revoke and SIGKILL at once; escalates a stop already in progress."""
        return await self._await_end(self.begin_end(StopMode.KILL, source, reason, requested_at=requested_at))

    async def _await_end(self, task: asyncio.Task[StopReport]) -> StopReport:
        report = await asyncio.shield(task)
        if report.survivors:
            raise StopIncomplete(report)
        return report

    async def wait(self, timeout: float | None = None) -> ExitInfo:
        """Wait for the run to end (by itself or by a stop); RunTimeout (a TimeoutError) after `timeout`."""
        try:
            await asyncio.wait_for(asyncio.shield(self._done.wait()), timeout)
        except asyncio.TimeoutError:
            raise RunTimeout(f"run {self.id} is still {self.state.value} after {timeout:g} s; it goes on",
                             run_id=self.id, state=self.state.value) from None
        report = await asyncio.shield(self._stop_task)  # type: ignore[arg-type]
        return ExitInfo(self.id, self.state, report.exit_code, report.exit_signal, report)

    async def result(self, timeout: float | None = None) -> Any:
        """The target's JSON return value; RunFailed if it raised, was stopped first, or is an argv run that failed."""
        info = await self.wait(timeout)
        if self._failure is not None:
            type_name, message, tb = self._failure
            raise RunFailed(f"run {self.id} raised {type_name}: {message}", run_id=self.id,
                            remote_type=type_name, remote_traceback=tb, exit_code=info.exit_code)
        if self._has_result:
            return self._result
        if info.state is RunState.EXITED:
            return None  # argv runs, or a target that ended without reporting
        how = f"exit code {info.exit_code}" if info.exit_code is not None else (
            f"signal {signal.Signals(info.exit_signal).name}" if info.exit_signal else info.state.value)
        raise RunFailed(f"run {self.id} ended without a result ({info.state.value}, {how})", run_id=self.id,
                        exit_code=info.exit_code)

    def __repr__(self) -> str:
        return f"<AsyncRun {self.id} pid={self.pid} {self.state.value}>"
