"""The adversarial matrix: (misbehaving run) x (stop, kill) x (containment layer).

Each case asserts, independently of the code under test where it can:
* no process of the run is left (a /proc scan for the run's marker);
* no tool handler started after `revoked_at` (handlers stamp themselves);
* no commit gate passed after `revoked_at`;
* nothing was written after stop returned;
* the journal alone shows no dispatch after the revocation;
* how the stop ended (`ended_by`) is what the layer should need.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time

import pytest

import behaviours
from procscan import marked_processes
from deadstop.supervisor import Supervisor

GRACE = 0.5

# (behaviour, verb, layer) -> ended_by; layer "*" applies to both.
EXPECTED_ENDED_BY = {
    ("busy", "stop"): "sigterm",
    ("ignore_term", "stop"): "sigkill",
    ("tree", "stop"): "sigterm",
    ("gil_holder", "stop"): "sigkill",
    ("flooder", "stop"): "sigterm",
    ("writer", "stop"): "sigterm",
}


def expected_ended_by(behaviour: str, verb: str, layer: str) -> str:
    if behaviour == "setsid_escaper":
        # The escaper left the process group: a cgroup still holds it (it
        # ignores SIGTERM, so SIGKILL ends it); the process-group layer cannot
        # reach it at all, so the marker sweep has to.
        return "sigkill" if layer == "cgroup" else "swept"
    if verb == "kill":
        return "sigkill"
    return EXPECTED_ENDED_BY[(behaviour, verb)]


class Recorder:
    """Tools that stamp their own start (async: ordered with revoke on the loop)
    and a sync tool whose commit gate stamps the commit."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.tick_starts: list[int] = []
        self.commits: list[int] = []

    def register(self, sup: Supervisor) -> None:
        async def tick() -> None:
            self.tick_starts.append(time.monotonic_ns())

        def send(ctx) -> str:
            self.commits.append(ctx.check())
            return "sent"

        def ready() -> None:
            self.ready.set()

        sup.register_tool("tick", tick)
        sup.register_tool("send", send)
        sup.register_tool("ready", ready)

    TOOLS = ["tick", "send", "ready"]


def journal_dispatches_after_revoke(path: str, run_id: str) -> int:
    db = sqlite3.connect(path)
    try:
        (n,) = db.execute(
            "SELECT count(*) FROM egress e JOIN revocations r USING (run_id)"
            " WHERE e.run_id = ? AND e.decision = 'dispatched' AND e.t_ns > r.t_ns", (run_id,)).fetchone()
        (revoked,) = db.execute("SELECT count(*) FROM revocations WHERE run_id = ?", (run_id,)).fetchone()
        assert revoked == 1, "the revocation must be in the journal"
        return n
    finally:
        db.close()


@pytest.mark.parametrize("verb", ["stop", "kill"])
@pytest.mark.parametrize("behaviour", list(behaviours.BEHAVIOURS))
def test_stop_matrix(behaviour: str, verb: str, layer: str, tmp_path, workspace) -> None:
    rec = Recorder()
    out = str(workspace)  # the run's cwd: its evidence files are written there
    with Supervisor(containment=layer, state_dir=str(tmp_path)) as sup:
        rec.register(sup)
        run = sup.start(behaviours.BEHAVIOURS[behaviour], out, tools=Recorder.TOOLS, grace=GRACE, cwd=out)
        assert rec.ready.wait(30), f"{behaviour} never became ready"
        assert marked_processes(run.id), "the run's processes must be visible to the independent scan"

        report = getattr(run, verb)()
        returned_at = time.monotonic_ns()

        assert report.survivors == 0
        assert marked_processes(run.id) == {}, "a process of the run outlived stop()"
        assert report.containment == layer if layer == "cgroup" else report.containment.startswith("process-group")
        assert report.ended_by == expected_ended_by(behaviour, verb, layer)
        assert report.outcome == ("stopped" if verb == "stop" else "killed")
        assert run.state.value == report.outcome
        assert report.requested_at <= report.revoked_at
        signals = [t for t in (report.term_sent_at, report.kill_sent_at) if t is not None]
        assert signals and report.revoked_at < min(signals), "revoke must precede the first signal"
        assert report.revoked_at < report.reaped_at <= returned_at
        if verb == "kill":
            assert report.term_sent_at is None
        assert all(t < report.revoked_at for t in rec.tick_starts), "a tool handler started after revoke"
        assert all(t < report.revoked_at for t in rec.commits), "a commit gate passed after revoke"
        assert journal_dispatches_after_revoke(sup.journal_path, run.id) == 0

        if behaviour == "writer":
            path = os.path.join(out, "writes.log")
            size = os.path.getsize(path)
            stamps = [int(line.split()[1]) for line in open(path) if line.strip()]
            assert {line.split()[0] for line in open(path) if line.strip()} == {"leader", "child"}
            assert stamps and max(stamps) < returned_at, "a line was written after stop returned"
            # Anything still alive would keep appending; give it time to show itself.
            time.sleep(0.2)
            assert os.path.getsize(path) == size
        if behaviour == "setsid_escaper":
            escaper = int(open(os.path.join(out, "escaper.pid")).read())
            assert not os.path.exists(f"/proc/{escaper}") or "Z" in open(f"/proc/{escaper}/stat").read().split(")")[1][:3]
