"""Linux process controls that the standard library does not wrap.

Each helper degrades to a no-op returning False where the platform lacks the
feature, so callers can name the weaker containment they ended up with
instead of failing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        _libc.prctl.restype = ctypes.c_int
    except OSError:  # pragma: no cover - exotic libc
        _libc = None


def _prctl(option: int, arg: int) -> bool:
    if _libc is None:
        return False
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return True


def set_parent_death_signal(signum: int) -> bool:
    """Ask the kernel to send `signum` to this process when its parent thread exits."""
    return _prctl(PR_SET_PDEATHSIG, signum)


def set_child_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process instead of init."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def has_pidfd() -> bool:
    return hasattr(os, "pidfd_open")


def direct_children(pid: int) -> list[int]:
    """Children of `pid`, read from /proc without scanning every process.

    Falls back to psutil where /proc/<pid>/task/*/children is missing
    (kernels without CONFIG_PROC_CHILDREN, macOS).
    """
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tasks = None
    if tasks is not None:
        found: list[int] = []
        try:
            for tid in tasks:
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                    found.extend(int(x) for x in f.read().split())
            return found
        except FileNotFoundError:
            pass
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def rewrite_exec_env(name: str, value: str) -> bool:
    """Overwrite, in place, the value of `name` in this process's exec-time environment.

    /proc/<pid>/environ shows the environment block the process was exec'd
    with, not os.environ; a forked child therefore still shows its parent's.
    The spawner is exec'd with a fixed-width placeholder for the run marker,
    and each forked run writes its own id into that same memory, so that it
    and every process it forks are recognisable from outside. Returns False if
    the slot is missing or has another width.
    """
    if _libc is None:
        return False
    prefix = f"{name}=".encode()
    new = value.encode()
    environ = ctypes.POINTER(ctypes.c_void_p).in_dll(_libc, "environ")
    i = 0
    while environ[i]:
        addr = environ[i]
        if ctypes.string_at(addr, len(prefix)) == prefix:
            current = ctypes.string_at(addr)
            if len(current) - len(prefix) != len(new):
                return False
            ctypes.memmove(addr + len(prefix), new, len(new))
            return True
        i += 1
    return False
