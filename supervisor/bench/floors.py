"""Floors: the same operations done with bare OS and library primitives, measured in the same run.

A ratio against a number from another machine or another day says nothing,
so every deadstop figure is printed beside a floor measured here, now, on
this host. Floors are deliberately the cheapest honest way to do the same
job, so a ratio near 1 means deadstop adds nothing measurable.

The functions that fork from this process (`fork_kill`, `warm_fork`) must
run while it is still single-threaded, i.e. before any Supervisor, loop
thread or ZeroMQ context exists.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from . import progress
from . import targets as _targets
from .procs import ReadyChannel
from .stats import Dist



def helper_env(extra_path: str | None = None) -> dict[str, str]:
    """Environment for helper interpreters: ours, with `extra_path` (a source checkout's root) importable first."""
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = extra_path + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def fork_kill(trials: int, settle: float) -> Dist:
    """kill(SIGTERM) + waitpid of one idle forked child: the least a stop of one process costs."""
    samples = []
    for _ in progress.trials(trials + 2, "floor: kill+waitpid"):  # two warm-ups
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                os.write(w, b"1")
                _targets.sleep_forever()
            finally:
                os._exit(0)
        os.close(w)
        os.read(r, 1)
        os.close(r)
        time.sleep(settle)
        t0 = time.monotonic_ns()
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        samples.append(time.monotonic_ns() - t0)
    return Dist(samples[2:])


def warm_fork(trials: int, settle: float) -> Dist:
    """fork() of this (warm, fully imported) process to the child's first instruction."""
    samples = []
    for _ in progress.trials(trials + 2, "floor: warm fork"):
        r, w = os.pipe()
        time.sleep(settle)
        t0 = time.monotonic_ns()
        pid = os.fork()
        if pid == 0:
            t = time.monotonic_ns()
            os.write(w, t.to_bytes(8, "little"))
            os._exit(0)
        os.close(w)
        t = int.from_bytes(os.read(r, 8), "little")
        os.close(r)
        os.waitpid(pid, 0)
        samples.append(t - t0)
    return Dist(samples[2:])


def spawn_start(trials: int, chan: ReadyChannel, settle: float) -> Dist:
    """multiprocess "spawn" Process: .start() to the child's first line, the usual way to get a clean process."""
    import multiprocess

    ctx = multiprocess.get_context("spawn")
    samples = []
    try:
        for _ in progress.trials(trials + 1, "floor: mp spawn"):  # the first start also launches the resource tracker
            p = ctx.Process(target=_targets.first_line, args=(chan.path,))
            time.sleep(settle)
            t0 = time.monotonic_ns()
            p.start()
            (ready,) = chan.wait(1, timeout=30)
            samples.append(ready.t_ns - t0)
            p.join()
    finally:
        from multiprocess import resource_tracker

        resource_tracker._resource_tracker._stop()  # its process would otherwise outlive the benchmark
    return Dist(samples[1:])


def loop_hop(trials: int, settle: float) -> Dist:
    """Caller thread to the first line of a coroutine on an idle asyncio loop thread.

    Every verb of the blocking Supervisor makes this hop before doing
    anything, so it is the floor under revoke latency. The loop is left idle
    for `settle` first, as the supervisor's is before a stop: on a VM the
    wake-up of an idle vCPU is a large part of this hop.
    """
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def stamp() -> int:
        return time.monotonic_ns()

    samples = []
    try:
        for _ in progress.trials(trials + 2, "floor: loop hop"):
            time.sleep(settle)
            t0 = time.monotonic_ns()
            t = asyncio.run_coroutine_threadsafe(stamp(), loop).result()
            samples.append(t - t0)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
    return Dist(samples[2:])


def zmq_echo(n: int, batches: int, batch: int) -> tuple[Dist, Dist]:
    """Raw pyzmq DEALER (child process) -> ROUTER echo (thread here) over ipc://.

    The same topology as deadstop's egress (ROUTER in the host process,
    DEALER in the run) minus everything deadstop does per message. Returns
    (sequential round trips, pipelined batch durations).
    """
    import zmq

    tmp = tempfile.mkdtemp(prefix="ds-bench-zmq-")
    address = f"ipc://{tmp}/echo"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.bind(address)

    def echo() -> None:
        while True:
            frames = sock.recv_multipart()
            sock.send_multipart(frames)
            if frames[-1] == b"quit":
                return

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    code = (f"import json, sys; from {__package__}.targets import zmq_echo_client; "
            f"json.dump(zmq_echo_client({address!r}, {n}, 200, {batches}, {batch}), sys.stdout)")
    try:
        out = subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.PIPE, timeout=120).stdout
    finally:
        thread.join(5)
        sock.close()
        ctx.term()
        shutil.rmtree(tmp, ignore_errors=True)
    data = json.loads(out)
    return Dist(data["rtt"]), Dist(data["pipelined"])


def run_helper(module: str, trials: int, settle: float, timeout: float, extra_path: str | None = None) -> dict[str, Any]:
    """Run a helper process (`python -m <module> TRIALS SETTLE`, see procs.helper_main); what it printed.

    A module of this package needs nothing more; one of a source checkout's benchmarks/ needs
    that checkout as `extra_path`.
    """
    out = subprocess.run([sys.executable, "-m", module, str(trials), str(settle)], env=helper_env(extra_path),
                         cwd=extra_path, check=True, stdout=subprocess.PIPE, timeout=timeout).stdout
    return json.loads(out)


def helper_floors(module: str, cgroup_key: str, key: str, trials: int, settle: float,
                  extra_path: str | None = None) -> dict[str, Any]:
    """A floor helper's two floors as Dists; the cgroup one is None where it could not run (cgroup_error says why)."""
    res = run_helper(module, trials, settle, timeout=600, extra_path=extra_path)
    return {cgroup_key: Dist(res[cgroup_key]) if cgroup_key in res else None, key: Dist(res[key]),
            "cgroup_error": res.get("cgroup_error", "")}


def tree_floors(trials: int, settle: float) -> dict[str, Any]:
    """cgroup.kill and killpg of an equal 40-process tree, in a subreaper helper (see treefloor)."""
    return helper_floors(f"{__package__}.treefloor", "cgroup_kill", "killpg", trials, settle)
