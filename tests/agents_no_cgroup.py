"""A host application that cannot write any cgroup (test_no_cgroup_access.py
runs it with the cgroup2 filesystem read-only): the supervisor must fall back
to process groups + subreaper, say so, and still contain."""

from __future__ import annotations

import json
import sys

import behaviours
from waiting import Countdown
from deadstop.supervisor import ContainmentDegraded, Supervisor


def main(out_dir: str) -> None:
    result: dict = {}
    try:
        Supervisor(containment="cgroup").close()
        result["required_cgroup"] = "started"
    except ContainmentDegraded as exc:
        result["required_cgroup"] = f"refused: {exc}"
    ready = Countdown(2)

    with Supervisor() as sup:
        result["containment"] = sup.containment
        result["why"] = sup.core.containment_degraded_reason
        sup.register_tool("ready", ready)
        sup.register_tool("tick", lambda: None)
        # out_dir is the runs' cwd (mode 0777): the escaper writes its pid file there.
        runs = [sup.start(behaviours.tree, out_dir, 5, tools=["ready", "tick"], cwd=out_dir),
                sup.start(behaviours.setsid_escaper, out_dir, tools=["ready", "tick"], cwd=out_dir)]
        result["ready"] = ready.wait(60)
        result["run_ids"] = [r.id for r in runs]
        result["reports"] = [r.to_dict() for r in sup.stop_all(grace=0.3)]
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
