"""Process handles that cannot hit a recycled PID, and waiting on them.

A PID read from /proc or cgroup.procs is only a name; by the time a signal is
sent it may belong to someone else (pid_max can be 32768). So every signal
here goes through a pidfd opened first and then checked against a fresh
membership test: a pidfd pins the process it was opened for, so if the PID is
still a member after the pidfd exists, the pidfd names our process.

Where pidfds are missing (macOS, old kernels) psutil's identity check
(PID plus creation time) is the fallback.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Callable, Iterable

import psutil

from ...worker.platform import read_small


def boot_id() -> str:
    """Monotonic timestamps are only comparable within one boot; this names it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


HAVE_PIDFD = hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")


def open_pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None  # already gone (or not ours to see)


def pidfd_signal(pidfd: int, sig: int) -> bool:
    """Send `sig`; False if the process has already exited."""
    try:
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except ProcessLookupError:
        return False


def signal_members(pids: Iterable[int], sig: int, members: Callable[[], set[int]]) -> int:
    """Signal each pid that is still a member after a pidfd to it is held.

    `members()` re-reads the membership (cgroup.procs, a process group, a
    marker scan). Returns how many processes were signalled.
    """
    pids = list(pids)
    if not pids:
        return 0
    if not HAVE_PIDFD:
        return _signal_members_psutil(pids, sig, members)
    fds: dict[int, int] = {}
    try:
        for pid in pids:
            fd = open_pidfd(pid)
            if fd is not None:
                fds[pid] = fd
        current = members()
        sent = 0
        for pid, fd in fds.items():
            if pid in current and pidfd_signal(fd, sig):
                sent += 1
        return sent
    finally:
        for fd in fds.values():
            os.close(fd)


def _psutil_handles(pids: Iterable[int]) -> list[psutil.Process]:
    """psutil handles (PID plus start time: reuse-safe) for the pids still alive."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.Error:
            pass
    return procs


def _signal_members_psutil(pids: list[int], sig: int, members: Callable[[], set[int]]) -> int:
    procs = _psutil_handles(pids)
    current = members()
    sent = 0
    for proc in procs:
        if proc.pid in current:
            try:
                proc.send_signal(sig)  # psutil refuses a recycled pid
                sent += 1
            except psutil.Error:
                pass
    return sent


async def wait_pidfd(pidfd: int, timeout: float | None = None) -> bool:
    """Wait until the process behind `pidfd` exits; False on timeout."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(True)

    loop.add_reader(pidfd, ready)
    try:
        await asyncio.wait_for(fut, timeout)
        return True
    except asyncio.TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)


async def wait_pids_gone(pids: Iterable[int], timeout: float) -> bool:
    """Wait until every pid has exited (zombies count as exited)."""
    if not HAVE_PIDFD:
        procs = _psutil_handles(pids)
        loop = asyncio.get_running_loop()
        _, alive = await loop.run_in_executor(None, lambda: psutil.wait_procs(procs, timeout=timeout))
        return not alive
    fds = [fd for fd in (open_pidfd(p) for p in pids) if fd is not None]
    try:
        if not fds:
            return True
        results = await asyncio.gather(*(wait_pidfd(fd, timeout) for fd in fds))
        return all(results)
    finally:
        for fd in fds:
            os.close(fd)


def read_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, pgid) of a process, from /proc/<pid>/stat; None if gone."""
    try:
        data = read_small(f"/proc/{pid}/stat")
    except OSError:
        try:
            p = psutil.Process(pid)
            return ("Z" if p.status() == psutil.STATUS_ZOMBIE else "R", os.getpgid(pid))
        except (psutil.Error, OSError):
            return None
    rest = data[data.rindex(b")") + 2:].split()
    return rest[0].decode(), int(rest[2])


def has_marker(pid: int, marker: bytes) -> bool:
    """True if the process's initial environment carries `marker` (NAME=value)."""
    try:
        return marker in read_small(f"/proc/{pid}/environ").split(b"\0")
    except FileNotFoundError:
        try:
            env = psutil.Process(pid).environ()
        except psutil.Error:
            return False
        name, _, value = marker.decode().partition("=")
        return env.get(name) == value
    except OSError:
        return False


def descendants(root: int) -> list[int]:
    """All live descendants of `root`, walking only its own subtree."""
    from ...worker.platform import direct_children

    out: list[int] = []
    stack = direct_children(root)
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(direct_children(pid))
    return out
