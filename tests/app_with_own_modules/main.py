"""An application that has its own `worker` and `ipc` beside its script and uses deadstop."""

import json
import sys

import ipc
import worker
from deadstop.supervisor import Supervisor

with Supervisor() as sup:
    sup.register_tool("double", lambda n: 2 * n)
    value = sup.start(worker.agent, 21, tools=["double"], cwd=sys.argv[1]).result(timeout=60)
print(json.dumps({"result": value, "own": [worker.ROLE, ipc.ROLE]}))
