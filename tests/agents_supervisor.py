"""A host application that starts misbehaving runs, reports them on stdout,
and then waits to be killed. Used by test_supervisor_death.py."""

from __future__ import annotations

import json
import sys
import threading

import behaviours
from waiting import Countdown
from deadstop.supervisor import Supervisor


def main(layer: str, out_dir: str) -> None:
    sup = Supervisor(containment=layer)
    ready = Countdown(3)

    sup.register_tool("ready", ready)
    sup.register_tool("tick", lambda: None)
    sup.register_tool("send", lambda: None)
    # out_dir is the runs' cwd (mode 0777): the escaper writes its pid file there.
    runs = [sup.start(behaviours.tree, out_dir, 5, tools=["ready", "tick"], cwd=out_dir),
            sup.start(behaviours.setsid_escaper, out_dir, tools=["ready", "tick"], cwd=out_dir),
            sup.start(behaviours.ignore_term, out_dir, tools=["ready", "tick"], cwd=out_dir)]
    ready.wait(60)
    print(json.dumps({"runs": [r.id for r in runs], "spawner": sup.core.spawner.pid,
                      "containment": sup.containment}), flush=True)
    threading.Event().wait()  # until SIGKILL


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
