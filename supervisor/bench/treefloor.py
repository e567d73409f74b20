"""Helper process: the tree-stop floors (cgroup.kill, killpg) on an equal 40-process tree.

Run as ``python -m deadstop.supervisor.bench.treefloor TRIALS SETTLE``; prints JSON.

It is a separate process so it can be a child subreaper: the killpg floor
must reap every member of the tree, and only a subreaper gets the orphaned
grandchildren back to reap (PID 1 need not reap them at all). The benchmark
process itself stays an ordinary process.

The helper imports what a deadstop run has imported (pyzmq, cloudpickle,
psutil, msgspec) so the tree members' address spaces, whose teardown is
part of every kill, are comparable to a run's.
"""

from __future__ import annotations

import os
import signal
import time

import cloudpickle  # noqa: F401  (address-space parity with a run, see above)
import msgspec  # noqa: F401
import psutil  # noqa: F401
import zmq  # noqa: F401

from . import progress
from . import targets as _targets
from .procs import Inotify, ReadyChannel, Tracked, floor_helper_main, kill_cgroup, spawn_leader, tree_ready
from .targets import TREE_SIZE


def _reap_all() -> int:
    """Reap every child (tree members come back to us as the subreaper); returns how many."""
    n = 0
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return n
        n += 1


def _check_gone(tracked: Tracked, reaped: int, what: str) -> None:
    left = tracked.wait_gone(5.0)
    if left or reaped != TREE_SIZE:
        raise RuntimeError(f"{what}: {len(left)} members alive, {reaped}/{TREE_SIZE} reaped")


def cgroup_kill_floor(chan: ReadyChannel, cg: str, trials: int, settle: float) -> list[int]:
    """cgroup.kill, wait (inotify) until cgroup.events says populated 0, waitpid(leader).

    The same work deadstop's stop does for a tree in the cgroup layer: signal
    the cgroup, wait for it to empty, reap the leader. The remaining members,
    already dead, are reaped after the clock stops.
    """
    samples = []
    for _ in progress.trials(trials + 2, "floor: cgroup.kill of a tree"):
        leader = spawn_leader(chan.path, _targets.tree, os.path.join(cg, "cgroup.procs"))
        pids = [r.pid for r in tree_ready(chan)]
        time.sleep(settle)
        ino = Inotify(os.path.join(cg, "cgroup.events"))
        with Tracked(pids) as tracked:
            t0 = time.monotonic_ns()
            kill_cgroup(cg, ino)
            os.waitpid(leader, 0)
            samples.append(time.monotonic_ns() - t0)
            ino.close()
            _check_gone(tracked, 1 + _reap_all(), "cgroup.kill floor")
    return samples[2:]


def killpg_floor(chan: ReadyChannel, trials: int, settle: float) -> list[int]:
    """killpg(SIGKILL) of the tree as one process group, then reap all 40 members."""
    samples = []
    for _ in progress.trials(trials + 2, "floor: killpg of a tree"):
        leader = spawn_leader(chan.path, _targets.tree, own_group=True)
        pids = [r.pid for r in tree_ready(chan)]
        time.sleep(settle)
        with Tracked(pids) as tracked:
            t0 = time.monotonic_ns()
            os.killpg(leader, signal.SIGKILL)
            reaped = _reap_all()
            samples.append(time.monotonic_ns() - t0)
            _check_gone(tracked, reaped, "killpg floor")
    return samples[2:]


if __name__ == "__main__":
    floor_helper_main("ds-bench-floor", "cgroup.kill", "no cgroup.kill (kernel older than 5.14)",
                      ("cgroup_kill", cgroup_kill_floor), ("killpg", killpg_floor))
