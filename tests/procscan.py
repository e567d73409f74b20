"""An independent view of which run processes exist: /proc read directly.

Deliberately shares no code with deadstop's containment layers, so a bug
there cannot hide a survivor from the tests.
"""

from __future__ import annotations

import os
import select
import time
import uuid

MARKER = b"DEADSTOP_RUN_MARKER="
#: Set in this test process's environment and inherited (through every
#: spawner's exec-time environment) by every run the suite starts, so the scan
#: never mistakes another program's runs on the same machine for ours.
SESSION_VAR = "DEADSTOP_TEST_SESSION"
SESSION = os.environ.setdefault(SESSION_VAR, uuid.uuid4().hex)
_SESSION_ENTRY = f"{SESSION_VAR}={SESSION}".encode()


def _environ(pid: str) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def _is_zombie(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return True
    return data[data.rindex(b")") + 2:].split()[0] in (b"Z", b"X")


def marked_processes(run_id: str | None = None) -> dict[int, str]:
    """pid -> run id of every live process carrying a run marker: one run's
    (run ids are random: whatever environment the run was given), or every
    run of this test session's."""
    found: dict[int, str] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        env = _environ(pid)
        if run_id is None and _SESSION_ENTRY not in env:
            continue
        for entry in env:
            if entry.startswith(MARKER):
                value = entry[len(MARKER):].decode(errors="replace")
                if value and not value.startswith("-") and (run_id is None or value == run_id):
                    if not _is_zombie(pid):
                        found[int(pid)] = value
                break
    return found


def wait_gone(pids, timeout: float) -> list[int]:
    """Wait on pidfds (no polling) until every pid has exited; return the survivors."""
    fds = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            pass
    try:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout
        pending = set(fds)
        while pending and time.monotonic() < deadline:
            for fd, _ in poller.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                pending.discard(fd)
                poller.unregister(fd)
        return sorted(fds[fd] for fd in pending)
    finally:
        for fd in fds:
            os.close(fd)


def cpu_seconds(pids) -> float:
    """CPU time (user + system) of these processes, read from /proc/<pid>/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / tick
