"""G5, first half: when the supervisor dies by SIGKILL, every run dies with it.

The supervisor is a real separate process; it is killed with SIGKILL, which
it cannot catch, so nothing in it gets a chance to clean up. The spawner
notices the closed control socket and kills every process below it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from procscan import marked_processes, wait_gone


def test_runs_die_with_a_sigkilled_supervisor(layer, workspace) -> None:
    here = os.path.dirname(__file__)
    host = subprocess.Popen([sys.executable, os.path.join(here, "agents_supervisor.py"), layer, str(workspace)],
                            stdout=subprocess.PIPE, text=True, cwd=here,
                            env={**os.environ, "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", "")})
    try:
        line = host.stdout.readline()
        assert line, "the host supervisor did not report its runs"
        info = json.loads(line)
        run_pids = {pid for run in info["runs"] for pid in marked_processes(run)}
        # 11 (tree of 5) + 2 (escaper and its leader) + 1 (ignorer)
        assert len(run_pids) >= 14, f"expected the whole run population, saw {len(run_pids)}"
        spawner = info["spawner"]

        os.kill(host.pid, signal.SIGKILL)
        host.wait(timeout=30)

        survivors = wait_gone(sorted(run_pids | {spawner}), timeout=20)
        assert survivors == [], f"processes outlived their SIGKILLed supervisor: {survivors}"
        for run in info["runs"]:
            assert marked_processes(run) == {}
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()


def _uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Uid:"))


def _alive_with_uids(uids: set[int]) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                    continue
            if _uid_of(int(entry)) in uids:
                found.append(int(entry))
        except (OSError, StopIteration):
            continue
    return found


@pytest.mark.skipif(os.geteuid() != 0, reason="per-run identities need root")
def test_runs_die_with_their_supervisor_even_when_the_spawner_is_stopped(layer, tmp_path) -> None:
    """G5 without the spawner's help: it is SIGSTOPped (the host's doing; a run
    cannot), then the supervisor is SIGKILLed. The watchdog ends every run."""
    import time

    here = os.path.dirname(__file__)
    os.chmod(tmp_path, 0o777)
    host = subprocess.Popen([sys.executable, os.path.join(here, "agents_stopped_spawner.py"), layer, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True, cwd=here,
                            env={**os.environ, "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", "")})
    spawner = None
    try:
        line = host.stdout.readline()
        assert line, "the host supervisor did not report its runs"
        info = json.loads(line)
        spawner = info["spawner"]
        uids = {_uid_of(pid) for pid in info["leaders"]}
        before = _alive_with_uids(uids)
        assert len(before) >= 5, f"the runs and their escapers should be alive: {before}"

        os.kill(spawner, signal.SIGSTOP)
        os.kill(host.pid, signal.SIGKILL)
        host.wait(timeout=30)

        assert wait_gone(before, timeout=20) == [], "processes outlived their SIGKILLed supervisor"
        deadline = time.monotonic() + 5
        while _alive_with_uids(uids) and time.monotonic() < deadline:
            time.sleep(0.05)  # forks racing the kill; bounded
        assert _alive_with_uids(uids) == []
        assert wait_gone([spawner], timeout=20) == [], "the stopped spawner must die too"
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        if spawner is not None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(spawner, sig)
                except ProcessLookupError:
                    break
