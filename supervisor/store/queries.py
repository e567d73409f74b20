"""Every read query of the trusted side, in one place.

The journal (journal.py) is the only writer; what the engine, the session
layer, recovery, the control API and the read-only StateView read back goes
through these functions, so the schema is known in exactly two files. Each
takes a sqlite3 connection: the journal's own, or a read-only one.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from typing import Any


@dataclasses.dataclass(frozen=True)
class SessionRow:
    key: str
    agent: str
    parent: str | None
    label: str | None
    generation: int
    created_wall: float
    updated_wall: float
    last_run: str | None
    last_outcome: str | None
    aborted_last_run: bool
    answer: Any
    answer_generation: int | None
    usage: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class RunRow:
    """A run as the store has it: enough to answer `runs show` after it left memory."""

    id: str
    supervisor_id: str
    session: str | None
    generation: int
    kind: str
    target: str
    tools: list[str]
    state: str
    pid: int | None
    containment: str
    created_wall: float | None
    ended_wall: float | None
    report: dict[str, Any] | None
    usage: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SESSION_COLUMNS = ("key, agent, parent, label, generation, created_wall, updated_wall, last_run, last_outcome,"
                    " aborted_last_run, answer, answer_generation, usage")


def _session(row: tuple) -> SessionRow:
    (key, agent, parent, label, generation, created, updated, last_run, outcome, aborted, answer, answer_gen,
     usage) = row
    return SessionRow(key, agent, parent, label, generation or 0, created, updated, last_run, outcome, bool(aborted),
                      json.loads(answer) if answer else None, answer_gen, json.loads(usage) if usage else {})


def sessions(db: sqlite3.Connection) -> list[SessionRow]:
    """Every stored session, parents before their children (creation order)."""
    return [_session(r) for r in db.execute(f"SELECT {_SESSION_COLUMNS} FROM sessions ORDER BY created_wall")]


def session_runs(db: sqlite3.Connection) -> dict[str, list[str]]:
    """session key -> its run ids, oldest first."""
    out: dict[str, list[str]] = {}
    for run_id, key in db.execute("SELECT id, session FROM runs WHERE session IS NOT NULL ORDER BY created_ns"):
        out.setdefault(key, []).append(run_id)
    return out


_RUN_COLUMNS = ("r.id, r.supervisor_id, r.session, r.generation, r.kind, r.target, r.tools, r.state, r.pid,"
                " r.containment, r.created_wall, r.ended_wall, s.report, r.usage")


def _run(row: tuple) -> RunRow:
    (run_id, sid, session, generation, kind, target, tools, state, pid, containment, created, ended, report,
     usage) = row
    return RunRow(run_id, sid, session, generation or 0, kind, target, json.loads(tools) if tools else [], state,
                  pid, containment, created, ended, json.loads(report) if report else None,
                  json.loads(usage) if usage else {})


def run(db: sqlite3.Connection, run_id: str) -> RunRow | None:
    row = db.execute(f"SELECT {_RUN_COLUMNS} FROM runs r LEFT JOIN stops s ON s.run_id = r.id WHERE r.id = ?",
                     (run_id,)).fetchone()
    return _run(row) if row else None


def runs(db: sqlite3.Connection, *, session: str | None = None, ended: bool | None = None,
         limit: int | None = None) -> list[RunRow]:
    """Runs oldest first, optionally of one session, only ended (or only unended) ones, the newest `limit`."""
    where: list[str] = []
    args: list[Any] = []
    if session is not None:
        where.append("r.session = ?")
        args.append(session)
    if ended is not None:
        where.append("r.ended_ns IS NOT NULL" if ended else "r.ended_ns IS NULL")
    sql = f"SELECT {_RUN_COLUMNS} FROM runs r LEFT JOIN stops s ON s.run_id = r.id"
    if where:
        sql += " WHERE " + " AND ".join(where)
    if limit is not None:
        sql = f"SELECT * FROM ({sql} ORDER BY r.created_ns DESC LIMIT ?) ORDER BY created_wall"
        args.append(limit)
    else:
        sql += " ORDER BY r.created_ns"
    return [_run(r) for r in db.execute(sql, args)]


def report(db: sqlite3.Connection, run_id: str) -> dict[str, Any] | None:
    """The run's stop report as it was stored, or None while it has none."""
    row = db.execute("SELECT report FROM stops WHERE run_id = ?", (run_id,)).fetchone()
    return json.loads(row[0]) if row else None


def egress(db: sqlite3.Connection, run_id: str, limit: int = 1000) -> list[dict[str, Any]]:
    cols = ("t_ns", "req_id", "verb", "tool", "decision", "code", "detail")
    rows = db.execute(f"SELECT {', '.join(cols)} FROM egress WHERE run_id = ? ORDER BY seq LIMIT ?", (run_id, limit))
    return [dict(zip(cols, r)) for r in rows]


_EGRESS_COLS = ("seq", "t_ns", "req_id", "verb", "tool", "decision", "code", "detail")


def egress_page(db: sqlite3.Connection, run_id: str, offset: int, limit: int) -> tuple[list[dict[str, Any]], int]:
    """Rows `offset`.. of the run's egress log (oldest first), and how many it has in all."""
    rows = db.execute(f"SELECT {', '.join(_EGRESS_COLS)} FROM egress WHERE run_id = ? ORDER BY seq LIMIT ? OFFSET ?",
                      (run_id, limit, offset))
    total = db.execute("SELECT COUNT(*) FROM egress WHERE run_id = ?", (run_id,)).fetchone()[0]
    return [dict(zip(_EGRESS_COLS, r)) for r in rows], int(total)


def revocation(db: sqlite3.Connection, run_id: str) -> tuple[int, str] | None:
    """When the run's egress was revoked, and by what (api, exit, quota, ...)."""
    row = db.execute("SELECT t_ns, source FROM revocations WHERE run_id = ?", (run_id,)).fetchone()
    return (int(row[0]), str(row[1])) if row else None


def dispatched_rows_after_revoke(db: sqlite3.Connection, run_id: str) -> list[dict[str, Any]]:
    """Every `dispatched` row of the run later than its revocation, whole (the console shows them)."""
    cols = ", ".join(f"e.{c}" for c in _EGRESS_COLS)
    rows = db.execute(f"SELECT {cols} FROM egress e JOIN revocations r USING (run_id)"
                      " WHERE e.run_id = ? AND e.decision = 'dispatched' AND e.t_ns > r.t_ns ORDER BY e.seq", (run_id,))
    return [dict(zip(_EGRESS_COLS, r)) for r in rows]


def rows_decided(db: sqlite3.Connection, run_id: str, decision: str) -> list[dict[str, Any]]:
    rows = db.execute(f"SELECT {', '.join(_EGRESS_COLS)} FROM egress WHERE run_id = ? AND decision = ? ORDER BY seq",
                      (run_id, decision))
    return [dict(zip(_EGRESS_COLS, r)) for r in rows]


def dispatched_after_revoke(db: sqlite3.Connection, run_id: str) -> list[dict[str, Any]]:
    """The proof: tool calls dispatched after the run's revocation (must be empty)."""
    rows = db.execute("SELECT e.t_ns, e.req_id, e.tool FROM egress e JOIN revocations r USING (run_id)"
                      " WHERE e.run_id = ? AND e.decision = 'dispatched' AND e.t_ns > r.t_ns", (run_id,))
    return [dict(zip(("t_ns", "req_id", "tool"), r)) for r in rows]


# -- recovery --------------------------------------------------------------------------------------
def unended_supervisors(db: sqlite3.Connection, own_id: str) -> list[tuple[str, int, float, str]]:
    """(id, pid, pid create time, boot id) of every other supervisor the store has not seen end."""
    return db.execute("SELECT id, pid, pid_create_time, boot_id FROM supervisors WHERE ended_wall IS NULL AND id != ?",
                      (own_id,)).fetchall()


def unended_runs_of(db: sqlite3.Connection, supervisor_ids: list[str]) -> list[tuple]:
    """(id, supervisor id, pid, pid create time, cgroup, session) of their runs that never ended."""
    placeholders = ",".join("?" * len(supervisor_ids))
    return db.execute(f"SELECT id, supervisor_id, pid, pid_create_time, cgroup, session FROM runs"
                      f" WHERE ended_ns IS NULL AND supervisor_id IN ({placeholders})", tuple(supervisor_ids)).fetchall()


def a_cgroup_of(db: sqlite3.Connection, supervisor_id: str) -> str | None:
    """The cgroup path of one of the supervisor's runs (its subtree is the parent directory)."""
    row = db.execute("SELECT cgroup FROM runs WHERE supervisor_id = ? AND cgroup IS NOT NULL LIMIT 1",
                     (supervisor_id,)).fetchone()
    return row[0] if row else None
