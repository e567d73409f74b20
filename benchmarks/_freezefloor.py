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

import json
import os
import signal
import sys
import time

from benchmarks._procs import (Inotify, ReadyChannel, Tracked, become_subreaper, kill_descendants, own_cgroup_dir,
                               wait_unpopulated)
from benchmarks._session_targets import BUSY_PROCS, busy_tree
from benchmarks._treefloor import _reap_all, _spawn_tree

POLL = 0.0001


def _frozen(cg: str) -> bool:
    with open(os.path.join(cg, "cgroup.events"), "rb") as f:
        for line in f:
            key, value = line.split()
            if key == b"frozen":
                return value == b"1"
    return False


def _wait_frozen(cg: str, ino: Inotify, frozen: bool, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while _frozen(cg) != frozen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{cg}: frozen != {int(frozen)} after {timeout}s")
        ino.wait(max(1, int(left * 1000)))


def _busy_leader(path: str) -> None:
    """The tree leader: a session (and so a process group and an autogroup) of its own, as a run's."""
    os.setsid()
    busy_tree(path, BUSY_PROCS)


def cgroup_freeze_floor(chan: ReadyChannel, cg: str, trials: int, settle: float) -> list[int]:
    leader = _spawn_tree(chan.path, os.path.join(cg, "cgroup.procs"), own_group=False, body=_busy_leader)
    pids = [r.pid for r in chan.wait(BUSY_PROCS)]
    ino = Inotify(os.path.join(cg, "cgroup.events"))
    fd = os.open(os.path.join(cg, "cgroup.freeze"), os.O_WRONLY)
    samples = []
    with Tracked(pids) as tracked:
        try:
            for _ in range(trials + 2):
                time.sleep(settle)
                t0 = time.monotonic_ns()
                os.write(fd, b"1")
                _wait_frozen(cg, ino, True)
                samples.append(time.monotonic_ns() - t0)
                os.write(fd, b"0")
                _wait_frozen(cg, ino, False)
        finally:
            os.close(fd)
            with open(os.path.join(cg, "cgroup.kill"), "w") as f:
                f.write("1")
            wait_unpopulated(cg, ino)
            ino.close()
            os.waitpid(leader, 0)
            _reap_all()
            if tracked.wait_gone(5.0):
                raise RuntimeError("cgroup.freeze floor: tree members survived cgroup.kill")
    return samples[2:]


def _state(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return b"X"
    return data[data.rindex(b")") + 2:data.rindex(b")") + 3]


def sigstop_floor(chan: ReadyChannel, trials: int, settle: float) -> list[int]:
    # setsid() makes the leader a process group leader too (setpgid() first would make it fail).
    leader = _spawn_tree(chan.path, None, own_group=False, body=_busy_leader)
    pids = [r.pid for r in chan.wait(BUSY_PROCS)]
    samples = []
    with Tracked(pids) as tracked:
        try:
            for _ in range(trials + 2):
                time.sleep(settle)
                t0 = time.monotonic_ns()
                os.killpg(leader, signal.SIGSTOP)
                left = pids
                while True:
                    left = [p for p in left if _state(p) not in (b"T", b"t")]
                    if not left:
                        break
                    time.sleep(POLL)
                samples.append(time.monotonic_ns() - t0)
                os.killpg(leader, signal.SIGCONT)
                while any(_state(p) in (b"T", b"t") for p in pids):
                    time.sleep(POLL)
        finally:
            os.killpg(leader, signal.SIGKILL)
            _reap_all()
            if tracked.wait_gone(5.0):
                raise RuntimeError("SIGSTOP floor: tree members survived killpg(SIGKILL)")
    return samples[2:]


def main() -> None:
    trials, settle = int(sys.argv[1]), float(sys.argv[2])
    become_subreaper()
    chan = ReadyChannel()
    result: dict[str, object] = {}
    try:
        try:
            cg = os.path.join(own_cgroup_dir(), f"ds-bench-freeze-{os.getpid()}")
            os.mkdir(cg)
        except (OSError, RuntimeError) as exc:
            result["cgroup_error"] = str(exc)
        else:
            try:
                if not os.path.exists(os.path.join(cg, "cgroup.freeze")):
                    result["cgroup_error"] = "no cgroup.freeze (kernel older than 5.2)"
                else:
                    result["cgroup_freeze"] = cgroup_freeze_floor(chan, cg, trials, settle)
            finally:
                os.rmdir(cg)
        result["sigstop"] = sigstop_floor(chan, trials, settle)
    finally:
        chan.close()
        kill_descendants()
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
