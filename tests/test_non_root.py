"""A supervisor that is not root names every layer it could not use, and
still confines what it can (user namespace, capabilities, seccomp)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged user")
def test_non_root_supervisor_names_the_layers_it_lacks(tmp_path) -> None:
    os.chmod(tmp_path, 0o777)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "agents_nonroot.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["euid"] == 65534
    assert out["containment"].startswith("process-group")
    missing = out["isolation"]["missing"]
    assert "not root" in missing["identity"] and "share the supervisor's uid" in missing["identity"]
    assert "proc-hidepid" in missing
    assert out["report_isolation"]["missing"] == missing, "every report names the missing layers"
    result = out["result"]
    assert result["uid"] == 65534
    assert int(result["caps"]["CapEff"], 16) == 0 and int(result["caps"]["CapBnd"], 16) == 0
    assert result["caps"]["NoNewPrivs"] == "1"
    if "seccomp" not in missing:
        assert result["caps"]["Seccomp"] == "2"
    assert "isolation='strict'" in out["strict"] and "identity" in out["strict"]
