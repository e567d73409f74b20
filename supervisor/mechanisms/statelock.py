"""One live supervisor per state directory.

Two supervisors on one journal would each believe the other's sessions idle
and answer stop() of a run the other owns with a success that stopped
nothing. So a supervisor holds an exclusive flock on `<state_dir>/lock` for
its lifetime (the kernel drops it when the process dies, however it dies)
and writes its pid and id there; a second one refuses, naming the owner.
"""

from __future__ import annotations

import fcntl
import os

from ..errors import DeadstopError


class StateDirInUse(DeadstopError):
    """Another live supervisor owns this state directory."""


class StateLock:
    def __init__(self, state_dir: str, supervisor_id: str):
        self.path = os.path.join(state_dir, "lock")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateDirInUse(f"state directory {state_dir} is owned by a live supervisor ({owner}); "
                                "stop it, give this one a state directory of its own, or look with "
                                "StateView (read-only)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, supervisor {supervisor_id}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
