"""Linux process controls that the standard library does not wrap.

Each helper degrades to a no-op returning False where the platform lacks the
feature, so callers can name the weaker containment they ended up with
instead of failing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
import sys
from typing import Callable

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


def set_dumpable(dumpable: bool) -> bool:
    """PR_SET_DUMPABLE: a process that is not dumpable has its /proc files owned
    by root and cannot be ptraced or read without CAP_SYS_PTRACE."""
    return _prctl(4, 1 if dumpable else 0)


def set_child_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process instead of init."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


#: Kernels built without CONFIG_PROC_CHILDREN (and macOS) have no children file.
_HAVE_CHILDREN_FILE = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def direct_children(pid: int) -> list[int]:
    """Children of `pid`, read from /proc without scanning every process.

    A process that exits while it is being read simply has no children any
    more (they re-parent, and a walk of the tree meets them there). Falls
    back to psutil where the children file does not exist.
    """
    if not _HAVE_CHILDREN_FILE:
        import psutil

        try:
            return [c.pid for c in psutil.Process(pid).children()]
        except psutil.Error:
            return []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for tid in tasks:
        try:
            found.extend(int(x) for x in read_small(f"/proc/{pid}/task/{tid}/children").split())
        except OSError:  # ENOENT / ESRCH: that thread or the process exited meanwhile
            continue
    return found


def read_small(path: str) -> bytes:
    """The whole content of a small kernel file (/proc, cgroupfs) with three system calls.

    Python's buffered open() adds a stat, a terminal check and a seek to
    each open, and a file object's allocation: on paths read per run and per
    stop (cgroup.procs, cgroup.events, /proc/<pid>/stat) those were most of
    the cost. Raises OSError (FileNotFoundError, ...) as open() would.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, 65536)
        if len(data) < 65536:
            return data
        chunks = [data]
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_small(path: str, data: bytes) -> None:
    """Write `data` to a kernel control file in one write (cgroup.kill, cgroup.freeze, ...)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def create_time(pid: int) -> float:
    """When `pid` started, in seconds since the epoch: psutil's `Process.create_time()`, computed the same way
    (its starttime in /proc/<pid>/stat over the clock ticks, plus /proc/stat's btime), with two reads.

    The spawner asks this once per run it starts, and every page of Python
    objects it writes while doing so becomes a page of that run's own memory
    (the run shares the spawner's pages copy-on-write until one side writes
    them): psutil's Process object and its machinery wrote about 100 pages,
    400 KiB of every idle run's USS. Raises OSError where /proc cannot say.
    """
    try:
        ticks = int(_stat_fields(pid, 20)[19])  # field 22
        host = read_small("/proc/stat")
        at = host.index(b"\nbtime ")
        booted = float(host[at + 7:host.index(b"\n", at + 1)])
    except (ValueError, IndexError) as exc:
        raise OSError(f"/proc cannot say when {pid} started: {exc}") from None
    return ticks / _CLOCK_TICKS + booted


def parent_pid(pid: int) -> int | None:
    """The parent of `pid` from /proc/<pid>/stat (field 4); None if it is gone."""
    try:
        return int(_stat_fields(pid, 2)[1])
    except (OSError, ValueError, IndexError):
        return None


def _stat_fields(pid: int, upto: int) -> list[bytes]:
    """/proc/<pid>/stat from field 3 (the state) on, split `upto` times (the spawner's start path
    makes as few objects as it can); the command name before them is free text up to the last ')'.
    Raises OSError if the process is gone, ValueError if the file is not a stat line."""
    stat = read_small(f"/proc/{pid}/stat")
    return stat[stat.rindex(b")") + 2:].split(None, upto)


def process_uid(pid: int) -> int | None:
    """Real uid of a process from /proc/<pid>/status (exact even when it is not dumpable,
    and a marker a run with its own uid cannot change)."""
    try:
        status = read_small(f"/proc/{pid}/status")
        at = status.find(b"\nUid:")
        return int(status[at + 5:].split(None, 1)[0]) if at >= 0 else None
    except (OSError, ValueError, IndexError):
        return None


def kill_checked(pid: int, still_ours: "Callable[[int], bool]") -> bool:
    """SIGKILL `pid` through a pidfd opened before the final `still_ours` check, so a
    recycled pid is never hit. True if the signal was sent."""
    import signal

    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if still_ours(pid):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            return True
    except OSError:
        pass
    finally:
        os.close(fd)
    return False


def kill_uids(uids: range) -> list[int]:
    """SIGKILL every process whose real uid is in `uids` (a full /proc scan); their pids."""
    in_range = lambda pid: process_uid(pid) in uids  # noqa: E731
    return [int(e) for e in os.listdir("/proc")
            if e.isdigit() and in_range(int(e)) and kill_checked(int(e), in_range)]


def exec_env_slot(name: str) -> tuple[int, int] | None:
    """Where the value of `name` sits in this process's exec-time environment: (address, width).

    /proc/<pid>/environ shows the environment block the process was exec'd
    with, not os.environ; a forked child therefore still shows its parent's.
    The spawner is exec'd with a fixed-width placeholder for the run marker,
    finds it here once, and each forked run writes its own id into that same
    memory (write_exec_env_slot), so that it and every process it forks are
    recognisable from outside. The block never moves (setenv reallocates the
    pointer array, not the strings). None if the slot is missing.
    """
    if _libc is None:
        return None
    prefix = f"{name}=".encode()
    environ = ctypes.POINTER(ctypes.c_void_p).in_dll(_libc, "environ")
    i = 0
    while environ[i]:
        addr = environ[i]
        if ctypes.string_at(addr, len(prefix)) == prefix:
            return addr + len(prefix), len(ctypes.string_at(addr)) - len(prefix)
        i += 1
    return None


def write_exec_env_slot(slot: tuple[int, int] | None, value: bytes) -> bool:
    """Overwrite the slot exec_env_slot found (in a forked copy of the finder); False if it cannot hold `value`.

    One memmove: the forked run does this first thing, and every object a
    Python-level search of the block touched would be a page the run owns a
    copy of.
    """
    if slot is None or len(value) != slot[1]:
        return False
    ctypes.memmove(slot[0], value, len(value))
    return True


# -- clone3(CLONE_INTO_CGROUP) ----------------------------------------------------
# Moving a live process into a cgroup (writing cgroup.procs) waits for a
# kernel-wide RCU synchronisation: several milliseconds per run on a busy
# machine. clone3 with CLONE_INTO_CGROUP creates the child inside the cgroup
# instead, at the cost of a plain fork, and hands back a pidfd with it.
CLONE_PIDFD = 0x00001000
CLONE_INTO_CGROUP = 0x200000000
_SYS_CLONE3 = {"x86_64": 435, "aarch64": 435, "arm64": 435, "riscv64": 435, "ppc64le": 435, "s390x": 435}


class _CloneArgs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size", "tls",
        "set_tid", "set_tid_size", "cgroup")]


_py = None
if _libc is not None:
    import platform as _platform

    _nr_clone3 = _SYS_CLONE3.get(_platform.machine())
    if _nr_clone3 is not None:
        # PyDLL: the call keeps the GIL, as os.fork() does around fork().
        _py = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _py.syscall.restype = ctypes.c_long
        _py.syscall.argtypes = [ctypes.c_long, ctypes.c_void_p, ctypes.c_size_t]


class _Clone3:
    """clone3's arguments and the interpreter's fork hooks, made once and reused by every fork.

    Every Python object the spawner touches while it starts a run is a page
    that run ends up owning a copy of (they share pages copy-on-write until
    one side writes), so the per-fork path builds nothing it can keep.
    The spawner is single-threaded: one set of arguments is enough.
    """

    def __init__(self, py: "ctypes.PyDLL"):
        import signal

        self.pidfd = ctypes.c_int(-1)
        self.args = _CloneArgs(flags=CLONE_INTO_CGROUP | CLONE_PIDFD, pidfd=ctypes.addressof(self.pidfd),
                               exit_signal=signal.SIGCHLD)
        self.args_ref, self.args_size = ctypes.byref(self.args), ctypes.sizeof(self.args)
        self.syscall = py.syscall
        api = ctypes.pythonapi
        self.before, self.after_child, self.after_parent = api.PyOS_BeforeFork, api.PyOS_AfterFork_Child, \
            api.PyOS_AfterFork_Parent


_clone3 = _Clone3(_py) if _py is not None else None


def fork_into_cgroup(cgroup_fd: int) -> tuple[int, int]:
    """os.fork(), but the child is born inside the cgroup open at `cgroup_fd`.

    Returns (pid, pidfd) in the parent and (0, -1) in the child. Raises
    OSError (ENOSYS, EINVAL on kernels before 5.7, EPERM under seccomp) when
    the kernel cannot do it; the caller then forks and moves the child.
    The interpreter's fork hooks run exactly as for os.fork().
    """
    c = _clone3
    if c is None:
        raise OSError(errno.ENOSYS, "clone3 is not available on this platform")
    c.args.cgroup = cgroup_fd
    c.pidfd.value = -1
    c.before()
    pid = c.syscall(_nr_clone3, c.args_ref, c.args_size)
    if pid == 0:
        c.after_child()
        return 0, -1
    err = ctypes.get_errno()
    c.after_parent()
    if pid < 0:
        raise OSError(err, os.strerror(err))
    return pid, c.pidfd.value


# -- sandbox primitives (worker/sandbox.py orders them) ---------------------------
# Each raises OSError with the kernel's errno: a sandbox step that cannot be
# taken must fail the run's start, never be skipped silently.
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _need_libc() -> "ctypes.CDLL":
    if _libc is None:
        raise OSError(errno.ENOSYS, "no libc: this platform has no Linux namespaces")
    return _libc


def prewarm_sandbox() -> None:
    """Resolve, once in the spawner, every libc function the sandbox calls.

    ctypes looks a function up (dlsym) on first use and caches it on the
    library object; done here, before the forks, each run inherits the
    cache instead of paying the look-ups in its start (~0.3 ms, measured).
    """
    if _libc is None:
        return
    for name in ("prctl", "unshare", "mount", "sethostname", "capset", "capget", "setns"):
        getattr(_libc, name)


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    """prctl(2) that raises, for the steps whose failure must abort the start."""
    _check(_need_libc().prctl(option, arg2, arg3, 0, 0), f"prctl({option})")


def unshare(flags: int) -> None:
    _check(_need_libc().unshare(ctypes.c_int(flags)), f"unshare({flags:#x})")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    libc = _need_libc()
    enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    _check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {source or fstype} on {target}")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_need_libc().sethostname(raw, len(raw)), "sethostname")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522


#: Built once in the spawner: in a freshly forked run every allocation is a
#: copy-on-write page fault, so the sandbox allocates as little as it can.
_CAP_HEADER = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
_CAP_NONE = (_CapData * 2)()
_CAP_READ = (_CapData * 2)()  # capget's answer lands here: a page the run writes anyway, no new objects


def clear_capabilities() -> None:
    """Empty the effective, permitted and inheritable sets (capset(2), 64-bit layout)."""
    _check(_need_libc().capset(ctypes.byref(_CAP_HEADER), _CAP_NONE), "capset")


def capabilities_held() -> dict[str, int]:
    """The effective, permitted and inheritable sets that are not empty, as capget(2) reports them.

    The kernel's own answer, as /proc/self/status would give it, without the
    text to parse. The ambient set needs no look: it is always within the
    permitted and the inheritable sets.
    """
    _check(_need_libc().capget(ctypes.byref(_CAP_HEADER), _CAP_READ), "capget")
    low, high = _CAP_READ
    if not (low.effective or low.permitted or low.inheritable or high.effective or high.permitted
            or high.inheritable):
        return {}
    sets = {"CapEff": low.effective | high.effective << 32, "CapPrm": low.permitted | high.permitted << 32,
            "CapInh": low.inheritable | high.inheritable << 32}
    return {name: value for name, value in sets.items() if value}


def last_capability() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


def drop_bounding_set() -> None:
    """Remove every capability from the bounding set, so that no exec can regain one."""
    for cap in range(last_capability() + 1):
        prctl(PR_CAPBSET_DROP, cap)


SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


_IFREQ_FLAGS = struct.Struct("16sH14x")  # struct ifreq with ifr_flags
_LO_REQUEST = _IFREQ_FLAGS.pack(b"lo", 0)


def loopback_up() -> None:
    """Bring up `lo` in this (new) network namespace: runs keep 127.0.0.1 of their own.

    Bare `_socket` and one prepared request: the spawner does this for every
    run it starts (sandbox.NetnsPool), and each object made here is a page
    of that run's memory (see _Clone3).
    """
    import _socket
    import fcntl

    s = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        fd = s.fileno()
        flags = _IFREQ_FLAGS.unpack(fcntl.ioctl(fd, SIOCGIFFLAGS, _LO_REQUEST))[1]
        fcntl.ioctl(fd, SIOCSIFFLAGS, _IFREQ_FLAGS.pack(b"lo", flags | IFF_UP))
    finally:
        s.close()


def setns(fd: int, nstype: int) -> None:
    _check(_need_libc().setns(fd, nstype), f"setns({nstype:#x})")
