"""cgroup v2: discovery, a per-supervisor subtree, and change notification.

The v2 hierarchy is found from /proc/self/mountinfo (it may sit at
/sys/fs/cgroup, /sys/fs/cgroup/unified beside v1 controllers, or anywhere a
container put it) combined with this process's own cgroup from
/proc/self/cgroup. Nothing is hard-coded.

Layout, below the supervisor's own cgroup:

    deadstop-<supervisor id>-<pid>-<start ticks>-<pidns>/   no processes of its own
        spawner/                     the spawner
        run-<run id>/                one per run, created before its fork

The subtree's name carries its owner (the supervisor's pid, start time and
pid namespace) so that the next supervisor can remove it if its owner died
without cleaning up (supervisor/mechanisms/leftovers.py).

Waiting is done on inotify events of cgroup.events (the kernel signals a
change of `populated` / `frozen` as a file modification), never by polling.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
import struct
from typing import Callable

from ...worker.platform import read_small, write_small
from .mounts import MOUNTINFO, mount_table


def find_cgroup2_mount(mountinfo: str = MOUNTINFO) -> tuple[str, str] | None:
    """(mount point, mount root) of the cgroup2 filesystem, if mounted."""
    for mount in mount_table(mountinfo):
        if mount.fstype == "cgroup2":
            return mount.point, mount.root
    return None


def own_cgroup_path(proc_cgroup: str = "/proc/self/cgroup") -> str | None:
    try:
        with open(proc_cgroup) as f:
            for line in f:
                hier, _, rest = line.rstrip("\n").partition(":")
                controllers, _, path = rest.partition(":")
                if hier == "0" and controllers == "":
                    return path
    except OSError:
        pass
    return None


def own_cgroup_dir() -> tuple[str | None, str]:
    """Directory of this process's v2 cgroup, or (None, why not)."""
    mount = find_cgroup2_mount()
    if mount is None:
        return None, "no cgroup2 filesystem is mounted"
    point, root = mount
    path = own_cgroup_path()
    if path is None:
        return None, "this process has no cgroup v2 membership line in /proc/self/cgroup"
    rel = os.path.relpath(path, root) if root != "/" else path.lstrip("/")
    if rel.startswith(".."):
        return None, f"own cgroup {path} lies outside the visible mount root {root}"
    return os.path.normpath(os.path.join(point, rel)), ""


class Cgroup:
    """One cgroup directory and the few files deadstop touches."""

    __slots__ = ("path", "_no_memory")

    def __init__(self, path: str):
        self.path = path
        self._no_memory = False  # memory.current was missing once: the controller is not delegated here

    @property
    def procs_file(self) -> str:
        return os.path.join(self.path, "cgroup.procs")

    @property
    def events_file(self) -> str:
        return os.path.join(self.path, "cgroup.events")

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in read_small(self.procs_file).split()]
        except FileNotFoundError:
            return []

    def events(self) -> dict[str, int]:
        try:
            data = read_small(self.events_file)
        except FileNotFoundError:
            return {"populated": 0, "frozen": 0}
        return {k.decode(): int(v) for k, v in (line.split() for line in data.splitlines())}

    def cpu_seconds(self) -> float | None:
        """CPU time of every process that ever ran here (cpu.stat usage_usec)."""
        try:
            data = read_small(os.path.join(self.path, "cpu.stat"))
        except OSError:
            return None
        for line in data.splitlines():
            key, _, value = line.partition(b" ")
            if key == b"usage_usec":
                return int(value) / 1e6
        return None

    def memory_current(self) -> int | None:
        if self._no_memory:
            return None  # a controller is not delegated to a live cgroup later: no lookup per sample
        try:
            return int(read_small(os.path.join(self.path, "memory.current")))
        except FileNotFoundError:
            self._no_memory = True
            return None
        except OSError:
            return None

    def populated(self) -> bool:
        return bool(self.events().get("populated", 0))

    def write(self, name: str, value: str) -> None:
        write_small(os.path.join(self.path, name), value.encode())

    def has(self, name: str) -> bool:
        return os.path.exists(os.path.join(self.path, name))

    def kill(self) -> None:
        """SIGKILL every process in the subtree, atomically with respect to forks."""
        self.write("cgroup.kill", "1")

    def freeze(self, frozen: bool) -> None:
        self.write("cgroup.freeze", "1" if frozen else "0")

    def remove(self) -> bool:
        """rmdir, children first; False if something is still inside."""
        ok = True
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            return True
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                ok = Cgroup(entry.path).remove() and ok
        try:
            os.rmdir(self.path)
        except FileNotFoundError:
            pass
        except OSError:
            ok = False
        return ok


class CgroupTree:
    """The supervisor's own subtree; created once, removed at close."""

    def __init__(self, root: Cgroup, has_kill: bool):
        self.root = root
        self.has_kill = has_kill
        #: cgroup.procs of the supervisor's own cgroup (where the spawner retreats to)
        self.home_procs = os.path.join(os.path.dirname(root.path), "cgroup.procs")

    @classmethod
    def create(cls, supervisor_id: str) -> tuple["CgroupTree | None", str]:
        """Make deadstop-<id>-<owner> under our cgroup, or say why it cannot be done."""
        from .leftovers import cgroup_name  # leftovers imports this module

        base, why = own_cgroup_dir()
        if base is None:
            return None, why
        path = os.path.join(base, cgroup_name(supervisor_id))
        try:
            os.mkdir(path)
        except OSError as exc:
            return None, f"cannot create {path}: {exc.strerror}"
        root = Cgroup(path)
        if not root.has("cgroup.freeze"):
            root.remove()
            return None, f"{path} has no cgroup.freeze (kernel older than 5.2)"
        # Hand the memory and pids controllers down to the runs where this
        # cgroup has them, so Limits can be enforced by the kernel.
        available = set(open(os.path.join(path, "cgroup.controllers")).read().split())
        for controller in ("memory", "pids", "cpu"):
            if controller in available:
                try:
                    root.write("cgroup.subtree_control", f"+{controller}")
                except OSError:
                    pass
        return cls(root, root.has("cgroup.kill")), ""

    def child(self, name: str) -> Cgroup:
        path = os.path.join(self.root.path, name)
        os.mkdir(path)
        return Cgroup(path)

    def remove(self) -> bool:
        return self.root.remove()


IN_MODIFY = 0x00000002
IN_Q_OVERFLOW = 0x00004000  # the kernel's event queue overflowed: events were lost (wd is -1)
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT_HEADER = struct.Struct("iIII")


class InotifyWatcher:
    """One inotify descriptor on the event loop, dispatching file changes to callbacks."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._rm = libc.inotify_rm_watch
        self._rm.argtypes = [ctypes.c_int, ctypes.c_int]
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.fd = fd
        self.loop = loop
        self.callbacks: dict[int, Callable[[], None]] = {}
        loop.add_reader(fd, self._drain)

    def watch(self, path: str, callback: Callable[[], None]) -> int:
        wd = self._add(self.fd, os.fsencode(path), IN_MODIFY)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        self.callbacks[wd] = callback
        return wd

    def unwatch(self, wd: int) -> None:
        if self.callbacks.pop(wd, None) is not None:
            self._rm(self.fd, wd)  # EINVAL if the cgroup is already gone: harmless

    def _drain(self) -> None:
        try:
            data = os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno == errno.EINTR:
                return
            raise
        seen: set[int] = set()
        off = 0
        while off + _EVENT_HEADER.size <= len(data):
            wd, mask, _cookie, length = _EVENT_HEADER.unpack_from(data, off)
            off += _EVENT_HEADER.size + length
            if mask & IN_Q_OVERFLOW:  # some change went unreported: every watcher looks again
                seen.update(self.callbacks)
            seen.add(wd)
        for wd in seen:
            cb = self.callbacks.get(wd)
            if cb is not None:
                cb()

    def close(self) -> None:
        self.loop.remove_reader(self.fd)
        os.close(self.fd)
        self.callbacks.clear()
