"""Where cgroups are not writable, the weaker layers take over, the report
names them, and nothing escapes.

The host supervisor runs in a private mount namespace in which the cgroup2
filesystem is remounted read-only: the real kernel refuses the mkdir, exactly
as on a machine without a delegated cgroup.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from procscan import marked_processes
from deadstop.supervisor.mechanisms.cgroups import find_cgroup2_mount

MOUNT = find_cgroup2_mount()
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or MOUNT is None,
    reason="needs root, unshare(1) and a cgroup2 mount to make cgroups read-only")


def test_supervisor_without_cgroup_access_falls_back_and_still_contains(workspace) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(here, "agents_no_cgroup.py")
    env = {**os.environ, "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", "")}
    shell = f'mount -o remount,bind,ro "{MOUNT[0]}" && exec "{sys.executable}" "{script}" "{workspace}"'
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", shell],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["required_cgroup"].startswith("refused: cgroup containment required but unavailable")
    assert "Read-only file system" in result["required_cgroup"]
    assert result["containment"] == "process-group+subreaper"
    assert "Read-only file system" in result["why"]
    assert result["ready"] is True
    tree, escaper = result["reports"]
    assert all(r["containment"] == "process-group+subreaper" and r["survivors"] == 0 for r in result["reports"])
    assert tree["ended_by"] == "sigterm"
    assert escaper["ended_by"] == "swept" and escaper["swept"] == 1
    for run_id in result["run_ids"]:
        assert marked_processes(run_id) == {}
