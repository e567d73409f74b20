"""cleanup(older_than=...) removes ended, idle, old-enough sessions with every
record of their runs, and nothing else; sessions(active=, min_tokens=) filter.

Real runs throughout; the journal is read with a separate SQLite connection.
"""

from __future__ import annotations

import sqlite3
import time

import pytest

import limit_agents
from procscan import marked_processes
from deadstop.supervisor import InvalidTarget, Supervisor
from waiting import Countdown

BOUND = 30.0
RUN_TABLES = (("runs", "id"), ("egress", "run_id"), ("stops", "run_id"), ("transitions", "run_id"),
              ("revocations", "run_id"))


def _llm(amount: int, ctx) -> str:
    ctx.report_usage(prompt_tokens=amount)
    return "ok"


def _rows(journal_path: str, run_ids: list[str], session_keys: list[str]) -> dict[str, int]:
    """How many rows the journal holds for these runs and sessions, per table."""
    db = sqlite3.connect(f"file:{journal_path}?mode=ro", uri=True)
    try:
        counts = {}
        marks = ",".join("?" * len(run_ids))
        for table, column in RUN_TABLES:
            counts[table] = db.execute(f"SELECT COUNT(*) FROM {table} WHERE {column} IN ({marks})",
                                       run_ids).fetchone()[0]
        kmarks = ",".join("?" * len(session_keys))
        for table, column in (("sessions", "key"), ("messages", "session")):
            counts[table] = db.execute(f"SELECT COUNT(*) FROM {table} WHERE {column} IN ({kmarks})",
                                       session_keys).fetchone()[0]
        return counts
    finally:
        db.close()


def _keys(sessions) -> set[str]:
    return {s.key for s in sessions}


def test_cleanup_removes_only_old_idle_sessions_and_their_records(tmp_path) -> None:
    ready = Countdown(1)
    with Supervisor(state_dir=str(tmp_path)) as sup:
        sup.register_tool("llm", _llm)
        sup.register_tool("ready", ready)
        sup.register_agent("once", limit_agents.report_tokens, tools=["llm"])
        sup.register_agent("stays", limit_agents.report_tokens_then_sleep, tools=["llm", "ready"])

        a = sup.session("A", agent="once")
        run_a = a.send({"tokens": 50})
        assert run_a.result(BOUND) == 50
        run_a.wait(BOUND)
        mark = time.time()  # A changed last before this instant; B and C after it

        b = sup.session("B", agent="stays")
        run_b = b.send({"tokens": 150})
        assert ready.wait(BOUND)
        c = sup.session("C", agent="once")
        run_c = c.send({"tokens": 200})
        assert run_c.result(BOUND) == 200
        run_c.wait(BOUND)
        assert (a.state, b.state, c.state) == ("idle", "running", "idle")

        # Filters: activity, tokens (live tokens of a running session count).
        assert _keys(sup.sessions()) == {"A", "B", "C"}
        assert _keys(sup.sessions(active=True)) == {"B"}
        assert _keys(sup.sessions(active=False)) == {"A", "C"}
        assert _keys(sup.sessions(min_tokens=100)) == {"B", "C"}
        assert _keys(sup.sessions(min_tokens=50)) == {"A", "B", "C"}
        assert _keys(sup.sessions(min_tokens=201)) == set()
        assert _keys(sup.sessions(active=False, min_tokens=100)) == {"C"}
        assert _keys(sup.sessions(active=True, min_tokens=100)) == {"B"}

        before_a = _rows(sup.journal_path, [run_a.id], ["A"])
        assert all(before_a[t] > 0 for t in ("runs", "egress", "stops", "transitions", "sessions", "messages")), before_a

        # Everything changed recently: a large older_than removes nothing.
        assert sup.cleanup(older_than=3600) == []
        assert _keys(sup.sessions()) == {"A", "B", "C"}

        # Only A is older than the mark: C is idle but recent, B is running.
        assert sup.cleanup(older_than=time.time() - mark) == ["A"]
        assert _keys(sup.sessions()) == {"B", "C"}
        assert _rows(sup.journal_path, [run_a.id], ["A"]) == {t: 0 for t in before_a}, "records of A's run remain"
        assert run_a.id not in {r.id for r in sup.runs()}
        kept_c = _rows(sup.journal_path, [run_c.id], ["C"])
        assert all(kept_c[t] > 0 for t in ("runs", "egress", "stops", "sessions", "messages")), kept_c

        # older_than=0: every idle session goes; the running one stays, records and all.
        assert sup.cleanup(older_than=0) == ["C"]
        assert _keys(sup.sessions()) == {"B"}
        assert _rows(sup.journal_path, [run_c.id], ["C"]) == {t: 0 for t in kept_c}
        kept_b = _rows(sup.journal_path, [run_b.id], ["B"])
        assert kept_b["runs"] == 1 and kept_b["egress"] >= 2 and kept_b["sessions"] == 1, kept_b
        assert b.state == "running" and run_b.state.value == "running"
        assert b.usage.tokens == 150

        # A removed key is free again: a fresh session, no history.
        with pytest.raises(InvalidTarget):
            sup.session("A")
        fresh = sup.session("A", agent="once")
        assert fresh.generation == 0 and fresh.usage.tokens == 0 and fresh.answer is None
        assert fresh.info()["runs"] == []

        # Once stopped, B is removable too.
        b.stop()
        assert marked_processes(run_b.id) == {}
        assert set(sup.cleanup(older_than=0)) == {"A", "B"}
        assert sup.sessions() == []
        assert _rows(sup.journal_path, [run_b.id], ["B"]) == {t: 0 for t in kept_b}


def test_cleanup_keeps_a_parent_while_its_sub_agent_runs(tmp_path) -> None:
    ready = Countdown(1)
    with Supervisor(state_dir=str(tmp_path)) as sup:
        sup.register_tool("ready", ready)
        sup.register_agent("worker", limit_agents.ready_then_sleep, tools=["ready"])
        sup.register_agent("boss", limit_agents.spawn_child, tools=["sessions.spawn"])
        parent = sup.session("P", agent="boss")
        boss_run = parent.send({"agent": "worker", "message": "go"})
        child_key = boss_run.result(BOUND)
        boss_run.wait(BOUND)
        assert ready.wait(BOUND)
        child = sup.session(child_key)
        assert parent.state == "idle" and child.state == "running"
        assert [c.key for c in parent.children] == [child_key]

        assert _rows(sup.journal_path, [boss_run.id], ["P"])["stops"] == 1
        # The parent is idle, but its subtree is not: neither goes.
        assert sup.cleanup(older_than=0) == []
        assert _keys(sup.sessions()) == {"P", child_key}

        run = child.active_run
        child.stop()
        assert marked_processes(run.id) == {}
        # Now the whole subtree is idle: it goes as one.
        assert set(sup.cleanup(older_than=0)) == {"P", child_key}
        assert sup.sessions() == []
        assert _rows(sup.journal_path, [boss_run.id, run.id], ["P", child_key]) == {t: 0 for t, _ in RUN_TABLES} | {
            "sessions": 0, "messages": 0}
