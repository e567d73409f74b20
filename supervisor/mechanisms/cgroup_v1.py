"""cgroup v1 `memory` and `pids` controllers, for hybrid hosts.

Many hosts mount cgroup v2 without the memory and pids controllers (they are
bound to v1 hierarchies beside it: /sys/fs/cgroup/memory, .../pids). There
the kernel can still enforce a run's memory and process limits, through v1.
This module finds those hierarchies from /proc/self/mountinfo and this
process's own v1 cgroups from /proc/self/cgroup (nothing is hard-coded), and
keeps a per-supervisor subtree in each:

    <own v1 cgroup>/deadstop-<supervisor id>-<pid>-<start ticks>-<pid ns>/
        run-<run id>/            one per run that has a limit enforced here

The owner is in the name (supervisor/mechanisms/leftovers.py `cgroup_name`, the same as
for the v2 subtree), so the next supervisor tells a dead owner's leftovers
(it was SIGKILLed and could not clean up) from a live one's without a
journal, kills what is left in them and removes them (`leftover_roots`).

What the kernel does with the limits:

* memory.limit_in_bytes (and memory.memsw.limit_in_bytes where swap is
  accounted, so swap is no way around it) is a hard limit on what the
  group is charged: anonymous memory, page cache and shmem, memfd
  included. Charges past it are reclaimed, and when nothing can be
  reclaimed the OOM killer kills a process inside the group. The
  supervisor hears of it through an eventfd registered on
  memory.oom_control (cgroup.event_control) and reads the count of kills
  from memory.oom_control's `oom_kill`.
* pids.max makes fork()/clone() fail with EAGAIN once the group holds that
  many tasks (threads count, as they do for the kernel). The run is not
  stopped by the kernel; pids.events counts the refusals (`max`), and v1
  gives no notification for it, so the supervisor's sampler reads it.

A run joins its groups itself, in the spawner's freshly forked child, before
any user code and before it drops privileges (worker/bootstrap.py writes "0"
into each cgroup.procs listed in the start message's `join_cgroups`). The
files are root-owned and 0644, so a run with its own unprivileged identity
cannot move out again.

v1 has no cgroup.kill, and the freezer is a hierarchy of its own, so
killing what is left in a group signals the listed pids through pidfds,
checked against a fresh read of the membership (supervisor/mechanisms/procs.py), until
the group is empty or the bound is reached.
"""

from __future__ import annotations

import errno
import os
import signal
import time

from . import procs
from .mounts import mount_table

MOUNTINFO = "/proc/self/mountinfo"  # a module constant, read at each call (tests point it elsewhere)
PROC_CGROUP = "/proc/self/cgroup"
CONTROLLERS = ("memory", "pids")

#: Files a usable hierarchy must offer, per controller.
_REQUIRED = {
    "memory": ("memory.limit_in_bytes", "memory.max_usage_in_bytes", "memory.oom_control", "cgroup.event_control"),
    "pids": ("pids.max", "pids.current", "pids.events"),
}
KILL_BOUND = 5.0


def find_v1_mounts(mountinfo: str | None = None) -> dict[str, tuple[str, str]]:
    """controller -> (mount point, mount root) of each v1 hierarchy carrying it."""
    found: dict[str, tuple[str, str]] = {}
    for mount in mount_table(mountinfo or MOUNTINFO):
        if mount.fstype != "cgroup":
            continue
        for opt in mount.superopts.split(","):
            if opt in CONTROLLERS and opt not in found:
                found[opt] = (mount.point, mount.root)
    return found


def own_v1_paths(proc_cgroup: str | None = None) -> dict[str, str]:
    """controller -> this process's cgroup path in that v1 hierarchy."""
    out: dict[str, str] = {}
    try:
        with open(proc_cgroup or PROC_CGROUP) as f:
            for line in f:
                hier, _, rest = line.rstrip("\n").partition(":")
                controllers, _, path = rest.partition(":")
                if hier == "0":
                    continue
                for c in controllers.split(","):
                    if c in CONTROLLERS:
                        out[c] = path
    except OSError:
        pass
    return out


def own_dirs() -> tuple[dict[str, str], dict[str, str]]:
    """(controller -> directory of our own v1 cgroup, controller -> why not)."""
    mounts = find_v1_mounts()
    paths = own_v1_paths()
    dirs: dict[str, str] = {}
    why: dict[str, str] = {}
    for c in CONTROLLERS:
        if c not in mounts:
            why[c] = f"no cgroup v1 hierarchy with the {c} controller is mounted"
            continue
        if c not in paths:
            why[c] = f"this process has no {c} line in /proc/self/cgroup"
            continue
        point, root = mounts[c]
        path = paths[c]
        rel = os.path.relpath(path, root) if root != "/" else path.lstrip("/")
        if rel.startswith(".."):
            why[c] = f"own {c} cgroup {path} lies outside the visible mount root {root}"
            continue
        d = os.path.normpath(os.path.join(point, rel))
        if not os.path.isdir(d):
            why[c] = f"own {c} cgroup directory {d} does not exist"
            continue
        dirs[c] = d
    return dirs, why


def leftover_roots() -> list[str]:
    """Our own v1 cgroups, whose children may be dead supervisors' subtrees
    (swept by supervisor/mechanisms/leftovers.py at open, by the owner in the name)."""
    dirs, _why = own_dirs()
    return sorted(set(dirs.values()))


# -- one group --------------------------------------------------------------------------
def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def read_int(path: str) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None


def read_keyed(path: str) -> dict[str, int]:
    """A flat keyed file (pids.events, memory.oom_control) as a dict."""
    out: dict[str, int] = {}
    for line in (_read(path) or "").splitlines():
        key, _, value = line.partition(" ")
        try:
            out[key] = int(value)
        except ValueError:
            pass
    return out


def group_pids(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs"), "rb") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _live(pids: list[int]) -> list[int]:
    """Drop zombies (a zombie leader stays listed until its parent reaps it)."""
    out = []
    for pid in pids:
        st = procs.read_stat(pid)
        if st is not None and st[0] not in ("Z", "X"):
            out.append(pid)
    return out


def kill_group(path: str, bound: float = KILL_BOUND) -> int:
    """SIGKILL every process in a v1 group through pidfds until none is left.

    v1 has no cgroup.kill: processes that fork while being killed are caught
    by the next pass (a SIGKILLed task cannot return from fork to user
    space, so this converges). `bound` 0: one pass, no waiting. Returns how
    many processes were signalled.
    """
    deadline = time.monotonic() + bound
    sent = 0
    delay = 0.0005
    while True:
        left = _live(group_pids(path))
        if not left:
            return sent
        sent += procs.signal_members(left, signal.SIGKILL, lambda: set(group_pids(path)))
        if bound <= 0 or time.monotonic() >= deadline:
            return sent
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def remove_group(path: str, kill_bound: float = KILL_BOUND) -> bool:
    """Kill what is left, then rmdir (children first). False if it could not be removed.

    `kill_bound` 0 never waits (for the event loop): one SIGKILL pass, one
    rmdir; what is still busy is removed later (at close).
    """
    try:
        entries = [e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return True
    except OSError:
        return False
    ok = all([remove_group(p, kill_bound) for p in entries])
    if _live(group_pids(path)):
        kill_group(path, kill_bound)
    attempts = 20 if kill_bound > 0 else 1
    for attempt in range(attempts):
        try:
            os.rmdir(path)
            return ok
        except FileNotFoundError:
            return ok
        except OSError as exc:
            # EBUSY while a member just killed is still exiting: a short wait, bounded.
            if exc.errno != errno.EBUSY or attempt == attempts - 1:
                return False
            time.sleep(0.005)
    return False


class V1RunGroups:
    """A run's groups in the memory and/or pids hierarchies."""

    def __init__(self, dirs: dict[str, str]):
        self.dirs = dirs  # controller -> directory
        self._oom_efd: int | None = None

    @property
    def memory(self) -> str | None:
        return self.dirs.get("memory")

    @property
    def pids_dir(self) -> str | None:
        return self.dirs.get("pids")

    def procs_files(self) -> list[str]:
        """cgroup.procs files the run writes "0" into at bootstrap (join_cgroups)."""
        return [os.path.join(d, "cgroup.procs") for d in self.dirs.values()]

    def _write(self, controller: str, name: str, value: str) -> None:
        with open(os.path.join(self.dirs[controller], name), "w") as f:
            f.write(value)

    def limit_memory(self, limit: int) -> None:
        self._write("memory", "memory.limit_in_bytes", str(int(limit)))
        # Where swap is accounted, memory+swap gets the same limit: swapping
        # out is no way past it. The file is absent without swap accounting.
        if os.path.exists(os.path.join(self.dirs["memory"], "memory.memsw.limit_in_bytes")):
            self._write("memory", "memory.memsw.limit_in_bytes", str(int(limit)))

    def limit_pids(self, limit: int) -> None:
        self._write("pids", "pids.max", str(int(limit)))

    def watch_oom(self) -> int:
        """An eventfd the kernel signals when the memory group goes out of memory
        (and when the group is removed). The caller reads it, then checks
        oom_kills(): only the count says an OOM happened."""
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        cfd = os.open(os.path.join(self.dirs["memory"], "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._write("memory", "cgroup.event_control", f"{efd} {cfd}")
        except OSError:
            os.close(efd)
            raise
        finally:
            os.close(cfd)
        self._oom_efd = efd
        return efd

    def close_oom_watch(self) -> None:
        if self._oom_efd is not None:
            os.close(self._oom_efd)
            self._oom_efd = None

    # -- what the kernel counted --------------------------------------------------
    def oom_kills(self) -> int:
        """Processes the OOM killer killed in the group (plus 1 while it is under OOM)."""
        if self.memory is None:
            return 0
        ctl = read_keyed(os.path.join(self.memory, "memory.oom_control"))
        return ctl.get("oom_kill", 0) + ctl.get("under_oom", 0)

    def memory_peak(self) -> int | None:
        if self.memory is None:
            return None
        return read_int(os.path.join(self.memory, "memory.max_usage_in_bytes"))

    def memory_current(self) -> int | None:
        if self.memory is None:
            return None
        return read_int(os.path.join(self.memory, "memory.usage_in_bytes"))

    def memory_failcnt(self) -> int | None:
        if self.memory is None:
            return None
        return read_int(os.path.join(self.memory, "memory.failcnt"))

    def fork_refusals(self) -> int:
        """Forks the pids limit refused (pids.events `max`)."""
        if self.pids_dir is None:
            return 0
        return read_keyed(os.path.join(self.pids_dir, "pids.events")).get("max", 0)

    def pids_peak(self) -> int | None:
        if self.pids_dir is None:
            return None
        peak = read_int(os.path.join(self.pids_dir, "pids.peak"))  # 6.1+
        return peak if peak is not None else read_int(os.path.join(self.pids_dir, "pids.current"))

    def members(self) -> set[int]:
        out: set[int] = set()
        for d in self.dirs.values():
            out.update(group_pids(d))
        return out

    def live_members(self) -> list[int]:
        return sorted(_live(sorted(self.members())))

    def kill(self, bound: float = KILL_BOUND) -> int:
        return sum(kill_group(d, bound) for d in self.dirs.values())

    def remove(self, kill_bound: float = KILL_BOUND) -> bool:
        """Kill whatever is left, close the OOM watch, rmdir every group (see remove_group)."""
        self.close_oom_watch()
        return all([remove_group(d, kill_bound) for d in self.dirs.values()])


class V1Tree:
    """The supervisor's subtree in each v1 hierarchy it can use; removed at close."""

    def __init__(self, roots: dict[str, str], why: dict[str, str]):
        self.roots = roots  # controller -> deadstop-... directory
        self.why = why  # controller -> why it is not usable

    @classmethod
    def create(cls, supervisor_id: str, controllers: tuple[str, ...] = CONTROLLERS) -> "V1Tree":
        """Make our subtree in each hierarchy that has the controller; say why not where not.

        Subtrees of dead supervisors beside ours were removed before
        (supervisor/mechanisms/leftovers.py, through leftover_roots()).
        """
        from .leftovers import cgroup_name  # leftovers imports this module lazily

        dirs, why = own_dirs()
        roots: dict[str, str] = {}
        name = cgroup_name(supervisor_id)
        for c in controllers:
            base = dirs.get(c)
            if base is None:
                continue
            path = os.path.join(base, name)
            try:
                os.mkdir(path)
            except OSError as exc:
                why[c] = f"cannot create {path}: {exc.strerror}"
                continue
            missing = [f for f in _REQUIRED[c] if not os.path.exists(os.path.join(path, f))]
            if missing:
                why[c] = f"{path} lacks {', '.join(missing)}"
                remove_group(path)
                continue
            if c == "memory" and read_int(os.path.join(path, "memory.use_hierarchy")) == 0:
                try:  # limits of run groups must count towards ours (always on since 5.x)
                    with open(os.path.join(path, "memory.use_hierarchy"), "w") as f:
                        f.write("1")
                except OSError as exc:
                    why[c] = f"{path}: memory.use_hierarchy is 0 and cannot be set: {exc.strerror}"
                    remove_group(path)
                    continue
            roots[c] = path
        return cls(roots, why)

    def run_groups(self, run_id: str, controllers: list[str]) -> V1RunGroups:
        """Create run-<id> in each of `controllers` (all must be in self.roots)."""
        made: dict[str, str] = {}
        try:
            for c in controllers:
                path = os.path.join(self.roots[c], f"run-{run_id}")
                os.mkdir(path)
                made[c] = path
        except BaseException:
            V1RunGroups(made).remove()
            raise
        return V1RunGroups(made)

    def remove(self) -> bool:
        return all([remove_group(p) for p in self.roots.values()])
