"""How fast deadstop takes over, pauses and stops sessions, against floors measured in the same run.

    python benchmarks/session_latency.py            # 30 trials per figure, under a minute
    python benchmarks/session_latency.py --quick    # 10 trials, smoke run
    python benchmarks/session_latency.py --json out.json

Figures (p50/p99 over independent trials, each beside its floor, the ratio,
the target and PASS/MISS on the p50; the table and helpers are kill_latency's):

takeover  A session's run floods egress (FLOOD_THREADS threads calling a
          no-op tool back to back). t0 = the caller's clock before
          session.send(new message); end = the new run's first line (its
          target's first statement reads the clock and announces it on the
          ready FIFO). Floor: deadstop's own two halves on equal runs, in the
          same trial loop: run.stop() of an equal flooding plain run (t0 ->
          reaped_at) plus sup.start() of the same target (t0 -> first line),
          summed trial by trial. Target: floor + 5 ms.
pause     session.pause() (t0 -> returns True) of a session whose run is a
          tree of 20 busy-looping processes. Floor: a bare cgroup.freeze of
          an equal tree in a cgroup of the benchmark's (write 1, wait by
          inotify for `frozen 1`), and for the fallback layer killpg(SIGSTOP)
          until every member is in state T. Target: 2x floor. Both layers.
tree stop session.stop() of a session tree three levels deep (each level's
          run has its own process tree and spawned the next level with
          sessions.spawn; 40 processes in all, SIGTERM not ignored so no grace
          elapses): t0 -> the latest reaped_at of all reports. Floor: bare
          cgroup.kill of an equal 40-process tree in one cgroup until
          unpopulated and reaped (kill_latency's tree floor), killpg for the
          fallback layer. Target: 1.5x floor.

Nothing started here survives the benchmark: every announced process is
held by a pidfd and checked after each stop, helpers are subreapers, and a
final check kills and lists anything left (see kill_latency.leftover_check).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._procs import ReadyChannel
from benchmarks._session_targets import BUSY_PROCS, LEVELS, level_size
from benchmarks._stats import Dist, Row, latency_row
from benchmarks._targets import TREE_SIZE
from benchmarks.kill_latency import MS, arg_parser, log, run, trial_count

FLOOD_THREADS = 3
TAKEOVER_MARGIN_NS = 5 * MS


@dataclasses.dataclass
class Config:
    trials: int
    settle: float  # idle time before every timed operation, floors and deadstop alike
    pause_settle: float  # between a resume (or thaw) and the next pause (or freeze), see _freezefloor
    flood_threads: int
    fallback: bool


def measure_floors(cfg: Config) -> dict[str, Any]:
    """The bare-primitive floors, each in a subreaper helper process, before any supervisor exists."""
    from benchmarks import _floors

    log(f"floors: cgroup.freeze and killpg(SIGSTOP) of a {BUSY_PROCS}-process busy tree (subreaper helper)")
    frz = _floors.freeze_floors(cfg.trials, cfg.pause_settle)
    log(f"floors: cgroup.kill and killpg of a {TREE_SIZE}-process tree (subreaper helper)")
    trees = _floors.tree_floors(cfg.trials, cfg.settle)
    return {**frz, **trees, "cgroup_error": "; ".join(e for e in (frz["cgroup_error"], trees["cgroup_error"]) if e)}


def measure_deadstop(cfg: Config, chan: ReadyChannel) -> dict[str, Any]:
    from benchmarks import _sessions

    d: dict[str, Any] = {}
    log("deadstop: containment=auto (takeover with its stop/start floor, pause, three-level tree stop)")
    d["auto"] = _sessions.measure("auto", chan, cfg.trials, cfg.settle, cfg.pause_settle, cfg.flood_threads,
                                  takeover=True)
    log("deadstop: asyncio core, containment=auto (pause without the caller-thread hop)")
    d["async"] = _sessions.measure_async_pause(chan, cfg.trials, cfg.pause_settle)
    if cfg.fallback:
        log("deadstop: containment=process-group (pause, three-level tree stop)")
        d["pgroup"] = _sessions.measure("process-group", chan, cfg.trials, cfg.settle, cfg.pause_settle,
                                        cfg.flood_threads, takeover=False)
    return d


# -- rows ------------------------------------------------------------------------------

def floor_rows(f: dict[str, Any], takeover: Any, cfg: Config) -> list[Row]:
    s = "floors, measured in this run"
    rows = [
        latency_row(s, f"deadstop run.stop() of a plain run flooding from {cfg.flood_threads} threads",
                    Dist(takeover.floor_stop), note=takeover.note(takeover.floor_ended_by, "run")),
        latency_row(s, "deadstop sup.start() -> target's 1st line", Dist(takeover.floor_start)),
        latency_row(s, "  the two summed, trial by trial (takeover floor)", Dist(takeover.floor)),
    ]
    if f["cgroup_freeze"] is not None:
        rows.append(latency_row(s, f"cgroup.freeze -> frozen 1 (inotify), {BUSY_PROCS} busy procs", f["cgroup_freeze"]))
    rows.append(latency_row(s, f"killpg(SIGSTOP) -> all in state T, {BUSY_PROCS} busy procs", f["sigstop"],
                            note="state polled every 100 us"))
    if f["cgroup_kill"] is not None:
        rows.append(latency_row(s, f"cgroup.kill+populated 0+waitpid, {TREE_SIZE}-tree", f["cgroup_kill"]))
    rows.append(latency_row(s, f"killpg(SIGKILL)+reap all, {TREE_SIZE}-tree", f["killpg"]))
    return rows


def takeover_rows(section: str, t: Any) -> list[Row]:
    floor = Dist(t.floor)
    rate = sorted(t.flood_rate)[len(t.flood_rate) // 2] if t.flood_rate else 0
    return [
        latency_row(section, "takeover (t0 before send -> new run's 1st line)", Dist(t.takeover), floor,
                    "stop+start", "<= floor + 5 ms", floor.p(50) + TAKEOVER_MARGIN_NS,
                    f"{t.note(t.ended_by)}; flood {rate:,.0f} calls/s dispatched (median)"),
        latency_row(section, "  of which t0 -> old run reaped_at", Dist(t.old_reaped), Dist(t.floor_stop),
                    "run.stop()"),
        latency_row(section, "  of which old reaped_at -> new run's 1st line", Dist(t.new_after_reap),
                    Dist(t.floor_start), "sup.start()"),
    ]


def pause_rows(section: str, p: Any, floor: tuple[str, Dist | None], resume: bool = True) -> list[Row]:
    fname, fdist = floor
    rows = [latency_row(section, f"pause, {BUSY_PROCS} busy processes (t0 -> pause() True)", Dist(p.pause), fdist,
                        fname, "<= 2x floor", 2 * fdist.p(50) if fdist else None, p.note())]
    if resume:
        rows.append(latency_row(section, "resume, 5 ms after pause (-> resume() returned)", Dist(p.resume),
                                note="no target: the thawed busy tree competes with the caller's wake-up"))
    return rows


def tree_rows(section: str, t: Any, floor: tuple[str, Dist | None]) -> list[Row]:
    fname, fdist = floor
    sizes = "+".join(str(level_size(c, g)) for c, g in LEVELS)
    return [
        latency_row(section, f"stop, 3-level session tree ({sizes} procs) -> last reaped_at", Dist(t.stop), fdist,
                    fname, "<= 1.5x floor", 1.5 * fdist.p(50) if fdist else None, t.note()),
        latency_row(section, "  t0 -> last revoked_at of the tree", Dist(t.revoke)),
    ]


def build_rows(f: dict[str, Any], d: dict[str, Any], cfg: Config) -> list[Row]:
    layer, auto = d["auto"]
    rows = floor_rows(f, auto["takeover"], cfg)
    cgroup = layer == "cgroup"
    section = f"deadstop sessions, {layer} layer (Supervisor)"
    rows += takeover_rows(section, auto["takeover"])
    rows += pause_rows(section, auto["pause"], ("cgroup.freeze", f["cgroup_freeze"]) if cgroup
                       else ("SIGSTOP", f["sigstop"]))
    rows += tree_rows(section, auto["tree"], ("cgroup.kill", f["cgroup_kill"]) if cgroup else ("killpg", f["killpg"]))
    alayer, apause = d["async"]
    rows += pause_rows(f"deadstop sessions, {alayer} layer (AsyncSupervisor core: no thread hop)", apause,
                       ("cgroup.freeze", f["cgroup_freeze"]) if alayer == "cgroup" else ("SIGSTOP", f["sigstop"]),
                       resume=False)
    if "pgroup" in d:
        player, pres = d["pgroup"]
        section = f"deadstop sessions, {player} layer (fallback)"
        rows += pause_rows(section, pres["pause"], ("SIGSTOP", f["sigstop"]))
        rows += tree_rows(section, pres["tree"], ("killpg", f["killpg"]))
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = arg_parser(__doc__, 30)
    p.add_argument("--no-fallback", action="store_true", help="skip the process-group layer rows")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    trials = trial_count(args)
    assert sum(level_size(c, g) for c, g in LEVELS) == TREE_SIZE, "the session tree must match the tree floor"
    cfg = Config(trials=trials, settle=0.02, pause_settle=0.1, flood_threads=FLOOD_THREADS,
                 fallback=not args.no_fallback)

    def measure(chan: ReadyChannel) -> tuple[list[Row], str]:
        floors = measure_floors(cfg)
        return build_rows(floors, measure_deadstop(cfg, chan), cfg), floors["cgroup_error"]

    return run(cfg, args.json, measure)


if __name__ == "__main__":
    sys.exit(main())
