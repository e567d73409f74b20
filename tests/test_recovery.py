"""G5, second half: a restarted supervisor ends what its dead predecessor left.

The host (agents_sessions_host.py) is a real separate process in its own
process group; SIGKILL to the whole group kills the supervisor and its
spawner at once, so neither can clean up. The run leaders die by their
parent-death signal; their children, grandchildren and a setsid escaper
live on. A new supervisor opened on the same state directory must find and
kill all of them, and bring the sessions back, idle, with the right record.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys

import limit_agents
from procscan import marked_processes, wait_gone
from deadstop.supervisor import Supervisor

HERE = os.path.dirname(os.path.abspath(__file__))


def _journal(path: str) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def test_restart_recovers_runs_left_by_a_sigkilled_supervisor(layer, tmp_path, workspace) -> None:
    state = tmp_path / "state"
    scratch = workspace  # the runs' cwd: the escaper writes its pid file there
    host = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "agents_sessions_host.py"), layer, str(state), str(scratch)],
        stdout=subprocess.PIPE, text=True, cwd=HERE, start_new_session=True,
        env={**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")})
    run_ids: list[str] = []
    try:
        line = host.stdout.readline()
        assert line, "the host supervisor did not report its sessions"
        info = json.loads(line)
        assert "error" not in info, info
        runs = info["runs"]
        run_ids = list(runs.values())
        tree_run, escaper_run = runs["tree-session"], runs["escaper-session"]
        assert len(marked_processes(tree_run)) == 11, "tree: leader, 5 children, 5 grandchildren"
        with open(scratch / "escaper.pid") as f:
            escaper_pid = int(f.read())
        assert marked_processes(escaper_run).get(escaper_pid) == escaper_run

        # Supervisor and spawner die in the same instant.
        os.killpg(host.pid, signal.SIGKILL)
        host.wait(timeout=30)
        gone_first = sorted(info["leaders"].values()) + [info["spawner"]]
        assert wait_gone(gone_first, timeout=20) == [], "run leaders outlived their spawner"

        # Otherwise this test would prove nothing: the spawner could not clean up.
        left = {run: marked_processes(run) for run in run_ids}
        assert len(left[tree_run]) == 10, f"the tree's children and grandchildren should survive: {left}"
        assert set(left[escaper_run]) == {escaper_pid}, f"the escaper should survive: {left}"
        survivors = sorted(pid for pids in left.values() for pid in pids)

        with Supervisor(state_dir=str(state), containment=layer) as sup:
            assert wait_gone(survivors, timeout=20) == [], "recovery left processes alive"
            for run in run_ids:
                assert marked_processes(run) == {}

            recovered = {r["run_id"]: r for r in sup.core.recovered}
            assert set(recovered) == set(run_ids), sup.core.recovered
            for key, run in runs.items():
                rec = recovered[run]
                assert rec["session"] == key
                assert rec["supervisor_id"] == info["supervisor_id"]
                assert set(left[run]) <= set(rec["found"]), (run, left[run], rec["found"])

            sessions = {s.key: s for s in sup.sessions()}
            assert set(sessions) == set(info["sessions"])
            for key in info["sessions"]:
                s = sessions[key]
                assert s.state == "idle"
                assert s.generation == info["generations"][key] == 1
                details = s.info()
                assert details["last_outcome"] == "ended by recovery", details
                assert details["aborted_last_run"] is True, details
                assert details["runs"] == [runs[key]], details

            db = _journal(sup.journal_path)
            try:
                for run in run_ids:
                    state_row = db.execute("SELECT state, ended_ns FROM runs WHERE id = ?", (run,)).fetchone()
                    assert state_row[0] == "killed" and state_row[1] is not None, state_row
                    rev = db.execute("SELECT source FROM revocations WHERE run_id = ?", (run,)).fetchone()
                    assert rev == ("restart",), rev
                    report = json.loads(db.execute("SELECT report FROM stops WHERE run_id = ?", (run,)).fetchone()[0])
                    assert report["revoke_source"] == "restart" and report["survivors"] == 0, report
                    assert set(left[run]) <= set(report["recovered_pids"]), report
                ended = db.execute("SELECT ended_wall FROM supervisors WHERE id = ?", (info["supervisor_id"],)).fetchone()
                assert ended[0] is not None, "the dead supervisor is still on record as running"
                if info["containment"] == "cgroup":  # the dead supervisor's cgroup subtree is gone too
                    for (path,) in db.execute("SELECT cgroup FROM runs WHERE id IN (?, ?)", tuple(run_ids)):
                        assert path and not os.path.exists(os.path.dirname(path)), path
            finally:
                db.close()

            # A recovered session is usable: a new message continues its generations.
            sup.register_tool("llm", lambda: None)
            sup.register_agent("tree", limit_agents.use_llm, tools=["llm"])
            again = sessions["tree-session"].send("again")
            assert again.result(30) == "AGAIN"
            assert again.generation == 2 and sessions["tree-session"].generation == 2

        # A second restart has nothing left to recover.
        with Supervisor(state_dir=str(state), containment=layer) as sup:
            assert sup.core.recovered == []
            sessions = {s.key: s for s in sup.sessions()}
            assert sessions["escaper-session"].info()["last_outcome"] == "ended by recovery"
            assert sessions["tree-session"].info()["last_outcome"] == "exited"
            assert sessions["tree-session"].generation == 2
    finally:
        if host.poll() is None:
            os.killpg(host.pid, signal.SIGKILL)
            host.wait()
        for run in run_ids:  # never leave a survivor to the next test
            for pid in marked_processes(run):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass


def test_sessions_survive_a_clean_restart(tmp_path) -> None:
    def llm(ctx) -> str:
        ctx.report_usage(prompt_tokens=40, completion_tokens=20)
        return "ok"

    with Supervisor(state_dir=str(tmp_path)) as sup:
        sup.register_tool("llm", llm)
        sup.register_agent("shouter", limit_agents.use_llm, tools=["llm"])
        s = sup.session("chat", agent="shouter")
        first = s.send("hello")
        assert first.result(30) == "HELLO"
        first.wait(30)
        assert s.generation == 1
        before = s.usage
        assert before.tool_calls == 1 and before.tokens == 60, before
        assert sup.core.recovered == []

    with Supervisor(state_dir=str(tmp_path)) as sup:
        assert sup.core.recovered == [], "a cleanly closed supervisor left nothing to recover"
        sessions = {x.key: x for x in sup.sessions()}
        assert set(sessions) == {"chat"}
        s = sessions["chat"]
        assert s.state == "idle" and s.agent == "shouter"
        assert s.generation == 1
        assert s.answer == "HELLO"
        after = s.usage
        assert (after.tool_calls, after.tokens) == (1, 60), after
        assert after.wall_clock == before.wall_clock
        details = s.info()
        assert details["last_outcome"] == "exited" and details["aborted_last_run"] is False, details
        assert details["runs"] == [first.id]

        sup.register_tool("llm", llm)
        sup.register_agent("shouter", limit_agents.use_llm, tools=["llm"])
        second = s.send("again")
        assert second.generation == 2
        assert second.result(30) == "AGAIN"
        second.wait(30)
        assert s.generation == 2 and s.answer == "AGAIN"
        assert (s.usage.tool_calls, s.usage.tokens) == (2, 120), s.usage
        assert s.info()["runs"] == [first.id, second.id]


def test_journaled_start_time_is_the_one_recovery_compares_with(tmp_path) -> None:
    """The spawner computes a run's start time itself (not with psutil, whose objects would dirty the
    run's pages); recovery tells a leftover from a recycled pid by comparing it with psutil's, within
    0.05 s. Checked against psutil here for runs of both kinds, while they live."""
    import psutil

    state = str(tmp_path / "state")
    seen = {}
    with Supervisor(state_dir=state) as sup:
        runs = [sup.start(limit_agents.sleep_forever, "x"), sup.start(["sleep", "600"])]
        for run in runs:
            seen[run.id] = psutil.Process(run.pid).create_time()
        for run in runs:
            run.kill()
    db = _journal(os.path.join(state, "journal.db"))
    for run_id, expected in seen.items():
        (got,) = db.execute("SELECT pid_create_time FROM runs WHERE id = ?", (run_id,)).fetchone()
        assert abs(got - expected) < 0.05, (run_id, got, expected)
