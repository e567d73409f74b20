"""`deadstop bench --target MODULE:ATTR | --argv CMD ...`: the user's own agent, stopped and killed N times.

Each trial starts the agent, lets it work for `run_for` seconds (forking,
calling tools), then ends it with stop() (revoke, SIGTERM, grace, SIGKILL,
sweep) or kill() (revoke, SIGKILL, sweep), alternately, so that drift on a
shared host hits both alike. Beside each figure is the floor of this host,
measured first in the same run (kill+waitpid of one forked child, cgroup.kill
and killpg of a 40-process tree, a warm fork, a loop-thread hop).

What survived is counted twice: by the StopReport, and independently of it,
by pidfds opened before the stop on every process that carried the run's
marker in /proc (or descended from its leader), plus a scan for the marker
after the stop; anything found is killed. What the agent did after the
revoke comes from the report (tool calls refused, handlers cancelled or
still running on a thread) and from the bench's own tool wrappers, which
stamp every call's start: a call that started after `revoked_at` is a late effect.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import inspect
import os
import threading
import time
from typing import Any, Callable

from ..facades.demo import alive_with_marker
from . import progress
from .procs import ReadyChannel, Tracked, cleanup_leaked
from .report import Figure, Measured, log
from .stats import Dist, Row, latency_row
from .usertarget import Target, from_argv, from_spec, tool_spec

WARMUPS = 2  # one stop and one kill before the measured trials: the first runs warm the spawner's pages
SECTION_FLOORS = "floors, measured in this run"


@dataclasses.dataclass
class Config:
    target: str
    kind: str  # "python" or "argv"
    trials: int
    grace: float
    run_for: float
    containment: str
    isolation: str
    tools: list[str]
    peers: bool
    settle: float
    cwd: str | None


@dataclasses.dataclass
class Trial:
    """One run of the agent, ended by `verb`; times in ns, from the caller's clock before the call."""

    verb: str
    start_returned: int  # start() called -> start() returned
    first_line: int | None  # start() called -> the agent's first line (Python targets)
    revoke: int  # stop()/kill() called -> revoked_at
    end: int  # stop()/kill() called -> reaped_at
    ended_by: str
    processes: int  # the run's processes seen just before the stop
    survivors_reported: int
    survivors_counted: int
    refused_after_revoke: int
    handlers_cancelled: int
    handlers_outlived_revoke: int
    tool_calls: int  # calls of the bench's tools that started during the run
    late_effects: int  # ... of them after revoked_at, plus handlers that outlived the revoke
    ended_before_stop: bool  # the agent had already exited: excluded from the latency figures
    early_exit: str = ""  # how, if it had: its state, exit code, and what it raised


# -- the run's processes, seen independently of the library -------------------------------------

def run_processes(run: Any) -> list[int]:
    """The run's processes now: by marker, and every descendant of its leader (a child may clear its environment)."""
    import psutil

    pids = set(alive_with_marker(run.id))
    if run.pid:
        try:
            leader = psutil.Process(run.pid)
            pids.update([run.pid, *(p.pid for p in leader.children(recursive=True))])
        except psutil.Error:
            pass
    return sorted(pids)


def _kill_marked(run_id: str) -> int:
    """Processes with the run's marker still alive after its stop: killed (by pidfd), and counted."""
    pids = alive_with_marker(run_id)
    if pids:
        with Tracked(pids) as tracked:
            cleanup_leaked(tracked, 0.0)
    return len(pids)


# -- the tools the agent may call -------------------------------------------------------------------

class CallLog:
    """(run id, start time) of every call of the bench's tools, stamped by their wrappers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: list[tuple[str, int]] = []

    def record(self, run_id: str) -> None:
        with self._lock:
            self._calls.append((run_id, time.monotonic_ns()))

    def of(self, run_id: str) -> list[int]:
        with self._lock:
            return [t for rid, t in self._calls if rid == run_id]


def recording(fn: Callable[..., Any] | None, calls: CallLog) -> Callable[..., Any]:
    """`fn` (a no-op if None) behind a wrapper that stamps each call; same arguments, same sync/async kind,
    and a `ctx` for the wrapper (passed on to `fn` only if `fn` asked for one)."""
    if fn is None:
        async def noop(*args: Any, ctx: Any, **kwargs: Any) -> None:
            calls.record(ctx.run_id)

        return noop
    sig = inspect.signature(fn)
    wants_ctx = "ctx" in sig.parameters
    params = list(sig.parameters.values())
    if not wants_ctx:
        ctx_param = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY)
        at = len(params) - (1 if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD else 0)
        params.insert(at, ctx_param)
    inner = fn

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def wrapper(*args: Any, ctx: Any, **kwargs: Any) -> Any:
            calls.record(ctx.run_id)
            return await inner(*args, **({**kwargs, "ctx": ctx} if wants_ctx else kwargs))
    else:
        @functools.wraps(fn)
        def wrapper(*args: Any, ctx: Any, **kwargs: Any) -> Any:
            calls.record(ctx.run_id)
            return inner(*args, **({**kwargs, "ctx": ctx} if wants_ctx else kwargs))

    del wrapper.__wrapped__  # the broker reads the signature below, not fn's
    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return wrapper


# -- trials -------------------------------------------------------------------------------------------

def _end(run: Any, verb: str) -> Any:
    """run.stop() or run.kill(), keeping the report when the library says something survived."""
    from ..errors import StopIncomplete

    try:
        return run.stop() if verb == "stop" else run.kill()
    except StopIncomplete as exc:
        return exc.report


def _how_it_ended(run: Any) -> str:
    """An agent that ended before its stop was measured doing nothing: say why, in its own words if it raised."""
    from ..errors import RunFailed

    info = run.wait(timeout=5)
    how = f"{info.state.value}, exit code {info.exit_code}" + (f", signal {info.exit_signal}" if info.exit_signal else "")
    try:
        run.result(timeout=5)
    except RunFailed as exc:
        last = (exc.remote_traceback or "").strip().splitlines()[-1:] or [str(exc)]
        how += f": {last[0]}"
    except Exception:  # a command has no result to read; its exit code says it all
        pass
    return how


def one_trial(sup: Any, target: Target, chan: ReadyChannel, cfg: Config, calls: CallLog, verb: str) -> Trial:
    from . import targets

    time.sleep(cfg.settle)
    t_start = time.monotonic_ns()
    if target.fn is not None:
        run = sup.start(targets.timed_agent, chan.path, target.fn, tools=cfg.tools, grace=cfg.grace, cwd=cfg.cwd)
    else:
        run = sup.start(list(target.argv), tools=cfg.tools, grace=cfg.grace, cwd=cfg.cwd)
    t_started = time.monotonic_ns()
    first_line = None
    if target.fn is not None:
        (ready,) = chan.wait(1, timeout=60)
        first_line = ready.t_ns - t_start
    time.sleep(cfg.run_for)
    pids = run_processes(run)
    ended_before = run.state.value not in ("starting", "running", "paused")
    with Tracked(pids) as tracked:
        t0 = time.monotonic_ns()
        report = _end(run, verb)
        counted = cleanup_leaked(tracked, 0.0)
    counted += _kill_marked(run.id)
    early = _how_it_ended(run) if ended_before else ""
    started = calls.of(run.id)
    late = sum(1 for t in started if t > report.revoked_at) + len(report.handlers_outlived_revoke)
    return Trial(verb=verb, start_returned=t_started - t_start, first_line=first_line,
                 revoke=report.revoked_at - t0, end=report.reaped_at - t0, ended_by=report.ended_by,
                 processes=len(pids), survivors_reported=report.survivors, survivors_counted=counted,
                 refused_after_revoke=report.refused_after_revoke, handlers_cancelled=report.handlers_cancelled,
                 handlers_outlived_revoke=len(report.handlers_outlived_revoke), tool_calls=len(started),
                 late_effects=late, ended_before_stop=ended_before, early_exit=early)


def measure_agent(target: Target, cfg: Config, chan: ReadyChannel,
                  handlers: dict[str, Callable[..., Any] | None]) -> tuple[str, str, list[Trial]]:
    """Every trial in one Supervisor; (the layer it chose, its isolation, the trials)."""
    from ..facades.sync import Supervisor

    calls = CallLog()
    out: list[Trial] = []
    with Supervisor(containment=cfg.containment, isolation=cfg.isolation, grace=cfg.grace) as sup:
        for name, fn in handlers.items():
            sup.register_tool(name, recording(fn, calls))
        log(f"your agent: {target.label}, {cfg.trials} stops and {cfg.trials} kills "
            f"({sup.containment} layer, grace {cfg.grace:g} s, {cfg.run_for:g} s of work before each)")
        for i in progress.trials(2 * cfg.trials + WARMUPS, "your agent: stop / kill"):
            trial = one_trial(sup, target, chan, cfg, calls, "stop" if i % 2 == 0 else "kill")
            if i >= WARMUPS:
                out.append(trial)
            elif trial.survivors_reported or trial.survivors_counted:
                out.append(trial)  # a warm-up that left something alive is a finding, not a warm-up
        return sup.containment, str(sup.isolation), out


def measure_floors(cfg: Config) -> dict[str, Any]:
    """The floors the agent's figures are held to; the forking ones first, while this process has no threads."""
    from . import floors

    log("floors: kill+waitpid of a forked child, warm fork, cgroup.kill and killpg of a 40-process tree")
    f: dict[str, Any] = {"fork_kill": floors.fork_kill(cfg.trials, cfg.settle),
                         "warm_fork": floors.warm_fork(cfg.trials, cfg.settle)}
    f.update(floors.tree_floors(cfg.trials, cfg.settle))
    f["hop"] = floors.loop_hop(cfg.trials, cfg.settle)
    return f


# -- the report ------------------------------------------------------------------------------------------

def _measured(trials: list[Trial]) -> list[Trial]:
    return [t for t in trials if not t.ended_before_stop]


def _ended_note(trials: list[Trial]) -> str:
    how = collections.Counter(t.ended_by for t in trials)
    alive = sum(t.survivors_counted for t in trials)
    return ",".join(f"{k}:{v}" for k, v in sorted(how.items())) + (f"; {alive} ALIVE after" if alive else "; 0 left")


def stop_floor(f: dict[str, Any], trials: list[Trial]) -> tuple[str, Dist | None]:
    """One process: kill+waitpid of one child. A tree: one cgroup.kill (or killpg) of a 40-process tree."""
    if max((t.processes for t in trials), default=1) <= 1:
        return "kill+waitpid", f["fork_kill"]
    if f["cgroup_kill"] is not None:
        return "cgroup.kill, 40-tree", f["cgroup_kill"]
    return "killpg, 40-tree", f["killpg"]


def floor_rows(f: dict[str, Any]) -> list[Row]:
    rows = [latency_row(SECTION_FLOORS, "kill(SIGTERM)+waitpid, 1 idle forked child", f["fork_kill"]),
            latency_row(SECTION_FLOORS, "fork -> child's 1st line (warm process)", f["warm_fork"]),
            latency_row(SECTION_FLOORS, "asyncio run_coroutine_threadsafe hop", f["hop"])]
    if f["cgroup_kill"] is not None:
        rows.append(latency_row(SECTION_FLOORS, "cgroup.kill+populated 0+waitpid, 40-tree", f["cgroup_kill"]))
    rows.append(latency_row(SECTION_FLOORS, "killpg(SIGKILL)+reap all, 40-tree", f["killpg"]))
    return rows


def agent_rows(section: str, trials: list[Trial], f: dict[str, Any], grace: float) -> list[Row]:
    done = _measured(trials)
    stops = [t for t in done if t.verb == "stop"]
    kills = [t for t in done if t.verb == "kill"]
    fname, fdist = stop_floor(f, done)
    procs = sorted({t.processes for t in done})
    pnote = f"{procs[0]}-{procs[-1]} processes" if procs and procs[0] != procs[-1] else \
        f"{procs[0] if procs else 0} process(es)"
    rows = []
    first = [t.first_line for t in done if t.first_line is not None]
    if first:
        rows.append(latency_row(section, "start (start() called -> agent's 1st line)", Dist(first), f["warm_fork"],
                                "warm fork"))
    rows += [
        latency_row(section, "start() returned (run contained and running)", Dist([t.start_returned for t in done]),
                    f["warm_fork"], "warm fork"),
        latency_row(section, "revoke latency (stop() called -> revoked_at)", Dist([t.revoke for t in stops]),
                    f["hop"], "loop-thread hop"),
        latency_row(section, "stop() -> reaped_at", Dist([t.end for t in stops]), fdist, fname,
                    note=f"{pnote}; ended_by {_ended_note(stops)}"),
    ]
    killed = [t for t in stops if t.ended_by in ("sigkill", "swept")]
    if killed:
        rows.append(latency_row(section, f"stop() minus grace {grace:g}s, runs SIGKILLed after it",
                                Dist([t.end - int(grace * 1e9) for t in killed]), fdist, fname,
                                note=f"{len(killed)}/{len(stops)} ignored SIGTERM for the whole grace"))
    rows.append(latency_row(section, "kill() -> reaped_at", Dist([t.end for t in kills]), fdist, fname,
                            note=f"{pnote}; ended_by {_ended_note(kills)}"))
    return rows


def findings(trials: list[Trial]) -> tuple[list[str], dict[str, Any]]:
    """The survivors and what the agent did after its revokes: printed lines and their JSON."""
    reported = sum(t.survivors_reported for t in trials)
    counted = sum(t.survivors_counted for t in trials)
    after = {"refused_after_revoke": sum(t.refused_after_revoke for t in trials),
             "handlers_cancelled": sum(t.handlers_cancelled for t in trials),
             "handlers_outlived_revoke": sum(t.handlers_outlived_revoke for t in trials),
             "late_effects": sum(t.late_effects for t in trials),
             "tool_calls": sum(t.tool_calls for t in trials)}
    early = sum(1 for t in trials if t.ended_before_stop)
    lines = [f"survivors: {reported} by the stop reports, {counted} counted independently (the run's marker in "
             f"/proc and pidfds opened before each stop), over {len(trials)} runs"
             + ("  <- FAILED: something outlived its stop" if reported or counted else ""),
             f"after the revoke (StopReports): {after['refused_after_revoke']} tool calls refused, "
             f"{after['handlers_cancelled']} handlers cancelled before their effect, "
             f"{after['handlers_outlived_revoke']} still running on a thread at the revoke",
             f"late effects (tool calls started after revoked_at, or outliving it): {after['late_effects']} "
             f"of {after['tool_calls']} tool calls that ran"]
    if early:
        why = next(t.early_exit for t in trials if t.ended_before_stop)
        lines.append(f"{early} run(s) had already exited before their stop, left out of the latency figures "
                     f"(the first: {why}); give the agent work that lasts longer than --run-for")
    return lines, {"survivors": {"reported": reported, "counted": counted}, "after_revoke": after,
                   "ended_before_stop": early}


def summary(trials: list[Trial]) -> dict[str, Any]:
    """Distributions (ns) of each figure, for the JSON."""
    done = _measured(trials)
    first = [t.first_line for t in done if t.first_line is not None]
    out = {"start_returned": Dist([t.start_returned for t in done]).summary(),
           "stop": Dist([t.end for t in done if t.verb == "stop"]).summary(),
           "kill": Dist([t.end for t in done if t.verb == "kill"]).summary(),
           "revoke": Dist([t.revoke for t in done]).summary(),
           "ended_by": dict(collections.Counter(t.ended_by for t in trials))}
    if first:
        out["start"] = Dist(first).summary()
    return out


def figures(label: str, trials: list[Trial], f: dict[str, Any], peers: dict[str, Any] | None) -> list[Figure]:
    done = _measured(trials)
    stop: list[tuple[str, list[int]]] = [
        (f"{label}: stop()", [t.end for t in done if t.verb == "stop"]),
        (f"{label}: kill()", [t.end for t in done if t.verb == "kill"])]
    for name, res in (peers or {}).get("peers", {}).items():
        stop.append((f"{name} (40-tree)", res["tree"]["samples"]))
    stop.append(("floor: kill+waitpid", f["fork_kill"].samples))
    if f["cgroup_kill"] is not None:
        stop.append(("floor: cgroup.kill, 40-tree", f["cgroup_kill"].samples))
    stop.append(("floor: killpg, 40-tree", f["killpg"].samples))
    first = [t.first_line for t in done if t.first_line is not None]
    start = ([(f"{label}: 1st line", first)] if first else []) + [
        (f"{label}: start() returned", [t.start_returned for t in done]), ("floor: warm fork", f["warm_fork"].samples)]
    revoke = [(label, [t.revoke for t in done]), ("floor: loop-thread hop", f["hop"].samples)]
    return [("stop and kill of your agent", stop), ("start", start), ("revoke latency", revoke)]


# -- entry ---------------------------------------------------------------------------------------------------

def load(args: argparse.Namespace) -> tuple[Target, dict[str, Callable[..., Any] | None]]:
    """The target and tool handlers the options name; TargetError if any names nothing runnable."""
    target = from_spec(args.target) if args.target else from_argv(list(args.argv or []))
    handlers = dict(tool_spec(spec) for spec in args.tool or [])
    return target, handlers


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("your agent (--target or --argv)")
    g.add_argument("--target", metavar="MODULE:ATTR",
                   help="a callable (called with no arguments) to run as the agent; MODULE is imported with the "
                        "current directory first on sys.path")
    g.add_argument("--argv", nargs=argparse.REMAINDER, metavar="CMD",
                   help="a command to run as the agent: everything after --argv (put it last)")
    g.add_argument("--tool", action="append", metavar="NAME[=MODULE:ATTR]",
                   help="a tool the agent may call: a no-op, or your handler (repeatable)")
    g.add_argument("--run-for", type=float, default=None, metavar="SECONDS",
                   help="how long the agent works before each stop (default 0.5 s, 0.1 s with --quick)")
    g.add_argument("--cwd", metavar="DIR", help="the agent's working directory (shared with this host; default: "
                                                "the run's own, private one)")
    g.add_argument("--containment", choices=["auto", "cgroup", "process-group"], default="auto")
    g.add_argument("--isolation", choices=["auto", "strict", "off"], default="auto")


def main(args: argparse.Namespace, trials: int) -> int:
    from .report import run

    target, handlers = load(args)  # a TargetError here is the command's exit status 2
    run_for = args.run_for if args.run_for is not None else 0.1 if args.quick else 0.5
    grace = args.grace if args.grace is not None else 0.5
    cfg = Config(target=target.label, kind="python" if target.fn is not None else "argv", trials=trials, grace=grace,
                 run_for=run_for, containment=args.containment, isolation=args.isolation, tools=sorted(handlers),
                 peers=bool(args.peers), settle=0.02, cwd=os.path.abspath(args.cwd) if args.cwd else None)

    def measure(chan: ReadyChannel) -> Measured:
        from .kill import peer_rows
        from .floors import run_helper

        f = measure_floors(cfg)
        layer, isolation, done = measure_agent(target, cfg, chan, handlers)
        peers = None
        if cfg.peers:
            log("peers: multiprocess, psutil, killpg, pebble, loky on the built-in run and tree (subreaper helper)")
            peers = run_helper(f"{__package__}.peers", cfg.trials, cfg.settle, timeout=900)
        rows = floor_rows(f) + agent_rows(f"your agent: {target.label} ({layer} layer, Supervisor)", done, f, grace)
        if peers is not None:
            tree_floor = ("cgroup.kill", f["cgroup_kill"]) if f["cgroup_kill"] is not None else ("killpg", f["killpg"])
            rows += peer_rows(peers, f, tree_floor)
        lines, found = findings(done)
        doc = {"target": target.label, "kind": cfg.kind, "containment": layer, "isolation": isolation,
               "trials": trials, "runs": [dataclasses.asdict(t) for t in done], "summary": summary(done), **found,
               "floors": {k: v.summary() for k, v in f.items() if hasattr(v, "summary")}}
        failed = bool(found["survivors"]["reported"] or found["survivors"]["counted"])
        return Measured(rows, f["cgroup_error"], lines=lines, json=doc, figures=figures(target.label, done, f, peers),
                        failed=failed)

    return run(cfg, args.json, measure, args.plot)
