"""A host application with two sessions whose runs leave processes behind when
their supervisor and spawner die together. Used by test_recovery.py.

argv: containment layer, state dir, scratch dir. Prints one JSON line once
both runs are fully set up, then blocks until killed.
"""

from __future__ import annotations

import json
import os
import sys
import threading

import limit_agents
from deadstop.supervisor import Supervisor
from waiting import Countdown

TREE, ESCAPER = "tree-session", "escaper-session"


def main(layer: str, state_dir: str, out_dir: str) -> None:
    sup = Supervisor(state_dir=state_dir, containment=layer)
    ready = Countdown(2)
    sup.register_tool("ready", ready)
    sup.register_tool("tick", lambda: None)
    # out_dir is the runs' cwd (mode 0777): the escaper writes its pid file there.
    sup.register_agent("tree", limit_agents.tree_session, tools=["ready", "tick"], cwd=out_dir)
    sup.register_agent("escaper", limit_agents.escaper_session, tools=["ready", "tick"], cwd=out_dir)
    tree = sup.session(TREE, agent="tree")
    escaper = sup.session(ESCAPER, agent="escaper")
    runs = {TREE: tree.send(out_dir), ESCAPER: escaper.send(out_dir)}
    if not ready.wait(60):
        print(json.dumps({"error": "runs never became ready"}), flush=True)
        sys.exit(1)
    print(json.dumps({
        "sessions": [TREE, ESCAPER],
        "runs": {key: run.id for key, run in runs.items()},
        "leaders": {key: run.pid for key, run in runs.items()},
        "generations": {TREE: tree.generation, ESCAPER: escaper.generation},
        "spawner": sup.core.spawner.pid,
        "supervisor": os.getpid(),
        "supervisor_id": sup.id,
        "containment": sup.containment,
    }), flush=True)
    threading.Event().wait()  # until SIGKILL


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
