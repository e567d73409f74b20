"""The deadstop side of the kill benchmark: revoke, stop, tree stop, SIGTERM-ignorer stop, start latency, egress.

Every trial starts a fresh run, waits until the target (and, for a tree,
all 40 members) announced itself on the ready FIFO, lets the supervisor go
idle for `settle` seconds, then stops it with the caller's clock read just
before the call. Starts are likewise preceded by `settle` of idleness, as
are the floors: on a VM, waking an idle vCPU costs a visible fraction of a
millisecond, and a floor measured back-to-back would hide it. Each stop is checked independently of the report: pidfds
opened on every announced member before the stop must all be readable
(exited) when it returns.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from typing import Any, Callable

import cloudpickle

from . import progress
from . import targets as _targets
from .procs import ReadyChannel, Tracked, cleanup_leaked, tree_ready
from .stats import Dist

# Targets travel by value, as a user's closure would: unpickling them in the
# run must not import benchmark modules (that import would be timed as start).
cloudpickle.register_pickle_by_value(_targets)


@dataclasses.dataclass
class StopSamples:
    """Per-trial figures of one kind of stop, plus what the reports and the pidfd check said."""

    start: list[int] = dataclasses.field(default_factory=list)
    revoke: list[int] = dataclasses.field(default_factory=list)
    stop: list[int] = dataclasses.field(default_factory=list)
    ended_by: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    survivors: int = 0  # members the pidfd check found alive after stop() returned

    def note(self) -> str:
        return ended_note(self.ended_by, self.survivors)


def ended_note(ended_by: collections.Counter, survivors: int, after: str = "stop") -> str:
    """How the runs ended (report.ended_by, counted), and what the pidfd check found alive after `after`."""
    how = ",".join(f"{k}:{v}" for k, v in sorted(ended_by.items()))
    alive = f"; {survivors} ALIVE after {after}" if survivors else "; 0 left"
    return f"ended_by {how}{alive}"


def _record(samples: StopSamples, t_start: int, ready_t: int, t0: int, report: Any, tracked: Tracked,
            grace_ns: int = 0) -> None:
    samples.start.append(ready_t - t_start)
    samples.revoke.append(report.revoked_at - t0)
    samples.stop.append(report.reaped_at - t0 - grace_ns)
    samples.ended_by[report.ended_by] += 1
    samples.survivors += cleanup_leaked(tracked, 0.0)


def _stop(run: Any) -> Any:
    """run.stop(), keeping the report when the library says something survived."""
    from deadstop.supervisor import StopIncomplete

    try:
        return run.stop()
    except StopIncomplete as exc:
        return exc.report


async def _astop(run: Any) -> Any:
    from deadstop.supervisor import StopIncomplete

    try:
        return await run.stop()
    except StopIncomplete as exc:
        return exc.report


def stop_trials(sup: Any, chan: ReadyChannel, target: Callable[..., Any], trials: int, settle: float,
                grace: float = 1.0, tree: bool = False, desc: str = "deadstop: stop") -> StopSamples:
    """Start `target`, wait for it, stop it; `grace` is subtracted from the stop figure only when it
    is expected to elapse (a SIGTERM ignorer)."""
    out = StopSamples()
    subtract = int(grace * 1e9) if target is _targets.term_ignorer else 0
    for i in progress.trials(trials + 2, desc):  # two warm-ups
        time.sleep(settle)
        t_start = time.monotonic_ns()
        run = sup.start(target, chan.path, grace=grace)
        ready = tree_ready(chan) if tree else chan.wait(1)
        time.sleep(settle)
        with Tracked([r.pid for r in ready]) as tracked:
            t0 = time.monotonic_ns()
            report = _stop(run)
            if i >= 2:
                _record(out, t_start, ready[0].t_ns, t0, report, tracked, subtract)
            else:
                cleanup_leaked(tracked, 0.0)
    return out


async def async_stop_trials(sup: Any, chan: ReadyChannel, trials: int, settle: float) -> StopSamples:
    """stop_trials for the asyncio core, called from a coroutine on the supervisor's own loop."""
    out = StopSamples()
    for i in progress.trials(trials + 2, "deadstop: stop, asyncio core"):
        await asyncio.sleep(settle)
        t_start = time.monotonic_ns()
        run = await sup.start(_targets.sleeper, chan.path, grace=1.0)
        ready = chan.wait(1)  # brief blocking read; nothing on the loop is waiting for it
        await asyncio.sleep(settle)
        with Tracked([r.pid for r in ready]) as tracked:
            t0 = time.monotonic_ns()
            report = await _astop(run)
            if i >= 2:
                _record(out, t_start, ready[0].t_ns, t0, report, tracked)
            else:
                cleanup_leaked(tracked, 0.0)
    return out


def egress_rtt(sup: Any, tool: str, n: int) -> Dist:
    """Per-call round trips as timed inside the run."""
    run = sup.start(_targets.egress_round_trips, tool, n, 200, tools=[tool])
    return Dist(run.result(timeout=300))


def egress_pipelined(sup: Any, tool: str, batches: int, batch: int) -> Dist:
    """Durations of `batch` concurrent acalls, as timed inside the run."""
    run = sup.start(_targets.egress_pipelined, tool, batches, batch, tools=[tool])
    return Dist(run.result(timeout=300))


def measure_isolation_off(chan: ReadyChannel, trials: int, settle: float) -> StopSamples:
    """Start and stop of a cooperative run with isolation="off": what isolation costs is the difference."""
    from deadstop.supervisor import Supervisor

    with Supervisor(isolation="off") as sup:
        return stop_trials(sup, chan, _targets.sleeper, trials, settle, desc="deadstop: isolation=off")


def measure_sync(containment: str, chan: ReadyChannel, trials: int, settle: float, grace: float,
                 egress: dict[str, int] | None) -> tuple[str, dict[str, Any]]:
    """All figures for one containment layer through the blocking Supervisor (isolation="auto").

    Returns the layer the supervisor actually chose and the figures.
    """
    from deadstop.supervisor import Supervisor

    res: dict[str, Any] = {}
    with Supervisor(containment=containment) as sup:
        res["isolation"] = str(sup.isolation)
        sup.register_tool("noop", _targets.noop)
        sup.register_tool("anoop", _targets.anoop)
        where = f"deadstop ({containment})"
        res["coop"] = stop_trials(sup, chan, _targets.sleeper, trials, settle, desc=f"{where}: cooperative")
        res["tree"] = stop_trials(sup, chan, _targets.tree, trials, settle, tree=True, desc=f"{where}: tree")
        res["ignorer"] = stop_trials(sup, chan, _targets.term_ignorer, trials, settle, grace=grace,
                                     desc=f"{where}: SIGTERM-ignorer")
        if egress:
            for tool in ("noop", "anoop"):
                res[f"rtt_{tool}"] = egress_rtt(sup, tool, egress["calls"])
                res[f"piped_{tool}"] = egress_pipelined(sup, tool, egress["batches"], egress["batch"])
        layer = sup.containment
    return layer, res


def measure_async(chan: ReadyChannel, trials: int, settle: float) -> tuple[str, StopSamples]:
    """Cooperative stop through AsyncSupervisor: no hop from a caller thread onto the loop."""
    from deadstop.supervisor import AsyncSupervisor

    async def go() -> tuple[str, StopSamples]:
        async with AsyncSupervisor(containment="auto") as sup:
            return sup.containment, await async_stop_trials(sup, chan, trials, settle)

    return asyncio.run(go())
