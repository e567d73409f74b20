"""Leftovers: what a dead supervisor left behind, found and removed by the next one.

A supervisor killed with SIGKILL runs no cleanup: its runtime directory (the
egress socket) stays, and so does its cgroup subtree, empty if the spawner
killed the runs, still populated if the spawner died too. The next
supervisor that opens on the machine removes them, whatever its state
directory (the journal-based recovery in recovery.py only sees runs of
supervisors that shared its journal; this sweep needs no journal).

Ownership. Everything a supervisor leaves carries its owner:

    (pid, start time in clock ticks since boot, boot id, pid namespace)

The owner is *alive* when a process with that pid exists in our pid
namespace, is not a zombie, and has that start time (field 22 of
/proc/<pid>/stat, exact integer ticks: never a float compared with a
tolerance); the boot id tells a record from before a reboot (the pid and
ticks then mean nothing). A record from another pid namespace, in the same
boot, cannot be judged from here and is left alone. So a second live
supervisor on the machine is never touched, and a recycled pid is not
mistaken for the owner.

Runtime directories. They live at a predictable place so the next supervisor
can find them:

    <base>/ds-<supervisor id>/owner.json    mode 0700 (privacy only)

<base> is $XDG_RUNTIME_DIR/deadstop, else the first of /run/deadstop (for
root), /tmp/deadstop-<uid> and /dev/shm/deadstop-<uid> whose filesystem is
kept in memory (tmpfs), else the first of them: every run's endpoint is a
directory and a socket made at its start and removed at its stop, and on a
disk filesystem that is inode allocation (on ext4 without a journal, a scan
past every inode freed in the last half minute: about 1 ms of the
supervisor's CPU per start with a thousand runs, measured). A candidate is
skipped if the socket paths under it would get long (AF_UNIX allows ~107
bytes), or if it is a symlink, not ours or writable by others. The base is
mode 0711 so that per-run endpoint directories below a supervisor's
directory can later be reached by runs with their own uid; nothing relies
on the base being unlistable. The directory is made under a staging name
(.ds-new-XXXX), the owner record is written into it (tmp file + rename),
and only then is it renamed to ds-<id>: a ds-* directory always carries its
record, so a sweeper never sees one half made.
A staging directory left by a supervisor killed between the two steps
carries a record too, unless it was killed before writing it: such a staging
directory is removed once it is older than STAGING_STALE seconds.

Cgroups. cgroupfs does not take arbitrary files, and a record kept in the
runtime directory would tie the cgroup's fate to a second directory that may
already be gone (a tmpfiles cleaner, another XDG_RUNTIME_DIR, a supervisor
killed between the two). So the owner is encoded in the subtree's own name,
which the kernel keeps as long as the cgroup exists:

    deadstop-<supervisor id>-<pid>-<start ticks>-<pid namespace inode>

(no boot id: cgroupfs does not survive a reboot). A dead owner's subtree is
emptied (cgroup.kill on its root, or, without cgroup.kill, freeze + SIGKILL
through pidfds + thaw), waited for on cgroup.events with a bound, then
removed children first. The sweep looks at the children of this process's
own v2 cgroup, where CgroupTree.create puts subtrees; `sweep_cgroup_roots`
takes any list of roots, which is the hook for the v1 memory/pids
hierarchies (see `v1_roots`).

What was removed is logged at info and returned as a list of records
(core puts it in `sup.leftovers_removed`).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import tempfile
import time
from typing import Any, Iterable

from . import procs
from .cgroups import Cgroup, InotifyWatcher, own_cgroup_dir
from .mounts import filesystem_of, mount_table
from .procs import boot_id

log = logging.getLogger("deadstop.leftovers")

OWNER_FILE = "owner.json"
RUNTIME_PREFIX = "ds-"
STAGING_PREFIX = ".ds-new-"
#: A staging directory without an owner record older than this is debris.
STAGING_STALE = 60.0
#: Longest runtime directory path accepted: leaves room below it for a per-run
#: endpoint directory and a socket name within AF_UNIX's limit.
MAX_RUNTIME_DIR = 64
#: Bound on waiting for a dead owner's populated cgroup to empty.
KILL_WAIT = 5.0

_RUNTIME_NAME = re.compile(r"ds-[0-9A-Za-z_]{1,32}(-[0-9a-f]{1,16})?")
_STAGING_NAME = re.compile(re.escape(STAGING_PREFIX) + r"[0-9A-Za-z_]{1,32}")
_CGROUP_NAME = re.compile(r"deadstop-(?P<sid>[0-9A-Za-z_]{1,32})-(?P<pid>[0-9]{1,10})-(?P<ticks>[0-9]{1,20})"
                          r"-(?P<pidns>[0-9]{1,20})")

ALIVE, DEAD, UNKNOWN = "alive", "dead", "unknown"


# -- identity ------------------------------------------------------------------------
def pid_namespace() -> int:
    """Inode of this process's pid namespace (0 where /proc does not say)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _stat_fields(pid: int) -> list[bytes] | None:
    """Fields 3.. of /proc/<pid>/stat (after the parenthesised comm), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].split()


def start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (field 22 of /proc/<pid>/stat)."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields is not None and len(fields) > 19 else None


def owner_of_self() -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "start_ticks": start_ticks(pid) or 0, "boot_id": boot_id(), "pidns": pid_namespace()}


def owner_status(pid: int, ticks: int, boot: str | None, pidns: int) -> tuple[str, str]:
    """(ALIVE | DEAD | UNKNOWN, why) for an owner record. `boot` None: not recorded (cgroups)."""
    if boot is not None and boot and boot != boot_id():
        return DEAD, "recorded before a reboot"
    if pidns != pid_namespace():
        return UNKNOWN, f"owner lives in another pid namespace ({pidns})"
    fields = _stat_fields(pid)
    if fields is None or len(fields) <= 19:
        return DEAD, f"pid {pid} is gone"
    if int(fields[19]) != ticks:
        return DEAD, f"pid {pid} now belongs to another process"
    if fields[0] in (b"Z", b"X"):
        try:  # a zombie group leader whose other threads still run is alive
            if len(os.listdir(f"/proc/{pid}/task")) > 1:
                return ALIVE, ""
        except OSError:
            pass
        return DEAD, f"pid {pid} is a zombie"
    return ALIVE, ""


# -- cgroup names ----------------------------------------------------------------------
def cgroup_name(supervisor_id: str) -> str:
    """Name of this process's subtree for `supervisor_id`, owner encoded (v2 and v1 alike)."""
    me = owner_of_self()
    return f"deadstop-{supervisor_id}-{me['pid']}-{me['start_ticks']}-{me['pidns']}"


def parse_cgroup_name(name: str) -> dict[str, Any] | None:
    m = _CGROUP_NAME.fullmatch(name)
    if m is None:
        return None
    return {"supervisor_id": m["sid"], "pid": int(m["pid"]), "start_ticks": int(m["ticks"]),
            "pidns": int(m["pidns"])}


def is_subtree_of(name: str, supervisor_id: str) -> bool:
    """True if `name` is supervisor `supervisor_id`'s subtree (either naming)."""
    parsed = parse_cgroup_name(name)
    return name == f"deadstop-{supervisor_id}" or (parsed is not None and parsed["supervisor_id"] == supervisor_id)


# -- runtime directories -------------------------------------------------------------------
def runtime_bases() -> list[str]:
    """Candidate bases, preferred first (see the module docstring)."""
    out = []
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        out.append(os.path.join(xdg, "deadstop"))  # the user's own choice, whatever it sits on
    system = ["/run/deadstop"] if os.geteuid() == 0 else []
    system.append(os.path.join(tempfile.gettempdir(), f"deadstop-{os.geteuid()}"))
    if os.path.isdir("/dev/shm"):
        system.append(f"/dev/shm/deadstop-{os.geteuid()}")
    table = mount_table()
    system.sort(key=lambda base: filesystem_of(os.path.dirname(base), table) not in MEMORY_FILESYSTEMS)
    return out + system


#: Filesystems whose inodes live in memory: making and removing one costs no allocator search.
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


def _base_problem(st: os.stat_result) -> str:
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}"
    if st.st_mode & 0o022:
        return f"writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    return ""


def _ensure_base(base: str) -> str:
    """Create `base` (mode 0711) if missing; '' if usable, else why not."""
    try:
        os.mkdir(base, 0o711)
        os.chmod(base, 0o711)  # not narrowed by the umask
    except FileExistsError:
        pass
    except OSError as exc:
        return f"cannot create {base}: {exc.strerror}"
    try:
        return _base_problem(os.lstat(base))
    except OSError as exc:
        return exc.strerror or str(exc)


def _write_owner(dir_path: str, record: dict[str, Any]) -> None:
    tmp = os.path.join(dir_path, OWNER_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    os.replace(tmp, os.path.join(dir_path, OWNER_FILE))


def make_runtime_dir(supervisor_id: str) -> str:
    """Create <base>/ds-<id> (mode 0700) with its owner record; see the module docstring.

    Falls back to an unswept temporary directory (ipc.framing's) where no
    candidate base is usable, and says so in the log.
    """
    from ...ipc import framing

    problems = []
    for base in runtime_bases():
        if len(base) + len(f"/{RUNTIME_PREFIX}{supervisor_id}-ffffff") > MAX_RUNTIME_DIR:
            problems.append(f"{base}: path too long for sockets")
            continue
        why = _ensure_base(base)
        if why:
            problems.append(f"{base}: {why}")
            continue
        staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=base)  # mode 0700
        try:
            _write_owner(staging, {"supervisor_id": supervisor_id, "uid": os.geteuid(),
                                   "created_wall": time.time(), **owner_of_self()})
            for name in [f"{RUNTIME_PREFIX}{supervisor_id}"] + [
                    f"{RUNTIME_PREFIX}{supervisor_id}-{secrets.token_hex(3)}" for _ in range(5)]:
                path = os.path.join(base, name)
                try:
                    os.rename(staging, path)  # fails if `path` exists and is not empty
                except OSError as exc:
                    if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                        continue
                    raise
                return path
            raise FileExistsError(f"no free runtime directory name for {supervisor_id} in {base}")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    log.warning("deadstop: no runtime base usable (%s); using a temporary directory that the next "
                "supervisor will not clean up if this one is killed", "; ".join(problems))
    return framing.make_runtime_dir()


def _read_owner(dir_fd: int) -> dict[str, Any] | None:
    try:
        fd = os.open(OWNER_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        rec = json.loads(data)
    except ValueError:
        return None
    if not isinstance(rec, dict):
        return None
    for key, typ in (("pid", int), ("start_ticks", int), ("pidns", int), ("boot_id", str), ("supervisor_id", str)):
        if not isinstance(rec.get(key), typ) or isinstance(rec.get(key), bool):
            return None
    return rec if rec["pid"] > 0 else None


def sweep_runtime_dirs(bases: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Remove runtime directories of dead supervisors under each base; returns what was removed.

    Only entries named ds-* (or .ds-new-*) that are real directories (never a
    symlink: checked on a descriptor opened with O_NOFOLLOW) owned by our uid
    are considered; removal is fd-relative and does not follow symlinks.
    """
    removed: list[dict[str, Any]] = []
    for base in (runtime_bases() if bases is None else bases):
        try:
            base_fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # missing (nothing ever ran here) or a symlink: not ours to walk
        try:
            why = _base_problem(os.fstat(base_fd))
            if why:
                log.warning("deadstop: not sweeping runtime base %s: %s", base, why)
                continue
            for name in os.listdir(base_fd):
                rec = _sweep_one_dir(base, base_fd, name)
                if rec is not None:
                    removed.append(rec)
        finally:
            os.close(base_fd)
    return removed


def _sweep_one_dir(base: str, base_fd: int, name: str) -> dict[str, Any] | None:
    staging = _STAGING_NAME.fullmatch(name) is not None
    if not staging and _RUNTIME_NAME.fullmatch(name) is None:
        return None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=base_fd)
    except OSError:
        return None  # a symlink, not a directory, or already gone
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            return None
        rec = _read_owner(fd)
    finally:
        os.close(fd)
    path = os.path.join(base, name)
    if rec is None:
        if staging and time.time() - st.st_mtime > STAGING_STALE:
            why = "staging directory without an owner record"
            rec = {"supervisor_id": None, "pid": None}
        else:
            log.debug("deadstop: %s has no owner record; left alone", path)
            return None
    else:
        if not staging and not name.startswith(f"{RUNTIME_PREFIX}{rec['supervisor_id']}"):
            log.debug("deadstop: %s: owner record names another supervisor; left alone", path)
            return None
        status, why = owner_status(rec["pid"], rec["start_ticks"], rec["boot_id"], rec["pidns"])
        if status != DEAD:
            return None
    if not _rmtree_at(base_fd, name, path):
        return None
    log.info("deadstop: removed runtime directory %s of dead supervisor %s (%s)", path, rec["supervisor_id"], why)
    return {"kind": "runtime_dir", "path": path, "supervisor_id": rec["supervisor_id"], "pid": rec["pid"],
            "why": why}


def _rmtree_at(base_fd: int, name: str, path: str) -> bool:
    if not shutil.rmtree.avoids_symlink_attacks:  # pragma: no cover - every Linux Python has it
        log.warning("deadstop: not removing %s: this platform's rmtree may follow symlinks", path)
        return False
    try:
        if sys.version_info >= (3, 11):
            shutil.rmtree(name, dir_fd=base_fd)
        else:  # pragma: no cover
            shutil.rmtree(path)
    except FileNotFoundError:
        pass  # another supervisor swept it at the same time
    except OSError as exc:
        log.warning("deadstop: could not remove %s: %s", path, exc)
    try:
        os.lstat(name, dir_fd=base_fd)
    except FileNotFoundError:
        return True
    return False


# -- cgroups ----------------------------------------------------------------------------
def _tree_dirs(path: str) -> list[str]:
    """`path` and every cgroup below it, deepest last."""
    out = [path]
    i = 0
    while i < len(out):
        try:
            out.extend(e.path for e in os.scandir(out[i]) if e.is_dir(follow_symlinks=False))
        except OSError:
            pass
        i += 1
    return out


def _tree_pids(path: str) -> set[int]:
    pids: set[int] = set()
    for d in _tree_dirs(path):
        pids.update(Cgroup(d).pids())
    return pids


def _kill_tree(cg: Cgroup, *, v2: bool, use_kill: bool | None = None) -> None:
    """SIGKILL everything in the subtree: cgroup.kill, else freeze + pidfds + thaw."""
    if use_kill is None:
        use_kill = v2 and cg.has("cgroup.kill")
    if use_kill:
        cg.kill()
        return
    frozen = v2 and cg.has("cgroup.freeze")
    if frozen:
        cg.freeze(True)
    try:
        procs.signal_members(_tree_pids(cg.path), signal.SIGKILL, lambda: _tree_pids(cg.path))
    finally:
        if frozen:
            cg.freeze(False)  # SIGKILLed tasks leave a frozen cgroup too, but thaw for the stragglers


async def _wait_empty(cg: Cgroup, *, v2: bool, timeout: float, kill_again) -> bool:
    """Wait until the subtree holds no process: on cgroup.events (v2) plus a short
    backoff re-read (the kernel rate-limits those notifications); v1 has no
    events file, so there only the backoff. `kill_again` is called on each
    re-read while processes remain (pidfd path: a task may have been forking)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    woken = asyncio.Event()
    watcher = wd = None
    if v2:
        try:
            watcher = InotifyWatcher(loop)
            wd = watcher.watch(cg.events_file, woken.set)
        except OSError:
            watcher = None
    try:
        recheck = 0.001
        while True:
            woken.clear()
            empty = not cg.populated() if v2 else not _tree_pids(cg.path)
            if empty:
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            kill_again()
            try:
                await asyncio.wait_for(woken.wait(), min(remaining, recheck))
            except asyncio.TimeoutError:
                recheck = min(recheck * 2, 0.05)
    finally:
        if watcher is not None:
            if wd is not None:
                watcher.unwatch(wd)
            watcher.close()


async def sweep_cgroup_roots(roots: Iterable[str], *, v2: bool = True, use_kill: bool | None = None,
                             timeout: float = KILL_WAIT) -> list[dict[str, Any]]:
    """Remove dead supervisors' subtrees among the children of each root.

    `roots` are cgroup directories whose children may be deadstop subtrees
    (named by `cgroup_name`); `v2` False for a v1 hierarchy (no cgroup.kill,
    no cgroup.events: pidfd kill and a bounded re-read). `use_kill` forces
    (True) or forbids (False) cgroup.kill, for tests of the fallback.
    Populated subtrees are killed and waited for concurrently.
    """
    jobs = []
    for root in roots:
        try:
            entries = [e for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        for entry in entries:
            owner = parse_cgroup_name(entry.name)
            if owner is None:
                continue
            status, why = owner_status(owner["pid"], owner["start_ticks"], None, owner["pidns"])
            if status == DEAD:
                jobs.append(_remove_subtree(Cgroup(entry.path), owner, why, v2=v2, use_kill=use_kill,
                                            timeout=timeout))
    results = await asyncio.gather(*jobs)
    return [r for r in results if r is not None]


async def _remove_subtree(cg: Cgroup, owner: dict[str, Any], why: str, *, v2: bool, use_kill: bool | None,
                          timeout: float) -> dict[str, Any] | None:
    killed = sorted(_tree_pids(cg.path))
    if killed:
        atomic = use_kill if use_kill is not None else v2 and cg.has("cgroup.kill")

        def kill() -> None:
            try:
                _kill_tree(cg, v2=v2, use_kill=atomic)
            except FileNotFoundError:
                pass  # removed by someone else meanwhile
            except OSError as exc:
                log.warning("deadstop: cannot kill leftover cgroup %s: %s", cg.path, exc)

        kill()
        # cgroup.kill is atomic with respect to forks: once is enough; the pidfd path repeats
        again = (lambda: None) if atomic else kill
        if not await _wait_empty(cg, v2=v2, timeout=timeout, kill_again=again):
            log.warning("deadstop: leftover cgroup %s of dead supervisor %s still populated after %.1f s: %s",
                        cg.path, owner["supervisor_id"], timeout, sorted(_tree_pids(cg.path)))
            return None
    if not cg.remove():
        log.warning("deadstop: could not remove leftover cgroup %s", cg.path)
        return None
    log.info("deadstop: removed cgroup %s of dead supervisor %s (%s)%s", cg.path, owner["supervisor_id"], why,
             f"; killed pids {killed}" if killed else "")
    return {"kind": "cgroup" if v2 else "cgroup-v1", "path": cg.path, "supervisor_id": owner["supervisor_id"],
            "pid": owner["pid"], "why": why, "killed": killed}


def v1_roots() -> list[str]:
    """This process's own cgroups in the v1 hierarchies where deadstop puts
    per-run memory/pids cgroups; the v1 part of the sweep is a no-op until
    supervisor/mechanisms/cgroup_v1.py provides discovery and names its subtrees with
    `cgroup_name` (deadstop-<id>-<pid>-<ticks>-<pidns>): a subtree named
    without its owner is never removed, since its owner cannot be judged."""
    try:
        from . import cgroup_v1
    except ImportError:
        return []
    roots = getattr(cgroup_v1, "leftover_roots", None)
    return list(roots()) if callable(roots) else []


async def sweep() -> list[dict[str, Any]]:
    """The sweep run by AsyncSupervisor.open(): runtime directories, the v2
    subtrees beside ours, and the v1 ones. Never raises: a sweep that fails
    must not keep a supervisor from starting; the failure is logged."""
    removed: list[dict[str, Any]] = []
    try:
        removed.extend(sweep_runtime_dirs())
    except Exception:
        log.exception("deadstop: sweeping runtime directories failed")
    try:
        base, _why = own_cgroup_dir()
        if base is not None:
            removed.extend(await sweep_cgroup_roots([base], v2=True))
        roots = v1_roots()
        if roots:
            removed.extend(await sweep_cgroup_roots(roots, v2=False))
    except Exception:
        log.exception("deadstop: sweeping leftover cgroups failed")
    return removed
