"""Process plumbing for the benchmark: the ready FIFO, pidfds, cgroup v2 helpers, cleanup, helper mains.

PIDs are only names; a benchmark that kills "leftovers" by PID must make sure
the PID still names the process it saw. Everything here that checks or
kills a process holds a pidfd opened while the process was known alive, or
compares the kernel start time recorded at that moment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import json
import os
import select
import signal
import sys
import tempfile
import time
from typing import Any, Callable

from .targets import TREE_SIZE, _fork_child


@dataclasses.dataclass(frozen=True)
class Ready:
    tag: str
    pid: int
    t_ns: int


class ReadyChannel:
    """A named FIFO that measured processes announce themselves on (see _targets.announce).

    The benchmark keeps its own write end open so the read end never sees
    end-of-file between writers, and reads with poll() so waits are bounded.
    """

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="ds-bench-")
        self.path = os.path.join(self.dir, "ready")
        os.mkfifo(self.path, 0o600)
        # Isolated runs have uids of their own: they may traverse the
        # directory and write the FIFO, and do nothing else with it.
        os.chmod(self.dir, 0o711)
        os.chmod(self.path, 0o622)
        self._r = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self._w = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        self._buf = b""
        self._poll = select.poll()
        self._poll.register(self._r, select.POLLIN)

    def wait(self, count: int, timeout: float = 10.0) -> list[Ready]:
        """Block until `count` lines arrived; TimeoutError names how many did."""
        got: list[Ready] = []
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf and len(got) < count:
                line, self._buf = self._buf.split(b"\n", 1)
                tag, pid, t = line.split()
                got.append(Ready(tag.decode(), int(pid), int(t)))
            if len(got) >= count:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"only {len(got)} of {count} processes announced themselves in {timeout}s")
            if self._poll.poll(max(1, int(left * 1000))):
                try:
                    self._buf += os.read(self._r, 65536)
                except BlockingIOError:
                    pass

    def drain(self) -> None:
        """Drop anything left over (e.g. a process that announced after a timeout)."""
        try:
            while os.read(self._r, 65536):
                pass
        except BlockingIOError:
            pass
        self._buf = b""

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)
        os.unlink(self.path)
        os.rmdir(self.dir)


# -- identity-safe process handles --------------------------------------------

def start_time(pid: int) -> int | None:
    """Kernel start time of `pid` (field 22 of /proc/<pid>/stat), None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


class Tracked:
    """Pidfds on a set of live processes, opened before they are signalled.

    `alive()` and `kill()` act on exactly the processes that announced
    themselves, never on a recycled PID. Every tracked (pid, start time) is
    also added to `registry` for the end-of-run leak check.
    """

    registry: set[tuple[int, int]] = set()

    def __init__(self, pids: list[int]):
        self.fds: dict[int, int] = {}
        for pid in pids:
            st = start_time(pid)
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            self.fds[pid] = fd
            if st is not None:
                Tracked.registry.add((pid, st))

    def _exited(self, pids: list[int], timeout: float) -> set[int]:
        """pids among `pids` whose pidfd is readable (exited) within `timeout` seconds."""
        poller = select.poll()
        by_fd = {self.fds[p]: p for p in pids}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        return {by_fd[fd] for fd, _ in poller.poll(max(0, int(timeout * 1000)))}

    def alive(self) -> list[int]:
        pids = list(self.fds)
        gone = self._exited(pids, 0) if pids else set()
        return [p for p in pids if p not in gone]

    def wait_gone(self, timeout: float) -> list[int]:
        """Wait up to `timeout` for every tracked process to exit; returns those still alive."""
        deadline = time.monotonic() + timeout
        left = self.alive()
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._exited(left, remaining)
            left = self.alive()
        return left

    def wait_one(self, pid: int, timeout: float) -> bool:
        """Block until `pid` exits; False on timeout."""
        return pid in self._exited([pid], timeout)

    def kill(self, pids: list[int] | None = None) -> None:
        for pid in self.alive() if pids is None else pids:
            try:
                signal.pidfd_send_signal(self.fds[pid], signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __enter__(self) -> "Tracked":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cleanup_leaked(tracked: Tracked, timeout: float = 0.1) -> int:
    """After a stop: count tracked processes still alive after `timeout`, kill them, wait them out."""
    leaked = tracked.wait_gone(timeout)
    if leaked:
        tracked.kill(leaked)
        still = tracked.wait_gone(5.0)
        if still:
            raise RuntimeError(f"processes survived SIGKILL: {still}")
    return len(leaked)


def registry_survivors() -> list[int]:
    """Tracked processes (same pid and start time) still alive now."""
    return sorted(pid for pid, st in Tracked.registry if start_time(pid) == st)


def kill_registry_survivors() -> list[int]:
    """SIGKILL every registry survivor through a pidfd re-checked against its start time."""
    killed = []
    for pid, st in sorted(Tracked.registry):
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            if start_time(pid) == st:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                killed.append(pid)
        finally:
            os.close(fd)
    return killed


def spawn_leader(path: str, body: Callable[[str], object], cgroup_procs: str | None = None,
                 own_group: bool = False) -> int:
    """Fork a tree leader running `body(path)` that first joins a cgroup (its cgroup.procs) or its own process group."""

    def leader() -> None:
        if cgroup_procs:
            with open(cgroup_procs, "w") as f:
                f.write("0")
        if own_group:
            os.setpgid(0, 0)
        body(path)

    return _fork_child(leader)


def reap_known(pids: list[int]) -> None:
    """Reap those of `pids` that are now our (subreaper) children; others are not ours to wait for."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


# -- Linux controls the stdlib does not wrap ------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphans of our descendants come back to us instead of to PID 1.

    PID 1 is not guaranteed to reap (in some sandboxes it never does), so a
    helper that kills trees takes their orphans itself and reaps them.
    """
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# -- cgroup v2 ----------------------------------------------------------------------

def own_cgroup_dir() -> str:
    """This process's cgroup v2 directory, from /proc/self/mountinfo and /proc/self/cgroup."""
    mount = root = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[:1] == ["cgroup2"]:
                fields = left.split()
                root, mount = fields[3], fields[4]
                break
    if mount is None:
        raise RuntimeError("no cgroup2 filesystem is mounted")
    with open("/proc/self/cgroup") as f:
        path = next(line.rstrip("\n").split(":", 2)[2] for line in f if line.startswith("0::"))
    rel = os.path.relpath(path, root)
    if rel.startswith(".."):
        raise RuntimeError(f"own cgroup {path} lies outside the visible cgroup2 mount root {root}")
    return os.path.normpath(os.path.join(mount, rel))


def cgroup_event(cg: str, key: bytes) -> bytes | None:
    """The value of `key` in cg's cgroup.events (`populated` is always there, `frozen` wherever cgroup.freeze is)."""
    with open(os.path.join(cg, "cgroup.events"), "rb") as f:
        for line in f:
            name, value = line.split()
            if name == key:
                return value
    return None


class Inotify:
    """Minimal inotify: one watch for IN_MODIFY, waited on with poll()."""

    IN_MODIFY = 0x2

    def __init__(self, path: str):
        self.fd = _libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if _libc.inotify_add_watch(self.fd, os.fsencode(path), self.IN_MODIFY) < 0:
            raise OSError(ctypes.get_errno(), "inotify_add_watch", path)
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)

    def wait(self, timeout_ms: int) -> None:
        if self._poll.poll(timeout_ms):
            try:
                os.read(self.fd, 4096)
            except BlockingIOError:
                pass

    def close(self) -> None:
        os.close(self.fd)


def wait_cgroup_event(cg: str, ino: Inotify, key: bytes, value: bytes, timeout: float = 5.0) -> None:
    """Wait for cgroup.events to say `key value`, woken by `ino` (a watch on that file), never by sleeping."""
    deadline = time.monotonic() + timeout
    while cgroup_event(cg, key) != value:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{cg}: {key.decode()} != {value.decode()} after {timeout}s")
        ino.wait(max(1, int(left * 1000)))


def kill_cgroup(cg: str, ino: Inotify) -> None:
    """cgroup.kill, then wait (by `ino`, a watch on cgroup.events) until it says `populated 0`."""
    with open(os.path.join(cg, "cgroup.kill"), "w") as f:
        f.write("1")
    wait_cgroup_event(cg, ino, b"populated", b"0")


def tree_ready(chan: ReadyChannel, timeout: float = 10.0) -> list[Ready]:
    """Wait for a whole tree to announce itself; the leader's line is returned first."""
    got = chan.wait(TREE_SIZE, timeout)
    return sorted(got, key=lambda r: r.tag != "L")


def kill_and_wait(procs: list[Any]) -> None:
    """SIGKILL each of `procs` (psutil.Process objects) still there, then wait up to 5 s for all of them."""
    import psutil

    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5)


def kill_descendants() -> list[int]:
    """Last resort: SIGKILL and reap every remaining descendant of this process.

    psutil checks each PID against its creation time before signalling, so
    a recycled PID is never hit. Returns the PIDs that had to be killed.
    """
    import psutil

    try:
        rest = psutil.Process().children(recursive=True)
    except psutil.Error:
        rest = []
    kill_and_wait(rest)
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    return [p.pid for p in rest]


def helper_main(body: Callable[[ReadyChannel, int, float], dict[str, Any]]) -> None:
    """Main of a helper process run as ``python -m <helper module> TRIALS SETTLE``: prints JSON.

    The helper is a subreaper, so the orphaned members of every tree it
    kills come back to it to reap (PID 1 need not reap them at all), and
    whatever is still below it when `body` is done is killed and reaped too;
    their PIDs are reported as `killed_at_exit`, beside what `body` returned.
    """
    trials, settle = int(sys.argv[1]), float(sys.argv[2])
    become_subreaper()
    chan = ReadyChannel()
    try:
        result = body(chan, trials, settle)
    finally:
        chan.close()
        left = kill_descendants()
    json.dump({**result, "killed_at_exit": left}, sys.stdout)


def floor_helper_main(name: str, control: str, missing: str,
                      cgroup_floor: tuple[str, Callable[[ReadyChannel, str, int, float], list[int]]],
                      fallback_floor: tuple[str, Callable[[ReadyChannel, int, float], list[int]]]) -> None:
    """Main of a floor helper (_treefloor, _freezefloor), run through helper_main.

    `cgroup_floor` and `fallback_floor` are (key, floor function) pairs;
    each floor's samples are reported under its key. The cgroup floor runs
    in a fresh child cgroup `name`-<pid> of our own; it is left out, and
    `cgroup_error` says why, where none can be made or it lacks the file
    `control` (then `missing` is the reason). The fallback floor always runs.
    """

    def floors(chan: ReadyChannel, trials: int, settle: float) -> dict[str, Any]:
        result: dict[str, Any] = {}
        try:
            cg = os.path.join(own_cgroup_dir(), f"{name}-{os.getpid()}")
            os.mkdir(cg)
        except (OSError, RuntimeError) as exc:
            result["cgroup_error"] = str(exc)
        else:
            try:
                if not os.path.exists(os.path.join(cg, control)):
                    result["cgroup_error"] = missing
                else:
                    result[cgroup_floor[0]] = cgroup_floor[1](chan, cg, trials, settle)
            finally:
                os.rmdir(cg)
        result[fallback_floor[0]] = fallback_floor[1](chan, trials, settle)
        return result

    helper_main(floors)
