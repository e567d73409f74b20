"""What every benchmark does around its measurements: the log, the host, the leftover check,
the table and its summary on stdout, --json and --plot.

A benchmark hands `run` a function that measures (given the ready channel) and returns its
rows, or a `Measured` with more: lines printed under the table, keys for the JSON, the CDFs
for --plot, and whether something failed (a survivor), which makes the exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Union

from .procs import ReadyChannel, kill_descendants, kill_registry_survivors, registry_survivors
from .stats import Row, format_table, format_value

#: A figure for --plot: a title and its curves, each a label and latency samples in ns.
Figure = tuple[str, list[tuple[str, list[int]]]]


@dataclasses.dataclass
class Measured:
    rows: list[Row]
    cgroup_error: str = ""
    lines: list[str] = dataclasses.field(default_factory=list)  # printed under the table
    json: dict[str, Any] = dataclasses.field(default_factory=dict)  # merged into the --json document
    figures: list[Figure] = dataclasses.field(default_factory=list)
    failed: bool = False


Measure = Callable[[ReadyChannel], Union[Measured, "tuple[list[Row], str]"]]

_T0 = time.monotonic()


def log(msg: str) -> None:
    """Progress on stderr, so stdout carries only the report."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def leftover_check() -> str:
    """Kill and name anything this benchmark started that is still alive."""
    survivors = registry_survivors()
    killed = kill_registry_survivors() if survivors else []
    descendants = kill_descendants()
    if not killed and not descendants:
        return "leftover processes: none (every announced process and every descendant checked)"
    return f"leftover processes KILLED at exit: announced {killed}, descendants {descendants}"


def source_root() -> str | None:
    """The git checkout the measured library is imported from, None for an installed package."""
    from ... import supervisor

    root = os.path.dirname(os.path.dirname(os.path.realpath(supervisor.__file__)))
    return root if os.path.exists(os.path.join(root, ".git")) else None


def library_version() -> str:
    """The commit measured, flagged if the library's sources differ from it; the version if installed."""
    import subprocess

    from .._version import __version__

    root = source_root()
    if root is None:
        return f"{__version__} (installed)"
    try:
        rev = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "supervisor", "worker", "ipc"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"{__version__} (source tree, git unavailable)"
    return rev + (" + uncommitted changes" if dirty else "")


def loadavg() -> str:
    """1-minute load average: other work on this host competes with every figure."""
    try:
        with open("/proc/loadavg") as fh:
            return fh.read().split()[0]
    except OSError:
        return "?"


def summary(rows: list[Row]) -> str:
    misses = [f"  MISS  {r.section} / {r.name}: p50 {format_value(r.value_p50, r.unit)}"
              f" vs limit {format_value(r.limit, r.unit)} ({r.target})"
              for r in rows if r.verdict == "MISS"]
    passes = sum(1 for r in rows if r.verdict == "PASS")
    return "\n".join([f"{passes} targets met, {len(misses)} missed", *misses])


def arg_parser(doc: str, default_trials: int, prog: str | None = None) -> argparse.ArgumentParser:
    """The options every benchmark takes; each adds its own after them."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    p.add_argument("--trials", type=int, default=None, help=f"trials per figure (default {default_trials})")
    p.add_argument("--quick", action="store_true", help="fewer trials (10, unless --trials says): a smoke run")
    p.add_argument("--json", metavar="PATH", help="also write every row (with raw samples) as JSON")
    p.set_defaults(default_trials=default_trials)
    return p


def trial_count(args: argparse.Namespace, quick: int = 10) -> int:
    """--trials if given, else `quick` with --quick, else the benchmark's default."""
    trials = args.trials if args.trials is not None else quick if args.quick else args.default_trials
    if trials < 1:
        raise SystemExit("--trials must be >= 1")
    return int(trials)


def host() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}


def run(cfg: Any, json_path: str | None, measure: Measure, plot_path: str | None = None) -> int:
    """Log the host, `measure(chan)`, the leftover check even if that fails, the report on stdout,
    then --json and --plot. Returns 1 if the measurement says it failed, else 0."""
    if plot_path:
        from . import plot

        plot.require()  # before minutes of measuring, not after
    log(f"{cfg.trials} trials per figure on {os.cpu_count()} CPUs, Linux {platform.release()}")
    load_before = loadavg()
    version = library_version()
    log(f"deadstop at commit {version}")
    chan = ReadyChannel()
    try:
        got = measure(chan)
    finally:
        chan.close()
        leftovers = leftover_check()
    res = got if isinstance(got, Measured) else Measured(rows=got[0], cgroup_error=got[1])
    print(format_table(res.rows))
    print()
    for line in res.lines:
        print(line)
    print(summary(res.rows))
    print(leftovers)
    print(f"deadstop {version}; host: {os.cpu_count()} CPUs, Linux {platform.release()}, "
          f"load average (1 min) {load_before} at start, {loadavg()} at end")
    if json_path:
        doc = {"config": dataclasses.asdict(cfg), "host": {**host(), "loadavg_start": load_before,
               "loadavg_end": loadavg()}, "deadstop_commit": version, "cgroup_floor_error": res.cgroup_error,
               "leftovers": leftovers, **res.json, "rows": [r.to_dict() for r in res.rows]}
        with open(json_path, "w") as fh:
            json.dump(doc, fh, indent=1)
        log(f"wrote {json_path}")
    if plot_path:
        from . import plot

        plot.write(plot_path, res.figures or plot.figures_from_rows(res.rows))
        log(f"wrote {plot_path}")
    log("done")
    return 1 if res.failed else 0
