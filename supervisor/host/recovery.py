"""Crash recovery (G5, second half): a restarted supervisor ends what its
predecessor left alive.

When a supervisor and its spawner are both killed, run leaders die by their
parent-death signal, but their children, and anything that escaped with
setsid, live on. On start, a supervisor reads the store for runs that were
live when their supervisor died, finds their processes three ways, kills
them, and records it:

1. the run's cgroup, if it still exists (cgroup.kill catches everything);
2. the run's leader, identified by pid *and* start time, never pid alone;
3. every process carrying the run's marker in its environment.

A supervisor counts as dead when no process has its recorded pid with its
recorded start time (or the machine has rebooted since).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import psutil

from ...ipc import framing
from ..mechanisms import leftovers
from ..mechanisms import procs
from ..mechanisms.cgroups import Cgroup
from ..store import queries
from ..store.journal import Journal
from ..mechanisms.procs import boot_id
from ..store.report import StopReport

log = logging.getLogger("deadstop.recovery")


def _alive(pid: int | None, create_time: float | None) -> bool:
    if not pid:
        return False
    try:
        return abs(psutil.Process(pid).create_time() - (create_time or 0)) < 0.05
    except psutil.Error:
        return False


def _marked(run_ids: set[str]) -> dict[int, str]:
    """pid -> run id for every live process carrying one of these markers."""
    prefix = f"{framing.ENV_MARKER}=".encode()
    found: dict[int, str] = {}
    for pid in psutil.pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        for entry in env:
            if entry.startswith(prefix):
                value = entry[len(prefix):].decode(errors="replace")
                if value in run_ids:
                    found[pid] = value
                break
    return found


async def recover(journal: Journal, own_id: str) -> list[dict[str, Any]]:
    """Kill what is left of runs whose supervisor died; returns one record per such run."""
    db = journal.db
    this_boot = boot_id()
    dead: dict[str, dict[str, Any]] = {}
    for sid, pid, ctime, boot in queries.unended_supervisors(db, own_id):
        if boot != this_boot or not _alive(pid, ctime):
            dead[sid] = {"boot": boot}
    if not dead:
        return []
    runs = queries.unended_runs_of(db, list(dead))
    records = []
    killed_pids: list[int] = []
    same_boot = {sid for sid, info in dead.items() if info["boot"] == this_boot}
    for run_id, sid, pid, ctime, cgroup_path, session in runs:
        found: list[int] = []
        if sid in same_boot and cgroup_path and os.path.isdir(cgroup_path):
            cg = Cgroup(cgroup_path)
            found.extend(cg.pids())
            try:
                cg.kill()
            except OSError:
                pass
        if sid in same_boot and _alive(pid, ctime):
            fd = procs.open_pidfd(pid)
            if fd is not None:
                if _alive(pid, ctime):  # still the same process now that the pidfd pins it
                    procs.pidfd_signal(fd, signal.SIGKILL)
                    found.append(pid)
                os.close(fd)
        records.append({"run_id": run_id, "supervisor_id": sid, "session": session, "found": found})
    by_run = {r["run_id"]: r for r in records}
    marked = _marked(set(by_run)) if by_run else {}
    if marked:
        procs.signal_members(marked, signal.SIGKILL, lambda: set(_marked(set(by_run))))
        for pid, run_id in marked.items():
            by_run[run_id]["found"].append(pid)
    for rec in records:
        killed_pids.extend(rec["found"])
    if killed_pids:
        await procs.wait_pids_gone(sorted(set(killed_pids)), timeout=10)
    now_ns = time.monotonic_ns()
    for rec in records:
        rec["found"] = sorted(set(rec["found"]))
        left = sorted(_marked({rec["run_id"]}))
        report = StopReport(run_id=rec["run_id"], containment="recovery", outcome="killed", ended_by="recovered",
                            requested_at=now_ns, revoked_at=now_ns, revoke_source="restart",
                            revoke_reason=f"supervisor {rec['supervisor_id']} died", reaped_at=now_ns,
                            swept=len(rec["found"]), escaped_pids=rec["found"], escaped=len(rec["found"]),
                            survivors=len(left), survivor_pids=left)
        journal.revoked(rec["run_id"], now_ns, "restart", report.revoke_reason)
        journal.run_ended(rec["run_id"], "killed", now_ns, None, None, {**report.to_dict(),
                                                                        "recovered_pids": rec["found"]})
        if rec["session"]:
            journal.session_recovered(rec["session"], rec["run_id"])
    for sid in dead:
        journal.supervisor_recovered(sid, own_id)
        if sid in same_boot:
            _remove_dead_tree(db, sid)
    journal.commit_now()
    if records:
        log.warning("deadstop: recovered %d run(s) of dead supervisor(s) %s; killed pids %s",
                    len(records), sorted(dead), sorted(set(killed_pids)))
    return records


def _remove_dead_tree(db: Any, sid: str) -> None:
    """Remove the dead supervisor's cgroup subtree (deadstop-<id>-<owner>), now empty."""
    path = queries.a_cgroup_of(db, sid)
    if path is not None:
        root = os.path.dirname(path)
        if leftovers.is_subtree_of(os.path.basename(root), sid) and os.path.isdir(root):
            tree = Cgroup(root)
            try:
                tree.kill()
            except OSError:
                pass
            if not tree.remove():
                log.warning("deadstop: could not remove %s (still populated?)", root)

