"""`deadstop demo`: start misbehaving runs, stop them all, print the reports.

The "alive after" column is counted independently of the containment layer,
by reading /proc for each run's marker.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TextIO

from ...ipc import framing
from ...worker import demo_agents
from ..egress.tools import ToolContext
from .sync import Supervisor


def alive_with_marker(run_id: str) -> list[int]:
    """Live processes (not zombies) whose environment carries the run's marker, read from /proc:
    a count independent of the containment layer (the demo's "alive after", the bench's survivors)."""
    needle = f"{framing.ENV_MARKER}={run_id}".encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if stat[stat.rindex(b")") + 2:][:1] not in (b"Z", b"X"):
            found.append(int(pid))
    return found


def run_demo(out: TextIO, containment: str = "auto", grace: float = 0.5) -> int:
    """Returns 0 if every run ended with no survivor and no effect after revoke."""
    effects: list[tuple[str, int]] = []  # (run id, start time) of every tool call that ran
    ready = threading.Event()
    pending = {"n": len(demo_agents.AGENTS)}
    lock = threading.Lock()

    def on_ready() -> None:
        with lock:
            pending["n"] -= 1
            if pending["n"] == 0:
                ready.set()

    async def send_email(to: str, ctx: ToolContext) -> str:
        effects.append((ctx.run_id, time.monotonic_ns()))
        return f"sent to {to}"

    async def search(q: str, ctx: ToolContext) -> list[str]:
        effects.append((ctx.run_id, time.monotonic_ns()))
        return [q]

    with Supervisor(containment=containment, grace=grace) as sup:
        out.write(f"deadstop demo: supervisor {sup.id}, containment layer: {sup.containment}\n")
        out.write(f"isolation of each run: {sup.isolation}\n")
        if sup.core.containment_degraded_reason:
            out.write(f"  (weaker containment: {sup.core.containment_degraded_reason})\n")
        sup.register_tool("ready", on_ready)
        sup.register_tool("send_email", send_email)
        sup.register_tool("search", search)
        runs = {name: sup.start(agent, tools=["ready", "send_email", "search"])
                for name, agent in demo_agents.AGENTS.items()}
        if not ready.wait(60):
            out.write("runs did not become ready within 60 s\n")
            return 1
        before = {name: len(alive_with_marker(run.id)) for name, run in runs.items()}
        out.write(f"started {len(runs)} runs ({sum(before.values())} processes); stopping them all...\n\n")
        reports = dict(zip(runs, sup.stop_all()))
        after = {name: len(alive_with_marker(run.id)) for name, run in runs.items()}

    header = (f"{'run':<19}{'procs':>6}  {'ended by':<9}{'revoke us':>10}{'stop ms':>9}"
              f"{'refused':>9}{'cancel':>7}{'late fx':>8}{'alive after':>12}")
    out.write(header + "\n" + "-" * len(header) + "\n")
    ok = True
    for name, rep in reports.items():
        late = sum(1 for run_id, t in effects if run_id == rep.run_id and t > rep.revoked_at) + \
            len(rep.handlers_outlived_revoke)
        row_ok = after[name] == 0 and rep.survivors == 0 and late == 0
        ok = ok and row_ok
        stop_ms = (rep.reaped_at - rep.requested_at) / 1e6
        if rep.term_sent_at and rep.kill_sent_at:
            stop_ms_txt = f"{stop_ms:.1f}*"
        else:
            stop_ms_txt = f"{stop_ms:.1f}"
        out.write(f"{name:<19}{before[name]:>6}  {rep.ended_by:<9}{(rep.revoked_at - rep.requested_at) / 1e3:>10.0f}"
                  f"{stop_ms_txt:>9}{rep.refused_after_revoke:>9}{rep.handlers_cancelled:>7}{late:>8}"
                  f"{after[name]:>12}\n")
    out.write(f"\n* includes the {grace:.1f} s grace before SIGKILL (the run ignored SIGTERM)\n")
    out.write(f"containment: {next(iter(reports.values())).containment}; "
              f"late fx = tool calls that started after the run's revoke, or were still running\n"
              f"on a thread at it (must be 0)\n")
    out.write("result: " + ("every run is gone and nothing ran after stop\n" if ok else "FAILED\n"))
    return 0 if ok else 1
