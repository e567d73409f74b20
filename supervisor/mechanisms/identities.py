"""Per-run unprivileged identities: a uid and gid no other process on the host has.

A run's uid is what makes it unable to touch anything else: it cannot
signal, ptrace or read the memory of the supervisor, the spawner or another
run, it cannot write any cgroup file (all root-owned), and the kernel
attests it on every egress connection (SO_PEERCRED), so a credential stolen
from another run authenticates nothing. It is also a marker the run cannot
rewrite: every process with the uid belongs to the run.

Identities come from a range unlikely to be used on the host (default
2,100,000,000 + 65,536: above the ranges that /etc/subuid, systemd's
DynamicUser and container runtimes hand out). Supervisors on one host share
it without coordination beyond the kernel: each claims a block by holding an
exclusive flock on the block's lock file for its lifetime, so a supervisor
that dies (even by SIGKILL) frees its block. Claiming a block first kills
any process still holding one of its uids: a leftover of a dead supervisor.
"""

from __future__ import annotations

import fcntl
import os
import tempfile

from ..errors import DeadstopError
from ...worker.platform import kill_uids

DEFAULT_UID_RANGE = (2_100_000_000, 65_536)
BLOCK = 4096


class IdentitiesExhausted(DeadstopError):
    """Every uid of this supervisor's block belongs to a live (or unreaped) run."""


def _lock_dir() -> str:
    base = "/run" if os.geteuid() == 0 and os.access("/run", os.W_OK) else tempfile.gettempdir()
    path = os.path.join(base, "deadstop-uids")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


class IdentityPool:
    """A block of uids (gid = uid) claimed for one supervisor's runs."""

    def __init__(self, uid_range: tuple[int, int] = DEFAULT_UID_RANGE):
        start, count = uid_range
        if start <= 0 or count <= 0 or start + count >= 2**32 - 1:
            raise ValueError(f"uid_range {uid_range!r} must be (first uid > 0, count > 0) below 2**32-1")
        self._lock_fd, self.first = self._claim(start, count)
        self.size = min(BLOCK, count)
        self._free = list(range(self.first + self.size - 1, self.first - 1, -1))
        self._used: set[int] = set()
        self.swept = kill_uids(range(self.first, self.first + self.size))  # leftovers of a dead owner

    @staticmethod
    def _claim(start: int, count: int) -> tuple[int, int]:
        lock_dir = _lock_dir()
        for first in range(start, start + count, BLOCK):
            fd = os.open(os.path.join(lock_dir, f"{first}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return fd, first
        raise IdentitiesExhausted(f"every uid block in {start}..{start + count - 1} is held by a live supervisor "
                                  f"(lock files in {lock_dir})")

    def allocate(self) -> int:
        if not self._free:
            raise IdentitiesExhausted(f"all {self.size} uids of block {self.first} are in use by live runs")
        uid = self._free.pop()
        self._used.add(uid)
        return uid

    def release(self, uid: int) -> None:
        """Give a uid back once no process of its run is left (never earlier)."""
        if uid in self._used:
            self._used.discard(uid)
            self._free.insert(0, uid)  # reuse the least recently freed last

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
