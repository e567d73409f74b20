"""How fast deadstop revokes, stops and starts runs, against floors measured in the same run.

    python benchmarks/kill_latency.py            # 50 trials per figure, ~2-3 minutes
    python benchmarks/kill_latency.py --quick    # 10 trials, smoke run
    python benchmarks/kill_latency.py --json out.json

Every figure is a p50/p99 over independent trials and is printed beside a
floor (the same job done with bare OS or library primitives, measured now,
on this host), the ratio to it, the target, and PASS/MISS on the p50.
Clocks: time.monotonic_ns() everywhere; CLOCK_MONOTONIC is system-wide, so
timestamps taken in runs, children and the supervisor compare directly.

Peers (multiprocess, pebble, loky, psutil, killpg) are measured on the same
cooperative run and 40-process tree; for each, the processes of the tree
still alive after its stop are counted by pidfd and then killed.

Nothing started here survives the benchmark: every announced process is
held by a pidfd and checked after each stop, helpers are subreapers that
reap what they orphan, and a final check kills and lists anything left.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._procs import ReadyChannel, kill_descendants, kill_registry_survivors, registry_survivors
from benchmarks._stats import Dist, Row, format_table, latency_row, rate_row
from benchmarks._targets import TREE_SIZE

MS = 1_000_000
PIPELINE_BATCH = 500
REVOKE_TARGET_NS = 0.2 * MS


@dataclasses.dataclass
class Config:
    trials: int
    grace: float
    settle: float  # idle time before every timed operation, floors and deadstop alike
    egress_calls: int
    pipeline_batches: int
    peers: bool
    fallback: bool


_T0 = time.monotonic()


def log(msg: str) -> None:
    """Progress on stderr, so stdout carries only the report."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# -- phases ------------------------------------------------------------------------

def measure_floors(cfg: Config, chan: ReadyChannel) -> dict[str, Any]:
    """Every floor. The forking ones come first, while this process has no threads."""
    import deadstop.supervisor  # noqa: F401  warm this process like the spawner is, so fork costs compare

    from benchmarks import _floors

    f: dict[str, Any] = {}
    log("floors: kill+waitpid of a forked child, warm fork")
    f["fork_kill"] = _floors.fork_kill(cfg.trials, cfg.settle)
    f["warm_fork"] = _floors.warm_fork(cfg.trials, cfg.settle)
    log("floors: cgroup.kill and killpg of a 40-process tree (subreaper helper)")
    f.update(_floors.tree_floors(cfg.trials, cfg.settle))
    log("floors: multiprocess spawn start")
    f["spawn"] = _floors.spawn_start(cfg.trials, chan, cfg.settle)
    log("floors: asyncio loop-thread hop, raw pyzmq echo")
    f["hop"] = _floors.loop_hop(cfg.trials, cfg.settle)
    f["zmq_rtt"], f["zmq_piped"] = _floors.zmq_echo(cfg.egress_calls, cfg.pipeline_batches, PIPELINE_BATCH)
    return f


def measure_cli(trials: int) -> tuple[Dist, Dist]:
    """Wall time of `deadstop --help` and of a bare interpreter start (its floor), in subprocesses."""
    import subprocess

    def timed(argv: list[str]) -> Dist:
        samples = []
        for _ in range(trials):
            t0 = time.monotonic_ns()
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            samples.append(time.monotonic_ns() - t0)
        return Dist(samples)

    return (timed([sys.executable, "-m", "deadstop.supervisor", "--help"]),
            timed([sys.executable, "-c", "import argparse"]))


def cli_rows(help_dist: Dist, floor: Dist) -> list[Row]:
    return [latency_row("deadstop CLI", "deadstop --help (a fresh interpreter)", help_dist, floor,
                        "python -c 'import argparse'", "p50 <= 80 ms", 80 * MS,
                        "the CLI loads no engine before it knows its verb")]


def measure_deadstop(cfg: Config, chan: ReadyChannel) -> dict[str, Any]:
    from benchmarks import _deadstop

    egress = {"calls": cfg.egress_calls, "batches": cfg.pipeline_batches, "batch": PIPELINE_BATCH}
    d: dict[str, Any] = {}
    log("deadstop: containment=auto (stop, tree, SIGTERM-ignorer, start, egress)")
    d["auto"] = _deadstop.measure_sync("auto", chan, cfg.trials, cfg.settle, cfg.grace, egress)
    log("deadstop: CLI start (deadstop --help)")
    d["cli"] = measure_cli(max(5, cfg.trials // 5))
    log("deadstop: isolation=off (stop and start of a cooperative run)")
    d["off"] = _deadstop.measure_isolation_off(chan, cfg.trials, cfg.settle)
    log("deadstop: asyncio core, containment=auto")
    d["async"] = _deadstop.measure_async(chan, cfg.trials, cfg.settle)
    if cfg.fallback:
        log("deadstop: containment=process-group")
        d["pgroup"] = _deadstop.measure_sync("process-group", chan, cfg.trials, cfg.settle, cfg.grace, None)
    return d


def measure_peers(cfg: Config) -> dict[str, Any]:
    from benchmarks._floors import run_helper

    log("peers: multiprocess, psutil, killpg, pebble, loky (subreaper helper)")
    return run_helper("benchmarks._peers", cfg.trials, cfg.settle, timeout=900)


# -- rows ------------------------------------------------------------------------------

def deadstop_rows(section: str, res: dict[str, Any], f: dict[str, Any], tree_floor: tuple[str, Dist | None],
                  cfg: Config) -> list[Row]:
    """Rows for one layer; `tree_floor` is the floor its tree stop is held to."""
    coop, tree, ign = res["coop"], res["tree"], res["ignorer"]
    fk = f["fork_kill"]
    rows = [
        latency_row(section, "revoke latency (t0 before stop -> revoked_at)", Dist(coop.revoke), f["hop"],
                    "loop-thread hop", "p50 <= 0.200 ms", REVOKE_TARGET_NS),
        latency_row(section, "stop, cooperative run (-> reaped_at)", Dist(coop.stop), fk, "kill+waitpid",
                    "<= 3x floor", 3 * fk.p(50), coop.note()),
    ]
    tname, tdist = tree_floor
    rows.append(latency_row(section, f"stop, {TREE_SIZE}-process tree", Dist(tree.stop), tdist, tname,
                            "<= 1.5x floor", 1.5 * tdist.p(50) if tdist else None, tree.note()))
    rows.append(latency_row(section, f"stop, SIGTERM-ignorer, minus grace {cfg.grace:g}s", Dist(ign.stop), fk,
                            "kill+waitpid", "<= 3x floor", 3 * fk.p(50), ign.note()))
    rows += start_rows(section, Dist(coop.start), f)
    return rows


def start_rows(section: str, start: Dist, f: dict[str, Any]) -> list[Row]:
    return [
        latency_row(section, "start (t0 before start -> target's 1st line)", start, f["warm_fork"], "warm fork",
                    "<= 2.5x floor", 2.5 * f["warm_fork"].p(50)),
        latency_row(section, "start, vs multiprocess spawn", start, f["spawn"], "mp spawn",
                    ">= 10x faster", f["spawn"].p(50) / 10),
    ]


def isolation_rows(section: str, auto: dict[str, Any], off: Any) -> list[Row]:
    """What isolation (identity, namespaces, mounts, seccomp) costs a start and a stop, same run, same host."""
    start_off, stop_off = Dist(off.start), Dist(off.stop)
    note = f"layers: {auto['isolation']}"[:200]
    return [
        latency_row(section, "start, isolated", Dist(auto["coop"].start), start_off, "isolation=off",
                    "<= 1.5x floor", 1.5 * start_off.p(50), note),
        latency_row(section, "stop, cooperative run, isolated", Dist(auto["coop"].stop), stop_off, "isolation=off",
                    "<= 1.2x floor", 1.2 * stop_off.p(50), auto["coop"].note()),
    ]


def egress_rows(section: str, res: dict[str, Any], f: dict[str, Any]) -> list[Row]:
    rows = []
    for tool, kind in (("noop", "sync"), ("anoop", "async")):
        rows.append(latency_row(section, f"egress round trip, {kind} no-op tool", res[f"rtt_{tool}"],
                                f["zmq_rtt"], "raw zmq echo", "<= 1.5x floor", 1.5 * f["zmq_rtt"].p(50),
                                f"n={res[f'rtt_{tool}'].n} calls"))
    for tool, kind in (("anoop", "async"), ("noop", "sync")):
        d = res[f"piped_{tool}"]
        rows.append(rate_row(section, f"pipelined acall, {kind} no-op ({PIPELINE_BATCH} in flight)", d,
                             PIPELINE_BATCH, f["zmq_piped"], "raw zmq pipelined", ">= 0.5x floor", 0.5,
                             f"n={d.n} batches"))
    return rows


def async_rows(section: str, samples: Any, f: dict[str, Any]) -> list[Row]:
    fk = f["fork_kill"]
    return [
        latency_row(section, "revoke latency (t0 before stop -> revoked_at)", Dist(samples.revoke), None, "",
                    "p50 <= 0.200 ms", REVOKE_TARGET_NS, "no thread hop"),
        latency_row(section, "stop, cooperative run (-> reaped_at)", Dist(samples.stop), fk, "kill+waitpid",
                    "<= 3x floor", 3 * fk.p(50), samples.note()),
        *start_rows(section, Dist(samples.start), f),
    ]


def floor_rows(f: dict[str, Any]) -> list[Row]:
    s = "floors, measured in this run"
    rows = [
        latency_row(s, "kill(SIGTERM)+waitpid, 1 idle forked child", f["fork_kill"]),
        latency_row(s, "fork -> child's 1st line (warm process)", f["warm_fork"]),
        latency_row(s, "multiprocess spawn .start() -> 1st line", f["spawn"]),
        latency_row(s, "asyncio run_coroutine_threadsafe hop", f["hop"]),
    ]
    if f["cgroup_kill"] is not None:
        rows.append(latency_row(s, f"cgroup.kill+populated 0+waitpid, {TREE_SIZE}-tree", f["cgroup_kill"]))
    rows += [
        latency_row(s, f"killpg(SIGKILL)+reap all, {TREE_SIZE}-tree", f["killpg"]),
        latency_row(s, "raw zmq DEALER->ROUTER echo, ipc://", f["zmq_rtt"]),
        rate_row(s, f"raw zmq pipelined echo ({PIPELINE_BATCH} in flight)", f["zmq_piped"], PIPELINE_BATCH, None,
                 "", "", 0),
    ]
    return rows


def peer_rows(peers: dict[str, Any], f: dict[str, Any], tree_floor: tuple[str, Dist | None]) -> list[Row]:
    rows = []
    for kind, section, size, (fname, fdist) in (
            ("coop", "peers: stop of a cooperative run", 1, ("kill+waitpid", f["fork_kill"])),
            ("tree", f"peers: stop of a {TREE_SIZE}-process tree", TREE_SIZE, tree_floor)):
        for name, res in peers["peers"].items():
            r = res[kind]
            worst = max(r["leaked"], default=0)
            trials_leaking = sum(1 for n in r["leaked"] if n)
            leak = (f"LEAKED {worst}/{size} alive in {trials_leaking}/{len(r['leaked'])} trials"
                    if worst else f"0/{size} left")
            rows.append(latency_row(section, name, Dist(r["samples"]), fdist, fname,
                                    note=f"{leak}; {r['how']}"))
        for name, why in peers["skipped"].items():
            rows.append(Row(section, name, "ms", float("nan"), float("nan"), 0, note=why))
    return rows


def build_rows(f: dict[str, Any], d: dict[str, Any], peers: dict[str, Any] | None, cfg: Config) -> list[Row]:
    cg_floor = ("cgroup.kill", f["cgroup_kill"]) if f["cgroup_kill"] is not None else ("killpg", f["killpg"])
    layer, auto = d["auto"]
    rows = floor_rows(f)
    section = f"deadstop, {layer} layer (Supervisor)"
    rows += deadstop_rows(section, auto, f, cg_floor if layer == "cgroup" else ("killpg", f["killpg"]), cfg)
    rows += egress_rows(section, auto, f)
    rows += isolation_rows(f"deadstop, isolation=auto vs isolation=off ({layer} layer)", auto, d["off"])
    rows += cli_rows(*d["cli"])
    alayer, asamples = d["async"]
    rows += async_rows(f"deadstop, {alayer} layer (AsyncSupervisor core)", asamples, f)
    if "pgroup" in d:
        player, pres = d["pgroup"]
        rows += deadstop_rows(f"deadstop, {player} layer (fallback; tree vs killpg floor)", pres, f,
                              ("killpg", f["killpg"]), cfg)
    if peers is not None:
        rows += peer_rows(peers, f, cg_floor)
    return rows


# -- end-of-run check --------------------------------------------------------------------

def leftover_check() -> str:
    """Kill and name anything this benchmark started that is still alive."""
    survivors = registry_survivors()
    killed = kill_registry_survivors() if survivors else []
    descendants = kill_descendants()
    if not killed and not descendants:
        return "leftover processes: none (every announced process and every descendant checked)"
    return f"leftover processes KILLED at exit: announced {killed}, descendants {descendants}"


def library_version() -> str:
    """The commit measured, flagged if the library's sources differ from it."""
    import subprocess

    from benchmarks._floors import ROOT

    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "supervisor", "worker", "ipc"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return rev + (" + uncommitted changes" if dirty else "")


def loadavg() -> str:
    """1-minute load average: other work on this host competes with every figure."""
    try:
        with open("/proc/loadavg") as fh:
            return fh.read().split()[0]
    except OSError:
        return "?"


def summary(rows: list[Row]) -> str:
    misses = [f"  MISS  {r.section} / {r.name}: p50 {r.value_p50 / MS if r.unit == 'ms' else r.value_p50:.3f}"
              f" vs limit {r.limit / MS if r.unit == 'ms' else r.limit:.3f} {r.unit} ({r.target})"
              for r in rows if r.verdict == "MISS"]
    passes = sum(1 for r in rows if r.verdict == "PASS")
    return "\n".join([f"{passes} targets met, {len(misses)} missed", *misses])


def arg_parser(doc: str, default_trials: int) -> argparse.ArgumentParser:
    """The options every benchmark takes; each adds its own after them."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--trials", type=int, default=default_trials, help=f"trials per figure (default {default_trials})")
    p.add_argument("--quick", action="store_true", help="10 trials per figure: a smoke run")
    p.add_argument("--json", metavar="PATH", help="also write every row (with raw samples) as JSON")
    return p


def trial_count(args: argparse.Namespace) -> int:
    trials = 10 if args.quick else args.trials
    if trials < 1:
        raise SystemExit("--trials must be >= 1")
    return trials


def run(cfg: Any, json_path: str | None, measure: Callable[[ReadyChannel], tuple[list[Row], str]]) -> int:
    """What every benchmark does around its measurements: log the host, then `measure(chan)` (rows and the
    cgroup floor error), the leftover check even if that fails, the report on stdout, and --json."""
    log(f"{cfg.trials} trials per figure on {os.cpu_count()} CPUs, Linux {platform.release()}")
    load_before = loadavg()
    version = library_version()
    log(f"deadstop at commit {version}")
    chan = ReadyChannel()
    try:
        rows, cgroup_error = measure(chan)
    finally:
        chan.close()
        leftovers = leftover_check()
    print(format_table(rows))
    print()
    print(summary(rows))
    print(leftovers)
    print(f"deadstop {version}; host: {os.cpu_count()} CPUs, Linux {platform.release()}, "
          f"load average (1 min) {load_before} at start, {loadavg()} at end")
    if json_path:
        with open(json_path, "w") as fh:
            json.dump({"config": dataclasses.asdict(cfg), "host": {"cpus": os.cpu_count(),
                       "kernel": platform.release(), "python": platform.python_version(),
                       "loadavg_start": load_before, "loadavg_end": loadavg()},
                       "deadstop_commit": version,
                       "cgroup_floor_error": cgroup_error, "leftovers": leftovers,
                       "rows": [r.to_dict() for r in rows]}, fh, indent=1)
        log(f"wrote {json_path}")
    log("done")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = arg_parser(__doc__, 50)
    p.add_argument("--grace", type=float, default=0.2, help="grace for the SIGTERM-ignorer (default 0.2 s)")
    p.add_argument("--no-peers", action="store_true", help="skip multiprocess/pebble/loky/psutil/killpg")
    p.add_argument("--no-fallback", action="store_true", help="skip the process-group layer rows")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    trials = trial_count(args)
    cfg = Config(trials=trials, grace=args.grace, settle=0.02, egress_calls=trials * 40,
                 pipeline_batches=trials, peers=not args.no_peers, fallback=not args.no_fallback)

    def measure(chan: ReadyChannel) -> tuple[list[Row], str]:
        floors = measure_floors(cfg, chan)
        ds = measure_deadstop(cfg, chan)
        peers = measure_peers(cfg) if cfg.peers else None
        return build_rows(floors, ds, peers, cfg), floors["cgroup_error"]

    return run(cfg, args.json, measure)


if __name__ == "__main__":
    sys.exit(main())
