"""The command line: `deadstop demo` is the project's main job; it must pass
end to end on every containment layer this machine has."""

from __future__ import annotations

import subprocess
import sys


def test_demo_stops_every_misbehaving_run(layer) -> None:
    out = subprocess.run([sys.executable, "-m", "deadstop.supervisor", "demo", "--containment", layer, "--grace", "0.2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "result: every run is gone and nothing ran after stop" in out.stdout
    for name in ("sigterm-ignorer", "process-tree (40)", "setsid-escaper", "egress-flooder"):
        row = next(line for line in out.stdout.splitlines() if line.startswith(name))
        assert row.split()[-1] == "0", f"{name}: processes alive after stop"


def test_bad_usage_exits_2() -> None:
    out = subprocess.run([sys.executable, "-m", "deadstop.supervisor", "demo", "--bogus"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "unrecognized arguments" in out.stderr


def test_doctor_reports_every_isolation_layer() -> None:
    import json
    import os

    from deadstop.supervisor.mechanisms.isolation import LAYERS

    out = subprocess.run([sys.executable, "-m", "deadstop.supervisor", "doctor", "--json", "--strict"],
                         capture_output=True, text=True, timeout=120)
    profile = json.loads(out.stdout)["isolation"]
    assert set(profile["active"]) | set(profile["missing"]) == set(LAYERS)
    assert out.returncode == (1 if profile["missing"] else 0), out.stderr
    if os.geteuid() == 0:
        assert "identity" in profile["active"]
    text = subprocess.run([sys.executable, "-m", "deadstop.supervisor", "doctor"], capture_output=True, text=True,
                          timeout=120)
    assert text.returncode == 0 and all(name in text.stdout for name in LAYERS)


def test_version_usage_errors_and_a_closed_stdout() -> None:
    from importlib import metadata

    cli = [sys.executable, "-m", "deadstop.supervisor"]
    version = subprocess.run([*cli, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.strip() == f"deadstop {metadata.version('deadstop')}"
    bad = subprocess.run([*cli, "demo", "--grace", "-1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith("must be >= 0, not -1")
    assert "Traceback" not in bad.stderr
    # The reader goes away after the first line: the demo still ends cleanly, with nothing on stderr.
    demo = subprocess.Popen([*cli, "demo", "--grace", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert demo.stdout.readline().startswith(b"deadstop demo:")
    demo.stdout.close()
    _, err = demo.communicate(timeout=120)
    assert demo.returncode == 0, err.decode()
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
