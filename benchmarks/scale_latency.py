"""Many runs on one host: concurrent start rate, memory per idle run, and stop_all beside one cgroup.kill.

    python benchmarks/scale_latency.py              # 100, 500 and 1,000 idle runs, about a minute
    python benchmarks/scale_latency.py --quick      # 100 and 200
    python benchmarks/scale_latency.py --sizes 50,2000 --json out.json

For each size N (one measurement each; the figures are totals, not trials):

start     N runs started concurrently through the asyncio core (isolation as
          configured, default on); from the first start() call to the last
          run's first tool call. Target (issue 13): >= 300 runs/s at 1,000.
          Floor: N forks, one after another, of a fresh interpreter holding the
          spawner's imports, each child writing as many of its pages as a run
          owns (its USS) and then saying so on a pipe; what the host charges
          for forking and copying that much, with nothing of deadstop's.
USS       median unique memory of 50 sampled run leaders (psutil); the
          supervisor process's RSS beside it. Targets: <= 3 MB and <= 150 MB.
idle      the supervisor process's CPU over IDLE_SECONDS with the N runs idle and
          one lifecycle subscriber following (what a console watching costs:
          run.sample events under their budget). Target: <= 5 % of a core.
stop_all  one stop_all() of the N idle runs: t0 before the call -> every
          report in hand; survivors counted by the reports and by a /proc
          walk of the run markers. Floor: one cgroup.kill of N sleeping
          processes forked by this process, until `populated 0`, in the
          same run. Target (issue 13): <= 0.3 s at 1,000.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import signal
import statistics
import sys
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._procs import Inotify, ReadyChannel, kill_cgroup, own_cgroup_dir
from benchmarks._stats import Row
from benchmarks.kill_latency import MS, arg_parser, log, run

USS_SAMPLE = 50
IDLE_SECONDS = 5.0


@dataclasses.dataclass
class Config:
    trials: int  # (the harness's field; here one measurement per size)
    sizes: list[int]


def cgroup_kill_floor(n: int) -> float | None:
    """ns for one cgroup.kill of n sleeping processes until the cgroup says it is empty (None: no cgroup v2)."""
    try:
        cg = os.path.join(own_cgroup_dir(), f"scale-floor-{os.getpid()}")
        os.mkdir(cg)
    except (OSError, RuntimeError) as exc:
        log(f"floor: no cgroup for the floor ({exc})")
        return None
    pids: list[int] = []
    r, w = os.pipe()
    try:
        procs = os.path.join(cg, "cgroup.procs")
        for _ in range(n):
            pid = os.fork()
            if pid == 0:
                try:
                    with open(procs, "w") as f:
                        f.write("0")
                    os.write(w, b"x")
                    signal.pause()
                finally:
                    os._exit(0)
            pids.append(pid)
        got = 0
        while got < n:
            got += len(os.read(r, n - got))
        ino = Inotify(os.path.join(cg, "cgroup.events"))
        try:
            t0 = time.monotonic_ns()
            kill_cgroup(cg, ino)
            took = time.monotonic_ns() - t0
        finally:
            ino.close()
        return took
    finally:
        for pid in pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        os.close(r)
        os.close(w)
        os.rmdir(cg)


#: The fork floor's parent: the spawner's warm imports, a heap to copy from, N children that
#: each write `pages` pages of it, report on a pipe and wait for the parent to go.
_FORK_FLOOR = r"""
import json, os, sys, time
import cloudpickle, msgspec, psutil, zmq
n, pages = int(sys.argv[1]), int(sys.argv[2])
heap = bytearray(b"\1" * (pages * 4096))
ready_r, ready_w = os.pipe()
release_r, release_w = os.pipe()
t0 = time.monotonic_ns()
for _ in range(n):
    if os.fork() == 0:
        os.close(release_w)
        for i in range(0, len(heap), 4096):
            heap[i] = 2
        os.write(ready_w, b"x")
        os.read(release_r, 1)  # EOF once the parent is gone
        os._exit(0)
got = 0
while got < n:
    got += len(os.read(ready_r, n))
took = time.monotonic_ns() - t0
os.close(release_w)
for _ in range(n):
    os.wait()
print(json.dumps({"ns": took}))
"""


def fork_floor(n: int, pages: int) -> float | None:
    """ns for n forks of a warm interpreter whose children each copy `pages` pages (None if it failed)."""
    import json
    import subprocess

    proc = subprocess.run([sys.executable, "-c", _FORK_FLOOR, str(n), str(pages)], capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        log(f"fork floor failed: {proc.stderr[-500:]}")
        return None
    return float(json.loads(proc.stdout)["ns"])


async def idle_share(sup: Any) -> float:
    """Share of one core the supervisor process used while its runs idled, a lifecycle subscriber following."""
    import psutil

    async def follow() -> None:
        async for _event in sup.subscribe(lifecycle=True):
            pass

    follower = asyncio.ensure_future(follow())
    try:
        await asyncio.sleep(1.0)  # the subscription and its sampler are up
        me = psutil.Process()
        before, t0 = me.cpu_times(), time.monotonic()
        await asyncio.sleep(IDLE_SECONDS)
        after, took = me.cpu_times(), time.monotonic() - t0
    finally:
        follower.cancel()
    return max(0.0, after.user + after.system - before.user - before.system) / took  # clock ticks: never below 0


async def one_size(n: int) -> dict[str, Any]:
    import psutil

    from benchmarks import _targets as targets
    from deadstop.supervisor import AsyncSupervisor

    async with AsyncSupervisor() as sup:
        up = asyncio.Semaphore(0)

        async def ready() -> None:
            up.release()

        sup.register_tool("ready", ready)
        t0 = time.monotonic_ns()
        runs = await asyncio.gather(*(sup.start(targets.idle_ready, tools=["ready"]) for _ in range(n)))
        for _ in range(n):
            await asyncio.wait_for(up.acquire(), 300)
        started = time.monotonic_ns() - t0
        sampled = runs[:: max(1, n // USS_SAMPLE)][:USS_SAMPLE]
        uss = []
        for r in sampled:
            try:
                uss.append(psutil.Process(r.pid).memory_full_info().uss)
            except psutil.Error:
                pass
        rss = psutil.Process().memory_info().rss
        idle = await idle_share(sup)
        t0 = time.monotonic_ns()
        reports = await sup.stop_all(grace=1.0)
        stopped = time.monotonic_ns() - t0
        survivors = sum(r.survivors for r in reports)
    return {"n": n, "start_ns": started, "uss": statistics.median(uss) if uss else float("nan"), "rss": rss,
            "stop_all_ns": stopped, "survivors": survivors, "idle": idle}


def measure(cfg: Config, chan: ReadyChannel) -> list[Row]:
    rows: list[Row] = []
    for n in cfg.sizes:
        log(f"{n} runs: start concurrently, sample memory, stop_all; then the cgroup.kill floor of {n} processes")
        got = asyncio.run(one_size(n))
        floor = cgroup_kill_floor(n)
        pages = 700 if math.isnan(got["uss"]) else int(got["uss"] // 4096)  # 700: about a run's, if none was sampled
        start_floor = fork_floor(n, pages)
        start_floor_rate = n / (start_floor / 1e9) if start_floor else None
        section = f"{n} idle runs"
        rate = n / (got["start_ns"] / 1e9)
        big = n >= 1000
        rows += [
            Row(section, "start, concurrently (first start() -> last run's first call)", "calls/s", rate, rate, 1,
                "forks of a warm interpreter, each copying a run's USS", start_floor_rate,
                target=">= 300 runs/s" if big else "", limit=300 if big else None, higher_is_better=True,
                note=f"{got['start_ns'] / 1e9:.2f} s in all"),
            Row(section, "USS per idle run (median of a sample)", "MiB", got["uss"], got["uss"], 1, target="<= 3 MB",
                limit=3e6),
            Row(section, "supervisor RSS", "MiB", got["rss"], got["rss"], 1, target="<= 150 MB", limit=150e6),
            Row(section, "supervisor CPU, runs idle, a lifecycle subscriber following", "%", got["idle"] * 100,
                got["idle"] * 100, 1, target="<= 5 % of a core", limit=5.0),
            Row(section, "stop_all() -> every report", "ms", got["stop_all_ns"], got["stop_all_ns"], 1,
                "cgroup.kill of as many processes", floor, "<= 0.3 s" if big else "", 300 * MS if big else None,
                note=f"survivors {got['survivors']}"),
        ]
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = arg_parser(__doc__, 1)
    p.add_argument("--sizes", default="100,500,1000", help="comma-separated run counts (default 100,500,1000)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [100, 200] if args.quick else [int(x) for x in args.sizes.split(",") if x]
    if not sizes or min(sizes) < 1:
        raise SystemExit("--sizes takes positive counts")
    cfg = Config(trials=1, sizes=sizes)

    def measure_all(chan: ReadyChannel) -> tuple[list[Row], str]:
        return measure(cfg, chan), ""

    return run(cfg, args.json, measure_all)


if __name__ == "__main__":
    sys.exit(main())
