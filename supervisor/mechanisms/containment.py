"""Containment layers: what "the run" is, physically, and how to end all of it.

Each layer is a small class behind one protocol, chosen once per supervisor
(strongest available first) and named in every report. The stop policy
(revoke, SIGTERM, grace, SIGKILL, sweep) lives in supervisor/engine/stop.py and
does not know which layer it drives.

* `cgroup`: the run's own cgroup v2. `members` is cgroup.procs, `kill` is
  cgroup.kill (atomic against forks), waiting is an inotify event on
  cgroup.events. setsid() and double forks do not leave a cgroup; a process
  that moves itself out (only root can: a run with its own uid owns no
  cgroup file) is still found, because it still descends from the spawner:
  the sweep looks at every orphan the spawner adopted and their subtrees for
  the run's uid (which a run cannot change) or its marker, kills what it
  finds and reports it as `escaped`.
* `process-group+subreaper`: the run's process group (pinned by its zombie
  leader, see worker/spawner.py) for signals, and for the sweep every
  descendant of the spawner (orphans come back to it as the subreaper) that
  carries the run's environment marker.
* `process-group`: as above where no subreaper exists (macOS); the sweep
  then scans every process for the marker.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Callable, Protocol

import psutil

from . import procs
from .cgroups import Cgroup, InotifyWatcher
from ...worker.platform import process_uid, read_small
from .timer import sleep_until

#: Longest gap between two re-reads of a cgroup's state while waiting on it (see _wait_for).
RECHECK_MAX = 0.25

CGROUP = "cgroup"
PGROUP_SUBREAPER = "process-group+subreaper"
PGROUP = "process-group"


class Containment(Protocol):
    name: str

    def members(self) -> set[int]:
        """Live processes the layer's own signals reach."""

    def survivors(self) -> list[int]:
        """Every live process of the run, the sweep's view included."""

    def signal(self, sig: int) -> int:
        """Send `sig` to every member; returns how many were reached (-1: unknown)."""

    def kill(self) -> None:
        """SIGKILL every member."""

    def sweep(self) -> int:
        """SIGKILL survivors the layer's kill did not reach; returns how many it found (0: none left)."""

    async def wait_empty(self, timeout: float) -> bool:
        """Wait until no member is left; False on timeout."""

    async def wait_all_gone(self, timeout: float) -> bool:
        """Wait until no process of the run is left, the sweep's view included."""

    def freeze(self) -> None:
        """Stop every process of the run from running (cgroup.freeze, else SIGSTOP)."""

    def thaw(self) -> None: ...

    async def wait_frozen(self, frozen: bool, timeout: float) -> bool:
        """Wait until the whole run is frozen (or thawed); False on timeout."""

    def escapees(self) -> list[int]:
        """Live processes of the run outside the layer's own reach (found by uid or marker)."""

    def measure(self) -> tuple[float, int, int]:
        """(CPU seconds, resident bytes, live processes) of the run now."""

    def changed(self) -> None:
        """A hint that membership may have changed (the leader exited)."""

    def cleanup(self) -> None: ...


class RunIdentity:
    """What marks a process as the run's wherever it went: its uid (which the
    run cannot change when it has its own) or its environment marker (which a
    run can overwrite; trusted only without identities), found among the
    orphans the spawner adopted and their subtrees."""

    def __init__(self, uid: int | None, marker: bytes, spawner_pid: int | None,
                 leaders: Callable[[], set[int]] | None, leader: int | None = None):
        self.uid = uid
        self.marker = marker
        self.spawner_pid = spawner_pid
        #: every live run's leader pid (the supervisor's own set, not a copy: read in O(1)); their
        #: subtrees are their runs' cgroups, not adopted orphans, and are not walked
        self.leaders = leaders or (lambda: set())
        self.leader = leader  # this run's own: its subtree is walked

    def owns(self, pid: int) -> bool:
        if self.uid is not None:
            return process_uid(pid) == self.uid
        return procs.has_marker(pid, self.marker)

    def outside(self, inside: set[int]) -> list[int]:
        """Processes of the run among the spawner's adopted orphans' subtrees, minus `inside`."""
        if self.spawner_pid is None:
            return []
        children, strays = spawner_children.read(self.spawner_pid, self.leaders())
        roots = ([self.leader] if self.leader in children else []) + strays
        found = []
        for root in roots:
            for pid in [root, *procs.descendants(root)]:
                if pid not in inside and _alive(pid) and self.owns(pid):
                    found.append(pid)
        return found


class _ChildrenCensus:
    """The spawner's children, read at most once per event-loop step, and those that are no live run's leader.

    A stop of N runs sweeps N times, mostly in the same few steps (one
    inotify read wakes them together), and each read lists every run's
    leader: read once per step, and the adopted orphans (whose subtrees each
    sweep must walk) picked out once, it costs O(N), not O(N^2). Outside a
    running loop every call reads afresh.
    """

    def __init__(self) -> None:
        self._step: dict[int, tuple[set[int], list[int]]] = {}

    def read(self, spawner_pid: int, leaders: set[int]) -> tuple[set[int], list[int]]:
        """(the spawner's children, those of them not in `leaders`)."""
        got = self._step.get(spawner_pid)
        if got is None:
            from ...worker.platform import direct_children

            children = direct_children(spawner_pid)
            got = (set(children), [c for c in children if c not in leaders])
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return got
            if not self._step:
                loop.call_soon(self._step.clear)  # runs after this step's callbacks
            self._step[spawner_pid] = got
        return got


spawner_children = _ChildrenCensus()


def _alive(pid: int) -> bool:
    st = procs.read_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


class CgroupContainment:
    name = CGROUP

    def __init__(self, cgroup: Cgroup, watcher: InotifyWatcher, has_kill: bool,
                 identity: RunIdentity | None = None):
        self.cgroup = cgroup
        self.has_kill = has_kill
        self.identity = identity
        self.escaped: list[int] = []
        self._watcher = watcher
        self._waiters: list[asyncio.Future] = []
        self._wd = watcher.watch(cgroup.events_file, self.changed)

    def changed(self) -> None:
        """Re-check waiters. Called on inotify events of cgroup.events, and by
        the run when its leader's pidfd fires: the kernel posts the cgroup
        notification from a work queue, the pidfd wake-up comes straight from
        the exiting task, so for a one-process run this is the earlier news."""
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def members(self) -> set[int]:
        return set(self.cgroup.pids())

    def survivors(self) -> list[int]:
        inside = self.cgroup.pids()
        return inside + self.escapees(set(inside))

    def escapees(self, inside: set[int] | None = None) -> list[int]:
        if self.identity is None:
            return []
        return self.identity.outside(self.members() if inside is None else inside)

    def signal(self, sig: int) -> int:
        return procs.signal_members(self.cgroup.pids(), sig, self.members)

    def kill(self) -> None:
        if self.has_kill:
            self.cgroup.kill()
            return
        # Pre-5.14 kernels: freeze so nothing forks or exits under us, kill, thaw.
        self.cgroup.freeze(True)
        try:
            procs.signal_members(self.cgroup.pids(), signal.SIGKILL, self.members)
        finally:
            self.cgroup.freeze(False)

    def sweep(self) -> int:
        left = self.cgroup.pids()
        if left:
            self.kill()
        out = self.escapees(set(left))
        if out:  # left the cgroup: kill each through a pidfd, re-checked as still the run's
            self.escaped += [pid for pid in out if pid not in self.escaped]
            identity = self.identity
            assert identity is not None
            procs.signal_members(out, signal.SIGKILL, lambda: {p for p in out if identity.owns(p)})
        return len(left) + len(out)

    async def _wait_for(self, predicate, timeout: float) -> bool:
        """Wait on cgroup.events notifications, re-reading on a short backoff too.

        The kernel rate-limits these notifications: a change that follows
        another within a few milliseconds (freeze right after thaw) is
        reported up to ~10 ms late although the state itself changed in
        0.3 ms. So besides each notification, the file is re-read after
        1, 2, 4 ... ms. A late notification still comes (the kernel defers
        it, never drops it; a lost one, an inotify queue overflow, wakes every
        waiter), so past the first few the re-reads are only a safety net, and
        they slow down to RECHECK_MAX apart: a stop of 1,000 runs has 1,000
        such waits at once, each re-reading its file.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        recheck = 0.001
        while True:
            fut = loop.create_future()
            self._waiters.append(fut)  # register before reading: no lost wake-up
            if predicate():
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(fut, min(remaining, recheck))
            except asyncio.TimeoutError:
                recheck = min(recheck * 2, RECHECK_MAX)

    async def wait_empty(self, timeout: float) -> bool:
        return await self._wait_for(lambda: not self.cgroup.populated(), timeout)

    async def wait_all_gone(self, timeout: float) -> bool:
        if not await self.wait_empty(timeout):
            return False
        return await procs.wait_pids_gone(self.escaped, timeout) if self.escaped else True

    def freeze(self) -> None:
        """cgroup.freeze, and SIGSTOP for any process of the run that left the cgroup."""
        self.cgroup.freeze(True)
        self._signal_escapees(signal.SIGSTOP)

    def thaw(self) -> None:
        self.cgroup.freeze(False)
        self._signal_escapees(signal.SIGCONT)

    def _signal_escapees(self, sig: int) -> None:
        out = self.escapees()
        if out:
            self.escaped += [pid for pid in out if pid not in self.escaped]
            identity = self.identity
            assert identity is not None
            procs.signal_members(out, sig, lambda: {p for p in out if identity.owns(p)})

    def _escapees_stopped(self, frozen: bool) -> bool:
        states = [(procs.read_stat(pid) or ("Z", 0))[0] for pid in self.escaped]
        return all((st in ("T", "t", "Z", "X")) == frozen or st in ("Z", "X") for st in states)

    async def wait_frozen(self, frozen: bool, timeout: float) -> bool:
        return await self._wait_for(lambda: bool(self.cgroup.events().get("frozen")) == frozen
                                    and self._escapees_stopped(frozen), timeout)

    def measure(self) -> tuple[float, int, int]:
        pids = self.cgroup.pids()
        cpu = self.cgroup.cpu_seconds()
        memory = self.cgroup.memory_current()
        if memory is None:  # no memory controller delegated: sum resident sizes
            memory = _rss_sum(pids)
        if cpu is None:
            cpu = _cpu_sum(pids)
        return cpu, memory, len(pids)

    def cleanup(self) -> None:
        self._watcher.unwatch(self._wd)
        self.changed()
        self.cgroup.remove()


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_sum(pids: list[int]) -> int:
    """Resident bytes of these processes: one read of /proc/<pid>/statm each (sampled for
    every live run, so no psutil handle per pid), psutil where /proc has no statm."""
    total = 0
    for pid in pids:
        try:
            total += int(read_small(f"/proc/{pid}/statm").split()[1]) * _PAGE
        except FileNotFoundError:
            if not os.path.exists("/proc/self/statm"):
                try:
                    total += psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    pass
        except (OSError, IndexError, ValueError):
            pass  # exited meanwhile
    return total


def _cpu_sum(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


class ProcessGroupContainment:
    def __init__(self, pgid: int, marker: str, spawner_pid: int, subreaper: bool, uid: int | None = None):
        self.pgid = pgid
        self.marker = marker.encode()
        self.spawner_pid = spawner_pid
        self.subreaper = subreaper
        #: the run's own uid, under isolation: decisive, since the run cannot
        #: change it (unlike its process group or its marker)
        self.uid = uid
        self.escaped: list[int] = []
        self.name = PGROUP_SUBREAPER if subreaper else PGROUP

    def _candidates(self) -> list[int]:
        if self.subreaper:
            return procs.descendants(self.spawner_pid)
        return psutil.pids()

    def _scan(self, with_marker: bool) -> list[int]:
        return [pid for pid in self._candidates() if self._belongs(pid, with_marker)]

    def _belongs(self, pid: int, with_marker: bool = True) -> bool:
        st = procs.read_stat(pid)
        if st is None or st[0] in ("Z", "X"):
            return False  # exited; the spawner reaps it
        if st[1] == self.pgid:
            return True
        if not with_marker:
            return False
        if self.uid is not None:
            return process_uid(pid) == self.uid
        return procs.has_marker(pid, self.marker)

    def _still_ours(self, pids: list[int]) -> Callable[[], set[int]]:
        """Membership re-check for signal_members: a few reads per pid, not a new tree walk."""
        return lambda: {pid for pid in pids if self._belongs(pid)}

    def members(self) -> set[int]:
        return set(self._scan(with_marker=False))

    def survivors(self) -> list[int]:
        return self._scan(with_marker=True)

    def signal(self, sig: int) -> int:
        try:
            os.killpg(self.pgid, sig)  # the zombie leader pins this pgid
            return -1
        except ProcessLookupError:
            return 0

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def escapees(self) -> list[int]:
        return [pid for pid in self.survivors() if (procs.read_stat(pid) or ("Z", 0))[1] != self.pgid]

    def sweep(self) -> int:
        left = self.survivors()
        if left:
            self.escaped += [pid for pid in left if pid not in self.escaped
                             and (procs.read_stat(pid) or ("Z", self.pgid))[1] != self.pgid]
            procs.signal_members(left, signal.SIGKILL, self._still_ours(left))
        return len(left)

    async def _wait_gone(self, scan, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            left = scan()
            if not left:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await procs.wait_pids_gone(left, remaining)

    async def wait_empty(self, timeout: float) -> bool:
        return await self._wait_gone(self.members, timeout)

    async def wait_all_gone(self, timeout: float) -> bool:
        return await self._wait_gone(self.survivors, timeout)

    def changed(self) -> None:
        pass  # waits here are on pidfds already

    def freeze(self) -> None:
        """SIGSTOP the group, then every other process of the run (escapers in other groups)."""
        self.signal(signal.SIGSTOP)
        outside = [pid for pid in self.survivors() if (procs.read_stat(pid) or ("Z", 0))[1] != self.pgid]
        procs.signal_members(outside, signal.SIGSTOP, self._still_ours(outside))

    def thaw(self) -> None:
        self.signal(signal.SIGCONT)
        outside = [pid for pid in self.survivors() if (procs.read_stat(pid) or ("Z", 0))[1] != self.pgid]
        procs.signal_members(outside, signal.SIGCONT, self._still_ours(outside))

    async def wait_frozen(self, frozen: bool, timeout: float) -> bool:
        # A stopped process raises no event anyone can wait on (waitid works
        # for the parent only), so the states are re-read with a short
        # backoff; one tree walk per pass also catches late forks.
        deadline = time.monotonic() + timeout
        delay = 0.0002
        while True:
            pids = self.survivors()
            states = {pid: (procs.read_stat(pid) or ("Z", 0))[0] for pid in pids}
            running = [pid for pid, st in states.items() if st not in ("T", "t", "Z", "X")]
            if (not running) if frozen else (len(running) == len(pids)):
                return True
            if time.monotonic() >= deadline:
                return False
            if frozen:  # processes forked after the first SIGSTOP
                procs.signal_members(running, signal.SIGSTOP, self._still_ours(running))
            await sleep_until(time.monotonic_ns() + int(delay * 1e9))
            delay = min(delay * 2, 0.02)

    def measure(self) -> tuple[float, int, int]:
        pids = self.survivors()
        return _cpu_sum(pids), _rss_sum(pids), len(pids)

    def cleanup(self) -> None:
        pass
