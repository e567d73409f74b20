"""The `deadstop` command line.

Exit codes (one table for every verb):
  0  success
  1  the verb ran and found a failure (a run survived in the demo; a layer
     is missing under `doctor --strict`)
  2  bad usage
  3  deadstop error (containment unavailable, supervisor failed to start)
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ERROR = 0, 1, 2, 3
BENCHMARKS = {"kill": "kill_latency.py", "sessions": "session_latency.py"}


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(sys.stdout, containment=args.containment, grace=args.grace)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import run_doctor

    return run_doctor(sys.stdout, as_json=args.json, strict=args.strict)


def _cmd_bench(args: argparse.Namespace) -> int:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(here, "benchmarks", BENCHMARKS[args.which])
    if not os.path.exists(script):
        print("deadstop bench: benchmarks/ is not installed with the package; "
              "run it from a source checkout", file=sys.stderr)
        return EXIT_USAGE
    sys.argv = [script, *args.rest]
    sys.path.insert(0, here)
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    return EXIT_OK


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value:g}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__

    parser = argparse.ArgumentParser(prog="deadstop", description="Process-isolated agent runs whose stop really stops.")
    parser.add_argument("--version", action="version", version=f"deadstop {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True)
    demo = sub.add_parser("demo", help="start misbehaving runs, stop them, print their stop reports")
    demo.add_argument("--containment", choices=["auto", "cgroup", "process-group"], default="auto")
    demo.add_argument("--grace", type=_non_negative, default=0.5, help="seconds between SIGTERM and SIGKILL")
    demo.set_defaults(func=_cmd_demo)
    doctor = sub.add_parser("doctor", help="which isolation and containment layers runs get on this host, "
                                           "and why any is missing")
    doctor.add_argument("--json", action="store_true", help="print the profile as JSON")
    doctor.add_argument("--strict", action="store_true", help="exit 1 if any isolation layer is missing")
    doctor.set_defaults(func=_cmd_doctor)
    bench = sub.add_parser("bench", help="run a benchmark from benchmarks/ (source checkout only); "
                                         "other arguments (--quick, --json PATH, ...) go to the benchmark")
    bench.add_argument("which", nargs="?", choices=sorted(BENCHMARKS), default="kill")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.verb != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    from ..errors import DeadstopError

    try:
        return int(args.func(args))
    except DeadstopError as exc:
        print(f"deadstop {args.verb}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # `deadstop demo | head`: the reader is gone, which is not an error of ours.
        # Point stdout at /dev/null so the interpreter's final flush is quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
