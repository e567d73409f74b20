"""The deadstop side of the session benchmark: takeover, pause, stop of a three-level session tree.

Each trial waits until every process of the measured run (or session tree)
announced itself on the ready FIFO, lets the supervisor settle, then reads
the caller's clock just before the verb. Independently of what the library
reports, pidfds opened on every announced process before the verb are
checked afterwards (every stopped member must have exited; the paused tree
must have used no CPU after pause() returned).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any

import cloudpickle

from benchmarks import _session_targets
from benchmarks._deadstop import _stop, ended_note  # also registers _targets for pickling by value
from benchmarks._procs import ReadyChannel, Tracked, cleanup_leaked
from benchmarks._session_targets import BUSY_PROCS, LEVELS, busy_agent, flood_agent, level_agent, level_size
from benchmarks._targets import noop

cloudpickle.register_pickle_by_value(_session_targets)

#: How long a flooding run floods before it is stopped or taken over.
FLOOD_RUNNING = 0.03
#: After pause() returned, the paused tree must gain no CPU time over this window.
FROZEN_CHECK = 0.005


def register(sup: Any) -> None:
    """The tool and the three agents every measured supervisor has."""
    sup.register_tool("noop", noop)
    sup.register_agent("flooder", flood_agent, tools=["noop"])
    sup.register_agent("busy", busy_agent)
    sup.register_agent("level", level_agent, tools=["sessions.spawn"])


# -- takeover ----------------------------------------------------------------------------

@dataclasses.dataclass
class TakeoverSamples:
    takeover: list[int] = dataclasses.field(default_factory=list)  # t0 -> new run's first line
    old_reaped: list[int] = dataclasses.field(default_factory=list)  # t0 -> old run's reaped_at
    new_after_reap: list[int] = dataclasses.field(default_factory=list)  # old reaped_at -> new first line
    floor_stop: list[int] = dataclasses.field(default_factory=list)  # plain run.stop() of a flooding run
    floor_start: list[int] = dataclasses.field(default_factory=list)  # sup.start() -> first line
    ended_by: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    floor_ended_by: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    flood_rate: list[float] = dataclasses.field(default_factory=list)  # calls/s dispatched before the takeover
    survivors: int = 0

    @property
    def floor(self) -> list[int]:
        """Stop then start, summed trial by trial."""
        return [a + b for a, b in zip(self.floor_stop, self.floor_start)]

    def note(self, counter: collections.Counter, what: str = "old run") -> str:
        return f"{what} {ended_note(counter, self.survivors, 'a stop or takeover')}"


def _flood_rate(run: Any, since_ns: int, until_ns: int) -> float:
    calls = run._core.usage.tool_calls  # set from the channel when the run ended
    return calls * 1e9 / max(1, until_ns - since_ns)


def takeover_trials(sup: Any, chan: ReadyChannel, trials: int, settle: float, threads: int) -> TakeoverSamples:
    """Per trial: a session takeover of a flooding run, then the floor's two parts on equal runs."""
    out = TakeoverSamples()
    flood = {"mode": "flood", "path": chan.path, "tool": "noop", "threads": threads}
    probe = {"mode": "probe", "path": chan.path}
    session = sup.session("bench-takeover", agent="flooder")
    for i in range(trials + 2):  # two warm-ups
        keep = i >= 2
        # 1. takeover: the session's flooding run is superseded by a new message.
        time.sleep(settle)
        old = session.send(flood)
        (ready,) = chan.wait(1)
        time.sleep(FLOOD_RUNNING)
        with Tracked([ready.pid]) as tracked:
            t0 = time.monotonic_ns()
            new = session.send(probe)
            (first,) = chan.wait(1)
            left = cleanup_leaked(tracked, 0.0)
        report = old.report
        new.wait(timeout=10)
        if keep:
            out.takeover.append(first.t_ns - t0)
            out.old_reaped.append(report.reaped_at - t0)
            out.new_after_reap.append(first.t_ns - report.reaped_at)
            out.ended_by[report.ended_by] += 1
            out.flood_rate.append(_flood_rate(old, ready.t_ns, report.revoked_at))
            out.survivors += left
        # 2. floor, first part: plain run.stop() of an equal flooding run.
        time.sleep(settle)
        run = sup.start(flood_agent, flood, tools=["noop"])
        (ready,) = chan.wait(1)
        time.sleep(FLOOD_RUNNING)
        with Tracked([ready.pid]) as tracked:
            t0 = time.monotonic_ns()
            report = _stop(run)
            left = cleanup_leaked(tracked, 0.0)
        if keep:
            out.floor_stop.append(report.reaped_at - t0)
            out.floor_ended_by[report.ended_by] += 1
            out.survivors += left
        # 3. floor, second part: sup.start() of the same target, to its first line.
        time.sleep(settle)
        t0 = time.monotonic_ns()
        run = sup.start(flood_agent, probe)
        (first,) = chan.wait(1)
        run.wait(timeout=10)
        if keep:
            out.floor_start.append(first.t_ns - t0)
    return out


# -- pause -------------------------------------------------------------------------------

@dataclasses.dataclass
class PauseSamples:
    pause: list[int] = dataclasses.field(default_factory=list)
    resume: list[int] = dataclasses.field(default_factory=list)
    not_true: int = 0  # pause() returned False
    not_frozen: int = 0  # the tree used CPU after pause() returned
    survivors: int = 0

    def note(self) -> str:
        parts = [f"{self.not_frozen} trials ran on after pause()" if self.not_frozen else "frozen checked: 0 CPU after",
                 f"{self.not_true} returned False" if self.not_true else "",
                 f"{self.survivors} ALIVE after stop" if self.survivors else "0 left"]
        return "; ".join(p for p in parts if p)

    def add(self, t0: int, t1: int, t2: int, t3: int, ok: bool, ran: bool) -> None:
        """One trial: pause() from t0 to t1 (returning `ok`), resume() from t2 to t3; `ran`: CPU used in between."""
        self.pause.append(t1 - t0)
        self.resume.append(t3 - t2)
        self.not_true += not ok
        self.not_frozen += ran


def _cpu_ns(pids: list[int]) -> int:
    """CPU time of `pids` so far, in nanoseconds (/proc/<pid>/schedstat, first field)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def _ran_on(pids: list[int]) -> bool:
    """Whether the (paused) tree `pids` gains CPU time over FROZEN_CHECK."""
    cpu = _cpu_ns(pids)
    time.sleep(FROZEN_CHECK)
    return _cpu_ns(pids) != cpu


def pause_trials(sup: Any, chan: ReadyChannel, trials: int, settle: float, key: str) -> PauseSamples:
    """One session whose run is a 20-process busy tree, paused and resumed `trials` times.

    `settle` separates a resume from the next pause; keep it >= ~0.1 s, as
    the freeze floor does (see _freezefloor on cgroup.events rate limits).
    """
    out = PauseSamples()
    session = sup.session(key, agent="busy")
    session.send({"path": chan.path, "procs": BUSY_PROCS})
    pids = [r.pid for r in chan.wait(BUSY_PROCS, timeout=30)]
    with Tracked(pids) as tracked:
        try:
            for i in range(trials + 2):
                time.sleep(settle)
                t0 = time.monotonic_ns()
                ok = session.pause()
                t1 = time.monotonic_ns()
                ran = _ran_on(pids)
                t2 = time.monotonic_ns()
                session.resume()
                t3 = time.monotonic_ns()
                if i >= 2:
                    out.add(t0, t1, t2, t3, ok, ran)
        finally:
            session.stop()
            out.survivors += cleanup_leaked(tracked, 0.0)
    return out


# -- stop of a session tree ------------------------------------------------------------------

@dataclasses.dataclass
class TreeStopSamples:
    stop: list[int] = dataclasses.field(default_factory=list)  # t0 -> max reaped_at
    revoke: list[int] = dataclasses.field(default_factory=list)  # t0 -> max revoked_at
    runs: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # reports per stop
    ended_by: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    survivors: int = 0

    def note(self) -> str:
        runs = ",".join(f"{k} runs:{v}" for k, v in sorted(self.runs.items()))
        return f"{runs}; {ended_note(self.ended_by, self.survivors)}"


def tree_size() -> int:
    return sum(level_size(c, g) for c, g in LEVELS)


def tree_stop_trials(sup: Any, chan: ReadyChannel, trials: int, settle: float, prefix: str) -> TreeStopSamples:
    """A fresh three-level session tree per trial (top -> sessions.spawn -> sessions.spawn), stopped from the top."""
    out = TreeStopSamples()
    total = tree_size()
    msg = {"path": chan.path, "agent": "level", "levels": LEVELS}
    for i in range(trials + 2):
        session = sup.session(f"{prefix}-{i}", agent="level")
        time.sleep(settle)
        session.send(msg)
        pids = [r.pid for r in chan.wait(total, timeout=30)]
        time.sleep(settle)
        with Tracked(pids) as tracked:
            t0 = time.monotonic_ns()
            reports = session.stop()
            left = cleanup_leaked(tracked, 0.0)
        if i >= 2:
            out.stop.append(max(r.reaped_at for r in reports) - t0)
            out.revoke.append(max(r.revoked_at for r in reports) - t0)
            out.runs[len(reports)] += 1
            for r in reports:
                out.ended_by[r.ended_by] += 1
            out.survivors += left
    return out


def measure(containment: str, chan: ReadyChannel, trials: int, settle: float, pause_settle: float, threads: int,
            takeover: bool) -> tuple[str, dict[str, Any]]:
    """Every session figure for one containment layer; returns the layer chosen and the figures."""
    from deadstop.supervisor import Supervisor

    res: dict[str, Any] = {}
    with Supervisor(containment=containment) as sup:
        register(sup)
        layer = sup.containment
        if takeover:
            res["takeover"] = takeover_trials(sup, chan, trials, settle, threads)
        res["pause"] = pause_trials(sup, chan, trials, pause_settle, f"bench-pause-{layer}")
        res["tree"] = tree_stop_trials(sup, chan, trials, settle, f"bench-tree-{layer}")
    return layer, res


def measure_async_pause(chan: ReadyChannel, trials: int, settle: float) -> tuple[str, PauseSamples]:
    """pause_trials through AsyncSupervisor, awaited on the supervisor's own loop: no caller-thread hop."""
    import asyncio

    from deadstop.supervisor import AsyncSupervisor

    async def go() -> tuple[str, PauseSamples]:
        out = PauseSamples()
        async with AsyncSupervisor(containment="auto") as sup:
            register(sup)
            session = sup.session("bench-pause-async", "busy")
            await session.send({"path": chan.path, "procs": BUSY_PROCS})
            pids = [r.pid for r in chan.wait(BUSY_PROCS, timeout=30)]  # brief blocking reads, as _deadstop does
            with Tracked(pids) as tracked:
                try:
                    for i in range(trials + 2):
                        await asyncio.sleep(settle)
                        t0 = time.monotonic_ns()
                        ok = await session.pause()
                        t1 = time.monotonic_ns()
                        ran = _ran_on(pids)
                        t2 = time.monotonic_ns()
                        await session.resume()
                        t3 = time.monotonic_ns()
                        if i >= 2:
                            out.add(t0, t1, t2, t3, ok, ran)
                finally:
                    await session.stop()
                    out.survivors += cleanup_leaked(tracked, 0.0)
            return sup.containment, out

    return asyncio.run(go())
