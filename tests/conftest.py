"""Shared fixtures: every test runs under a process-leak check.

The leak check is independent of the code under test: it reads /proc itself
for the run marker and walks the test process's own descendants with psutil.
A leaked process fails the test (and is then killed by PID so that one leak
does not cascade into every later test).
"""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from procscan import marked_processes

LEAK_WAIT = 5.0


def _cgroup_v2_writable() -> bool:
    from deadstop.supervisor.mechanisms.cgroups import CgroupTree

    tree, _why = CgroupTree.create("probe" + str(os.getpid()))
    if tree is None:
        return False
    tree.remove()
    return True


CGROUP_OK = _cgroup_v2_writable()
LAYERS = ["cgroup", "process-group"] if CGROUP_OK else ["process-group"]


@pytest.fixture(params=LAYERS)
def layer(request) -> str:
    """Every containment layer this machine offers (the fallback is always there)."""
    return request.param


@pytest.fixture
def workspace(tmp_path):
    """The run's cwd: a directory its own identity can write (mode 0777), where
    runs put their evidence files. Kept apart from tmp_path itself, which tests
    use as the state directory, so the journal is never inside a run's reach."""
    work = tmp_path / "work"
    work.mkdir()
    os.chmod(work, 0o777)
    return work


@pytest.fixture
def ready(workspace):
    """A readiness FIFO in the workspace (daemonctl.Ready): runs, whatever their uid, write a line to it."""
    from daemonctl import Ready

    r = Ready(workspace)
    yield r
    r.close()


@pytest.fixture(autouse=True)
def no_leaked_processes():
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    leaked = [p for p in me.children(recursive=True) if p.pid not in before]
    _gone, alive = psutil.wait_procs(leaked, timeout=LEAK_WAIT)
    alive = [p for p in alive if _alive(p)]
    marked = marked_processes()
    if alive or marked:
        desc = [f"{p.pid} {_cmd(p)}" for p in alive] + [f"{pid} (marker {run})" for pid, run in marked.items()]
        for p in alive:
            _kill(p.pid)
        for pid in marked:
            _kill(pid)
        psutil.wait_procs(alive, timeout=LEAK_WAIT)  # reap our own children among them
        pytest.fail(f"test leaked processes: {desc}")


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cmd(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:120]
    except psutil.Error:
        return "?"


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
