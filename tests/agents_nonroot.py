"""Run a supervisor as an unprivileged user and print what it reports (JSON).

Started as root by tests/test_non_root.py: this process first gives itself a
mount namespace in which the interpreter, the project and the test's
directory are reachable by the unprivileged uid (on many hosts they live
under root's 0700 home), drops to that uid with setpriv's semantics (no
groups, no capabilities), then opens a Supervisor as that user would.
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

from deadstop.supervisor.mechanisms import isolation as iso  # noqa: E402
from deadstop.worker import platform, sandbox  # noqa: E402

UID = 65534


def become_unprivileged(work: str) -> None:
    planner = iso.MountPlanner(UID, UID)
    for path in sorted(set(iso.interpreter_paths() + [HERE, os.path.dirname(HERE)]), key=lambda p: p.count("/")):
        planner.expose(path)
    planner.expose(work, writable=True)
    platform.unshare(platform.CLONE_NEWNS)
    sandbox._mounts({"namespaces": ["mount"], "mounts": planner.ops})
    os.setgroups([])
    os.setresgid(UID, UID, UID)
    os.setresuid(UID, UID, UID)


def target() -> dict:
    with open("/proc/self/status") as f:
        caps = {line.split(":")[0]: line.split()[1] for line in f if line.startswith(("Cap", "NoNewPrivs", "Seccomp"))}
    return {"uid": os.getuid(), "caps": caps, "cwd": os.getcwd()}


def main(work: str) -> None:
    become_unprivileged(work)
    os.chdir(work)
    os.environ.pop("XDG_RUNTIME_DIR", None)
    from deadstop.supervisor import Supervisor
    from deadstop.supervisor.errors import ContainmentDegraded

    out: dict = {"euid": os.geteuid()}
    with Supervisor(state_dir=os.path.join(work, "state")) as sup:
        out["containment"] = sup.containment
        out["isolation"] = sup.isolation.to_dict()
        run = sup.start(target, cwd=work)
        out["result"] = run.result(timeout=30)
        out["report_isolation"] = run.wait(10).report.isolation
    try:
        with Supervisor(state_dir=os.path.join(work, "state2"), isolation="strict"):
            out["strict"] = "opened"
    except ContainmentDegraded as exc:
        out["strict"] = str(exc)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
