"""How fast deadstop revokes, stops and starts runs, against floors measured in the same run.

    python benchmarks/kill_latency.py            # 50 trials per figure, ~2-3 minutes
    python benchmarks/kill_latency.py --quick    # 10 trials, smoke run
    python benchmarks/kill_latency.py --json out.json --plot out.png

The same as `deadstop bench kill` (see deadstop.supervisor.bench.kill, where the
benchmark lives, so that an installed wheel has it too). The other scripts here
take the harness's common pieces from this module's names below.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deadstop.supervisor.bench.report import arg_parser, log, run, trial_count  # noqa: E402,F401  (used by the others)
from deadstop.supervisor.bench.stats import MS  # noqa: E402,F401


def main(argv: list[str] | None = None) -> int:
    from deadstop.supervisor.bench.command import main as bench

    return bench(["kill", *(sys.argv[1:] if argv is None else argv)], prog="kill_latency.py")


if __name__ == "__main__":
    sys.exit(main())
