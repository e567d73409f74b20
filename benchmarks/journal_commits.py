"""How long the journal's commits take under an egress flood: `.venv/bin/python benchmarks/journal_commits.py`.

A journal (a real SQLite file in a temporary directory) takes N batches of
egress rows, each committed with `commit_now`, as a revocation's commit
is on a loaded supervisor (the rows before it go in the same transaction).
Measured twice in the same run, on two fresh journals:

* deadstop's: the WAL checkpointed by the journal's own thread (store/checkpoint.py),
* SQLite's default, for comparison: the connection checkpoints inside whichever
  commit takes the WAL past 1,000 pages (wal_autocheckpoint=1000, the checkpointer stopped).

Printed: each commit's p50, p99 and max, the whole batch's time and the
mean per row. The tail is what a stop's first signal may wait for (G1: the
revocation is on record before it). `--runs 1000` interleaves 1,000 runs'
rows, as a busy fleet does: each commit then touches many index pages.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deadstop.supervisor.store.journal import Journal  # noqa: E402


def measure(own_checkpoints: bool, batches: int, rows: int, runs: int) -> tuple[list[float], float]:
    with tempfile.TemporaryDirectory(prefix="ds-bench-journal-") as d:
        journal = Journal(os.path.join(d, "journal.db"))
        loop = asyncio.new_event_loop()
        journal.bind(loop)  # rows wait for commit_now, as on the supervisor's loop
        if not own_checkpoints:
            journal._checkpointer.close()
            journal.db.execute("PRAGMA wal_autocheckpoint=1000")
        took: list[float] = []
        t_all = time.perf_counter()
        for b in range(batches):
            for i in range(rows):
                journal.egress(f"run{(b * rows + i) % runs:09d}", time.monotonic_ns(), i, "call", "noop", "dispatched")
            t0 = time.perf_counter()
            journal.commit_now()
            took.append((time.perf_counter() - t0) * 1e3)
        total = time.perf_counter() - t_all
        journal.close()
        loop.close()
    return took, total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=600)
    p.add_argument("--rows", type=int, default=500, help="egress rows per commit")
    p.add_argument("--runs", type=int, default=1, help="runs whose rows interleave (1,000: a busy fleet)")
    args = p.parse_args(argv)
    print(f"{args.batches} commits of {args.rows} egress rows each, from {args.runs} run(s) interleaved "
          f"(load average {os.getloadavg()[0]:.1f})")
    print(f"{'checkpoints':<34} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'all s':>7} {'us/row':>7}")
    for own, label in ((True, "journal's thread (deadstop)"), (False, "inside the commit (SQLite default)")):
        took, total = measure(own, args.batches, args.rows, args.runs)
        took.sort()
        print(f"{label:<34} {statistics.median(took):>8.2f} {took[int(len(took) * 0.99)]:>8.2f} {took[-1]:>8.2f} "
              f"{total:>7.2f} {total / (args.batches * args.rows) * 1e6:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
