"""The last line of G5: kills every run when the supervisor dies, whatever state the spawner is in.

The spawner normally does this itself (its control socket closes, it kills
everything below it). But a spawner that is stopped (SIGSTOP), wedged or
killed cannot, and then the runs would outlive their supervisor. So the
spawner forks this watchdog once, at configuration: a process that does
nothing but wait for the supervisor's end of the control socket to close
(POLLRDHUP on its own descriptor of the same socket, which reads nothing
and so takes no message from the spawner) and then kills:

1. every process holding one of the supervisor's run uids (a run cannot
   change its uid), through pidfds re-checked before the signal;
2. every process still below the spawner (stopped or not);
3. the whole cgroup subtree with one `cgroup.kill` (the watchdog first
   moved itself out of it, into the supervisor's own cgroup);
4. the spawner itself, through the pidfd it opened at start.

It ignores SIGINT like the spawner, holds no credential and no run state,
and runs cannot signal it (it is root's and not dumpable, they are not).
A spawner that shuts down normally kills it on the way out.
"""

from __future__ import annotations

import os
import select
import signal
from typing import Any

from . import platform

POLLRDHUP = getattr(select, "POLLRDHUP", 0x2000)


def start(ctrl_fd: int, config: dict[str, Any], spawner_pid: int) -> int:
    """Fork the watchdog; returns its pid (in the spawner)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            _watch(ctrl_fd, config, spawner_pid)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    return pid


def _watch(ctrl_fd: int, config: dict[str, Any], spawner_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    keep = os.dup(ctrl_fd)
    spawner = os.pidfd_open(spawner_pid)
    for fd in range(3, 1024):  # nothing of the spawner's but this one socket
        if fd not in (keep, spawner):
            try:
                os.close(fd)
            except OSError:
                pass
    home = config.get("home_procs")
    if home:  # out of the subtree it will kill
        try:
            with open(home, "w") as f:
                f.write("0")
        except OSError:
            pass
    poller = select.poll()
    poller.register(keep, POLLRDHUP)
    while True:
        for _fd, events in poller.poll():
            if events & (POLLRDHUP | select.POLLHUP | select.POLLERR):
                _kill_all(config, spawner_pid)
                try:
                    signal.pidfd_send_signal(spawner, signal.SIGKILL)  # a stopped one cannot clean up
                except OSError:
                    pass
                return


def _kill_all(config: dict[str, Any], spawner_pid: int) -> None:
    first, count = config.get("uid_block") or (0, 0)
    if count:
        platform.kill_uids(range(first, first + count))
    _kill_below(spawner_pid)
    root = config.get("cgroup_root")
    if root:
        try:
            with open(os.path.join(root, "cgroup.kill"), "w") as f:
                f.write("1")
        except OSError:
            pass


def _kill_below(root: int) -> None:
    stack = platform.direct_children(root)
    me = os.getpid()
    while stack:
        pid = stack.pop()
        if pid == me:
            continue
        stack.extend(platform.direct_children(pid))
        platform.kill_checked(pid, lambda p: True)
