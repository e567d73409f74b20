"""A host application for test_leftovers.py.

argv: containment layer, cgroup to join first ("-" for none), scratch dir, mode.

  tree    start one run (a tree of 3 children, each with a grandchild), print
          one JSON line describing the supervisor once the run is set up,
          then wait: SIGKILL leaves everything behind; EOF on stdin stops the
          run, prints its stop report's survivors and closes cleanly.
  idle    the same without a run.
  sweep   open a supervisor, print what it removed at open, close, exit.

Joining a test-private cgroup (and using a test-private XDG_RUNTIME_DIR, set
by the test) keeps other supervisors on the machine from sweeping these
leftovers before the test has looked at them.
"""

from __future__ import annotations

import json
import os
import sys

import behaviours
from waiting import Countdown
from deadstop.supervisor import Supervisor


def main(layer: str, cgroup: str, out_dir: str, mode: str) -> None:
    if cgroup != "-":
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write("0")
    sup = Supervisor(containment=layer)
    core = sup.core
    info = {"pid": os.getpid(), "id": sup.id, "runtime_dir": core.runtime_dir,
            "cgroup": core.cgroups.root.path if core.cgroups else None, "spawner": core.spawner.pid,
            "v1": sorted(core.host.v1.roots.values()),
            "removed": core.leftovers_removed, "runs": [], "leaders": []}
    if mode == "sweep":
        sup.close()
        print(json.dumps(info), flush=True)
        return
    run = None
    if mode == "tree":
        ready = Countdown(1)
        sup.register_tool("ready", ready)
        sup.register_tool("tick", lambda: None)
        # The test's process scan recognises the suite's runs by this variable;
        # pass it explicitly, since an isolated run starts from a clean environment.
        session = {k: v for k, v in os.environ.items() if k == "DEADSTOP_TEST_SESSION"}
        run = sup.start(behaviours.tree, out_dir, 3, tools=["ready", "tick"], env=session)
        if not ready.wait(60):
            print(json.dumps({"error": "run never became ready"}), flush=True)
            sys.exit(1)
        info["runs"], info["leaders"] = [run.id], [run.pid]
    print(json.dumps(info), flush=True)
    sys.stdin.read()  # until EOF (or SIGKILL)
    result = {}
    if run is not None:
        report = run.stop()
        result = {"outcome": report.outcome, "survivors": report.survivors}
    sup.close()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
