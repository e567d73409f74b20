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

from procscan import marked_processes, wait_gone


def test_runs_die_with_a_sigkilled_supervisor(layer, tmp_path) -> None:
    here = os.path.dirname(__file__)
    host = subprocess.Popen([sys.executable, os.path.join(here, "agents_supervisor.py"), layer, str(tmp_path)],
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
