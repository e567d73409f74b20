"""The syscall filter every isolated run loads last, just before user code.

Built with libseccomp (through the thin `pyseccomp` ctypes binding) rather
than a hand-assembled BPF program: libseccomp resolves syscall numbers per
architecture, adds the architecture check that a hand-written filter tends
to forget, and orders the comparisons. The filter is compiled once in the
spawner into a BPF program (libseccomp's own export) and installed by each
forked run with one prctl(PR_SET_SECCOMP): a start pays neither for
building the filter nor for libseccomp's code generation (0.6 ms a run,
measured, against a few microseconds).

Default allow, with a deny list of what a confined run has no business
calling: every way to read or write another process's memory, to gain or
reuse privilege, to change the mount table, to load code into the kernel,
and to make a new user namespace (which would hand back a full capability
set inside it). Denied calls fail with EPERM, so a run sees an ordinary
error instead of dying mysteriously; `clone3` fails with ENOSYS because its
flags live in memory a filter cannot read, and libc then falls back to
`clone`, whose flags the filter does check.
"""

from __future__ import annotations

import ctypes
import errno
import os

#: Syscalls refused outright. Names libseccomp does not know on this
#: architecture are skipped (they cannot be called there either).
DENIED = (
    # other processes' memory and handles
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    # the mount table and the root
    "mount", "umount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsmount",
    "fsconfig", "fspick", "mount_setattr",
    # namespaces: entering one, or making a user namespace (see clone/unshare below)
    "setns",
    # kernel code and kernel-wide state
    "bpf", "perf_event_open", "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "reboot", "swapon", "swapoff", "syslog", "acct", "settimeofday", "clock_settime", "clock_adjtime",
    "adjtimex", "iopl", "ioperm", "quotactl", "quotactl_fd", "lookup_dcookie", "uselib", "vhangup",
    "nfsservctl", "sysfs", "_sysctl",
    # the kernel keyring (shared per user, and a history of privilege bugs)
    "keyctl", "add_key", "request_key",
    # handles to files by inode, past every directory permission
    "open_by_handle_at", "name_to_handle_at",
    # io_uring submits operations that the filter never sees
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    # page-fault handling from user space: a classic kernel-exploit primitive
    "userfaultfd",
)

CLONE_NEWUSER = 0x10000000


def build() -> bytes:
    """The compiled filter as raw BPF (struct sock_filter[]). Raises OSError if libseccomp is unusable."""
    try:
        import pyseccomp as seccomp
    except (ImportError, RuntimeError) as exc:  # RuntimeError: the library is missing
        raise OSError(errno.ENOSYS, f"libseccomp is not usable: {exc}") from None
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    deny = seccomp.ERRNO(errno.EPERM)
    for name in DENIED:
        try:
            f.add_rule(deny, name)
        except (ValueError, OSError, RuntimeError):
            continue  # not a syscall on this architecture
    # A new user namespace gives its creator every capability inside it.
    for name in ("unshare", "clone"):
        f.add_rule(deny, name, seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER))
    f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    r, w = os.pipe()
    try:
        with os.fdopen(w, "wb", closefd=False) as out:
            f.export_bpf(out)
        os.close(w)
        w = -1
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    program = b"".join(chunks)
    if not program or len(program) % 8:
        raise OSError(errno.EINVAL, f"libseccomp exported {len(program)} bytes, not a BPF program")
    return program


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl  # looked up here, in the spawner, not in each run
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


class Prepared:
    """A program laid out once, in the spawner, as the kernel reads it (a sock_fprog and its buffer).

    Each run loads it with one prctl on an address: building the buffer
    and the struct in the run would make objects there, and every object
    made in a freshly forked run is a page it owns a copy of.
    """

    def __init__(self, program: bytes):
        self.program = program
        self._buffer = ctypes.create_string_buffer(program, len(program))
        self._fprog = _SockFprog(len(program) // 8, ctypes.cast(self._buffer, ctypes.c_void_p))
        self.address = ctypes.addressof(self._fprog)


def load(prepared: Prepared) -> None:
    """Install the filter on the calling thread (and so on everything it forks).

    Needs no-new-privileges first (the sandbox sets it) unless the caller
    has CAP_SYS_ADMIN.
    """
    if _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, prepared.address, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_SECCOMP): {os.strerror(err)}")
