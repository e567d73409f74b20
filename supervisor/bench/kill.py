"""The kill benchmark: how fast deadstop revokes, stops and starts runs, against floors measured in the same run.

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
import sys
import time
from typing import Any

from . import progress
from .procs import ReadyChannel
from .report import Figure, Measured, log
from .stats import MS, Dist, Row, latency_row, rate_row
from .targets import TREE_SIZE

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


# -- phases ------------------------------------------------------------------------

def measure_floors(cfg: Config, chan: ReadyChannel) -> dict[str, Any]:
    """Every floor. The forking ones come first, while this process has no threads."""
    from ... import supervisor  # noqa: F401  warm this process like the spawner is, so fork costs compare
    from . import floors as _floors

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
        for _ in progress.trials(trials, f"CLI: {' '.join(argv[1:])[:30]}"):
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
    from . import runs as _deadstop

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
    from .floors import run_helper

    log("peers: multiprocess, psutil, killpg, pebble, loky (subreaper helper)")
    return run_helper(f"{__package__}.peers", cfg.trials, cfg.settle, timeout=900)


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


def figures(f: dict[str, Any], d: dict[str, Any], peers: dict[str, Any] | None) -> list[Figure]:
    """The CDFs for --plot: each stop and start figure with its floors, and the peers beside deadstop."""
    layer, auto = d["auto"]
    alayer, asamples = d["async"]
    coop: list[tuple[str, list[int]]] = [(f"deadstop, {layer} (Supervisor)", auto["coop"].stop),
                                         (f"deadstop, {alayer} (AsyncSupervisor)", asamples.stop),
                                         ("deadstop, isolation=off", d["off"].stop)]
    tree: list[tuple[str, list[int]]] = [(f"deadstop, {layer}", auto["tree"].stop)]
    if "pgroup" in d:
        coop.append((f"deadstop, {d['pgroup'][0]}", d["pgroup"][1]["coop"].stop))
        tree.append((f"deadstop, {d['pgroup'][0]}", d["pgroup"][1]["tree"].stop))
    for name, res in (peers or {}).get("peers", {}).items():
        coop.append((name, res["coop"]["samples"]))
        tree.append((name, res["tree"]["samples"]))
    coop.append(("floor: kill+waitpid", f["fork_kill"].samples))
    if f["cgroup_kill"] is not None:
        tree.append(("floor: cgroup.kill", f["cgroup_kill"].samples))
    tree.append(("floor: killpg", f["killpg"].samples))
    start = [(f"deadstop, {layer}", auto["coop"].start), ("deadstop, isolation=off", d["off"].start),
             (f"deadstop, {alayer} (AsyncSupervisor)", asamples.start),
             ("floor: warm fork", f["warm_fork"].samples), ("floor: multiprocess spawn", f["spawn"].samples)]
    revoke = [("Supervisor", auto["coop"].revoke), ("AsyncSupervisor", asamples.revoke),
              ("floor: loop-thread hop", f["hop"].samples)]
    return [("stop of a cooperative run", coop), (f"stop of a {TREE_SIZE}-process tree", tree),
            ("start -> target's first line", start), ("revoke latency (stop() -> revoked_at)", revoke)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The kill benchmark's own options (beside those of report.arg_parser)."""
    p.add_argument("--grace", type=float, default=None,
                   help="grace between SIGTERM and SIGKILL (default 0.2 s for the SIGTERM-ignorer, 0.5 s for your agent)")
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure multiprocess/pebble/loky/psutil/killpg on the same workloads "
                        "(default: on for a full kill benchmark, off with --quick or for your agent)")
    p.add_argument("--no-fallback", action="store_true", help="skip the process-group layer rows")


def main(args: argparse.Namespace, trials: int) -> int:
    """The kill benchmark from parsed options (see command.py)."""
    from .report import run

    peers = args.peers if args.peers is not None else not args.quick
    cfg = Config(trials=trials, grace=0.2 if args.grace is None else args.grace, settle=0.02, egress_calls=trials * 40,
                 pipeline_batches=trials, peers=peers, fallback=not args.no_fallback)

    def measure(chan: ReadyChannel) -> Measured:
        floors = measure_floors(cfg, chan)
        ds = measure_deadstop(cfg, chan)
        peer_res = measure_peers(cfg) if cfg.peers else None
        return Measured(build_rows(floors, ds, peer_res, cfg), floors["cgroup_error"],
                        figures=figures(floors, ds, peer_res))

    return run(cfg, args.json, measure, args.plot)
