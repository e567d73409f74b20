"""deadstop installs under one import namespace (deadstop.supervisor,
deadstop.worker, deadstop.ipc): it shares an environment with supervisord,
whose import name is `supervisor`, and with applications that have their
own `worker.py` or `ipc/`. Each check runs in a fresh interpreter outside
the source tree, as an application would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def _bin(name: str) -> str | None:
    return shutil.which(name, path=os.path.dirname(sys.executable))


def test_an_application_with_its_own_worker_and_ipc_runs_agents(workspace, tmp_path) -> None:
    app = tmp_path / "app"
    shutil.copytree(os.path.join(HERE, "app_with_own_modules"), app)
    for path in (app, app / "ipc"):
        os.chmod(path, 0o755)
    out = subprocess.run([sys.executable, str(app / "main.py"), str(workspace)], cwd=app, env=_clean_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["own"] == ["the application's worker", "the application's ipc"]
    assert got["result"] == {"doubled": 42, "mine": ["the application's worker", "the application's ipc"]}


@pytest.mark.skipif(_bin("supervisord") is None, reason="supervisord is not installed in this environment")
def test_supervisord_and_deadstop_share_an_environment(tmp_path) -> None:
    check = ("import supervisor.states, supervisor.supervisord; "
             "assert hasattr(supervisor.states, 'SupervisorStates'); "
             "from deadstop.supervisor import Supervisor, StopReport; "
             "from deadstop.supervisor.engine.states import LIVE; print('both')")
    both = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=_clean_env(), capture_output=True,
                          text=True, timeout=60)
    assert both.returncode == 0 and both.stdout.strip() == "both", both.stderr[-2000:]
    version = subprocess.run([_bin("supervisord"), "--version"], cwd=tmp_path, env=_clean_env(),
                             capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.strip()[0].isdigit(), version.stderr
    doctor = subprocess.run([_bin("deadstop"), "doctor", "--json"], cwd=tmp_path, env=_clean_env(),
                            capture_output=True, text=True, timeout=120)
    assert doctor.returncode == 0 and "isolation" in json.loads(doctor.stdout), doctor.stderr[-2000:]


def test_nothing_of_deadstop_is_installed_outside_its_namespace(tmp_path) -> None:
    """Uninstalling deadstop can remove nothing of another distribution's modules:
    its installed files (RECORD) are all below deadstop/ or its own metadata."""
    listing = ("import json; from importlib import metadata; "
               "print(json.dumps([str(f) for f in metadata.distribution('deadstop').files or []]))")
    out = subprocess.run([sys.executable, "-c", listing], cwd=tmp_path, env=_clean_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    files = json.loads(out.stdout)
    assert files, "deadstop is installed with a file list"
    def ours(path: str) -> bool:
        head, _, rest = path.partition("/")
        if head == "__pycache__":  # the editable install's finder, compiled
            head = rest
        return head == "deadstop" or head.startswith(("deadstop-", "__editable__"))

    stray = [f for f in files if not f.startswith("..") and not ours(f)]  # ../bin: the console script
    assert stray == [], f"files installed outside the deadstop namespace: {stray}"


def _modules_after(statement: str, tmp_path) -> set[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_clean_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout))


def test_the_spawner_loads_nothing_of_the_control_side(tmp_path) -> None:
    """Every module in the spawner is memory each run inherits and must unmap when it is killed:
    it pre-warms what every run needs (zmq, cloudpickle, the egress client), nothing of the control side."""
    loaded = _modules_after("import deadstop.worker.spawner", tmp_path)
    assert {"zmq", "cloudpickle", "deadstop.worker.egress"} <= loaded
    unwanted = {"deadstop.ipc.control", "zmq.auth", "zmq.asyncio", "asyncio", "deadstop.supervisor"}
    assert not loaded & unwanted, sorted(loaded & unwanted)


def test_a_control_client_pays_for_the_verb_table_only(tmp_path) -> None:
    """A CLI or console that only talks to a supervisor imports the verbs, not the engine."""
    loaded = _modules_after("import deadstop.ipc.control", tmp_path)
    assert "msgspec" in loaded
    heavy = {"zmq", "psutil", "cloudpickle", "multiprocess", "deadstop.supervisor", "deadstop.worker"}
    assert not loaded & heavy, sorted(loaded & heavy)
