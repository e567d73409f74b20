"""A host application whose runs fork and escape; it reports them, then waits to be killed.

Used by test_supervisor_death.py to SIGSTOP the spawner and SIGKILL this
process: the watchdog must still end every run.
"""

from __future__ import annotations

import json
import os
import sys

import hostile_agents
from waiting import Countdown
from deadstop.supervisor import Supervisor


def main(layer: str, work: str) -> None:
    sup = Supervisor(containment=layer)
    ready = Countdown(2)
    sup.register_tool("ready", ready)
    dirs = []
    for name in ("a", "b"):  # each run its own workspace: their files are their own uid's
        path = os.path.join(work, name)
        os.mkdir(path)
        os.chmod(path, 0o777)
        dirs.append(path)
    runs = [sup.start(hostile_agents.cgroup_escaper, [], tools=["ready"], cwd=dirs[0]),
            sup.start(hostile_agents.group_escaper, tools=["ready"], cwd=dirs[1])]
    ready.wait(60)
    print(json.dumps({"leaders": [r.pid for r in runs], "spawner": sup.core.spawner.pid}), flush=True)
    import threading

    threading.Event().wait()  # until SIGKILL


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
