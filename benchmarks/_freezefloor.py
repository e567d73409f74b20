"""Helper process: the pause floors on an equal tree of 20 busy processes.

Run as ``python -m benchmarks._freezefloor TRIALS SETTLE``; prints JSON.

* cgroup_freeze: the tree in a cgroup of its own; write 1 to cgroup.freeze
  (descriptor opened beforehand), then wait, woken by inotify on
  cgroup.events, until it says `frozen 1`. Thawed (and waited for) between
  trials, so every trial freezes a running tree.
* sigstop: the tree (one process group); killpg(SIGSTOP), then read
  /proc/<pid>/stat of the members not yet stopped, every POLL seconds, until
  all are in state T. (A poll without the sleep is several times slower on
  a small host: the poller takes a CPU the 20 busy members need in order to
  reach their signal-delivery point; a 4 ms tick per round was measured on
  2 CPUs. 100 us was the best of the intervals tried.)

The tree is equal to a run's: its leader first calls setsid(), as every
deadstop run leader does (worker/bootstrap.py), which with autogrouping on
also gives it a scheduler autogroup of its own.

Trials should be `settle` >= ~0.1 s apart: a freeze 20 ms after a thaw was
seen to be notified 8-12 ms late although cgroup.events already read
`frozen 1` 0.3 ms after the write (most likely the kernel's rate limit on
cgroup file notifications, cgroup_file_notify(), deferring it to a timer);
50 ms and more apart, the notification came at once.

One tree per floor serves every trial, as one paused session serves every
pause trial on the deadstop side. Like _treefloor, this is a separate
subreaper process so that everything it forks is reaped here.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable

from benchmarks._procs import (Inotify, ReadyChannel, Tracked, floor_helper_main, kill_cgroup, spawn_leader,
                               wait_cgroup_event)
from benchmarks._session_targets import BUSY_PROCS, busy_tree
from benchmarks._treefloor import _reap_all  # importing _treefloor also gives the tree a run's imports, see there

POLL = 0.0001


def _busy_leader(path: str) -> None:
    """The tree leader: a session (and so a process group and an autogroup) of its own, as a run's."""
    os.setsid()
    busy_tree(path, BUSY_PROCS)


def _pause_trials(pids: list[int], trials: int, settle: float, pause: Callable[[], None], resume: Callable[[], None],
                  kill: Callable[[], None], survived: str) -> list[int]:
    """Time pause() of the running tree `pids`, resume() it, `trials` times after two warm-ups.

    Then kill() the tree, reap it, and check by pidfd that every member is
    gone (RuntimeError `survived` if not).
    """
    samples = []
    with Tracked(pids) as tracked:
        try:
            for _ in range(trials + 2):
                time.sleep(settle)
                t0 = time.monotonic_ns()
                pause()
                samples.append(time.monotonic_ns() - t0)
                resume()
        finally:
            kill()
            _reap_all()
            if tracked.wait_gone(5.0):
                raise RuntimeError(survived)
    return samples[2:]


def cgroup_freeze_floor(chan: ReadyChannel, cg: str, trials: int, settle: float) -> list[int]:
    leader = spawn_leader(chan.path, _busy_leader, os.path.join(cg, "cgroup.procs"))
    pids = [r.pid for r in chan.wait(BUSY_PROCS)]
    ino = Inotify(os.path.join(cg, "cgroup.events"))
    fd = os.open(os.path.join(cg, "cgroup.freeze"), os.O_WRONLY)

    def freeze() -> None:
        os.write(fd, b"1")
        wait_cgroup_event(cg, ino, b"frozen", b"1")

    def thaw() -> None:
        os.write(fd, b"0")
        wait_cgroup_event(cg, ino, b"frozen", b"0")

    def kill() -> None:
        os.close(fd)
        kill_cgroup(cg, ino)
        ino.close()
        os.waitpid(leader, 0)

    return _pause_trials(pids, trials, settle, freeze, thaw, kill,
                         "cgroup.freeze floor: tree members survived cgroup.kill")


def _state(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return b"X"
    return data[data.rindex(b")") + 2:data.rindex(b")") + 3]


def sigstop_floor(chan: ReadyChannel, trials: int, settle: float) -> list[int]:
    # setsid() makes the leader a process group leader too (setpgid() first would make it fail).
    leader = spawn_leader(chan.path, _busy_leader)
    pids = [r.pid for r in chan.wait(BUSY_PROCS)]

    def stop() -> None:
        os.killpg(leader, signal.SIGSTOP)
        left = pids
        while True:
            left = [p for p in left if _state(p) not in (b"T", b"t")]
            if not left:
                break
            time.sleep(POLL)

    def cont() -> None:
        os.killpg(leader, signal.SIGCONT)
        while any(_state(p) in (b"T", b"t") for p in pids):
            time.sleep(POLL)

    return _pause_trials(pids, trials, settle, stop, cont, lambda: os.killpg(leader, signal.SIGKILL),
                         "SIGSTOP floor: tree members survived killpg(SIGKILL)")


if __name__ == "__main__":
    floor_helper_main("ds-bench-freeze", "cgroup.freeze", "no cgroup.freeze (kernel older than 5.2)",
                      ("cgroup_freeze", cgroup_freeze_floor), ("sigstop", sigstop_floor))
