"""What a daemon costs at rest: `.venv/bin/python benchmarks/daemon_idle.py [--sessions 1000] [--seconds 10]`.

A real `deadstop serve` with its web console on (the console follows the
lifecycle stream, so `run.sample` events are taken under their budget),
N sessions whose runs sit idle (isolation on), then:

* the daemon process's CPU over `--seconds`, as a share of one core (target <= 5 %),
* its RSS (target <= 150 MB),
* one `sessions.stop_all` of every session through the RPC, until every
  report is in hand, with the survivors the reports count.

The sessions are started one after another; starting them is not what is measured.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

import psutil

# The daemon fixture and its agents are the tests' own.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from daemonctl import Daemon, Ready  # noqa: E402

CONFIG = """
[defaults]
grace = 0.5

[agents.idle]
target = "daemon_agents:idle"
cwd = "{work}"
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = pathlib.Path(tmp_name)
        os.chmod(tmp, 0o755)  # runs have uids of their own: they reach the readiness FIFO below
        work = tmp / "work"
        work.mkdir()
        os.chmod(work, 0o777)
        daemon = Daemon(tmp, CONFIG, work).start("--console", "127.0.0.1:0")
        ready = Ready(tmp)
        try:
            with daemon.client(timeout=600) as c:
                for i in range(args.sessions):
                    c.send(f"idle-{i}", {"ready": ready.path}, agent="idle")
                ready.wait(args.sessions, timeout=600)
                time.sleep(2.0)  # the last starts' own work is over
                proc = psutil.Process(daemon.proc.pid)
                before, t0 = proc.cpu_times(), time.monotonic()
                time.sleep(args.seconds)
                after, took = proc.cpu_times(), time.monotonic() - t0
                share = (after.user + after.system - before.user - before.system) / took * 100
                rss = proc.memory_info().rss
                t0 = time.monotonic()
                reply = c.stop_all()
                stopped = time.monotonic() - t0
        finally:
            ready.close()
            code = daemon.stop()
    survivors = sum(r["survivors"] for r in reply.reports)
    print(f"{args.sessions} idle sessions, console on:")
    print(f"  daemon CPU at rest   {share:5.1f} % of a core   (target <= 5 %: {'pass' if share <= 5 else 'MISS'})")
    print(f"  daemon RSS           {rss / 2**20:5.0f} MiB        (target <= 150 MB: {'pass' if rss <= 150e6 else 'MISS'})")
    print(f"  sessions.stop_all    {stopped:5.2f} s of {len(reply.reports)} runs, {survivors} survivor(s)")
    print(f"  daemon exit status   {code}")
    return 1 if survivors or code else 0


if __name__ == "__main__":
    sys.exit(main())
