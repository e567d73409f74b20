"""`deadstop bench`: the kill benchmark, or your own agent (--target / --argv), from any install.

    deadstop bench [kill] [--quick] [--trials N] [--json PATH] [--plot PATH] [--peers | --no-peers]
    deadstop bench --target MODULE:ATTR [--tool NAME[=MODULE:ATTR]] ... [--trials N] [--json PATH] [--plot PATH]
    deadstop bench --argv CMD ARG ...
    deadstop bench sessions|effects|daemon|scale [ARGS]     # benchmarks/ of a source checkout

Exit status: 0 done, 1 something survived its stop, 2 a usage error (an
unknown option, a --target that names nothing callable, --plot without matplotlib).
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

from .errors import UsageError

#: The benchmarks that still live only in a source checkout's benchmarks/, run as scripts.
SCRIPTS = {"sessions": "session_latency.py", "effects": "effects_latency.py", "daemon": "daemon_latency.py",
           "scale": "scale_latency.py"}
KILL_TRIALS, KILL_QUICK = 50, 10
AGENT_TRIALS, AGENT_QUICK = 20, 5


def build_parser(prog: str) -> argparse.ArgumentParser:
    from . import agent, kill
    from .report import arg_parser

    p = arg_parser(__doc__ or "", KILL_TRIALS, prog=prog)
    p.epilog = (f"trials: {KILL_TRIALS} per figure ({KILL_QUICK} with --quick) for the kill benchmark, "
                f"{AGENT_TRIALS} stops and as many kills ({AGENT_QUICK} with --quick) for your agent; "
                f"other benchmarks of a source checkout: {', '.join(sorted(SCRIPTS))}")
    p.add_argument("--plot", metavar="PATH", help="also draw a latency CDF per figure into PATH (needs matplotlib: "
                                                   "pip install 'deadstop[plot]')")
    kill.add_arguments(p)
    agent.add_arguments(p)
    return p


def run_script(which: str, argv: list[str]) -> int:
    """A benchmark of benchmarks/, as `python benchmarks/<script>` would run it."""
    from .report import source_root

    root = source_root()
    script = os.path.join(root, "benchmarks", SCRIPTS[which]) if root else None
    if script is None or not os.path.exists(script):
        raise UsageError(f"the {which} benchmark lives in benchmarks/ of a source checkout, which this install "
                         f"is not; `deadstop bench` (kill) and `deadstop bench --target` work anywhere")
    sys.argv = [script, *argv]
    sys.path.insert(0, root)  # type: ignore[arg-type]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def main(argv: list[str] | None = None, prog: str = "deadstop bench") -> int:
    from . import agent, kill
    from .report import trial_count

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SCRIPTS:
            return run_script(argv[0], argv[1:])
        if argv[:1] == ["kill"]:
            argv = argv[1:]
        parser = build_parser(prog)
        args = parser.parse_args(argv)
        if args.target and args.argv is not None:
            parser.error("--target and --argv name the agent two ways: give one")
        if args.target or args.argv is not None:
            args.default_trials = AGENT_TRIALS
            return agent.main(args, trial_count(args, AGENT_QUICK))
        for name in ("tool", "run_for", "cwd"):
            if getattr(args, name) is not None:
                parser.error(f"--{name.replace('_', '-')} is for your agent: give --target or --argv")
        return kill.main(args, trial_count(args, KILL_QUICK))
    except UsageError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
