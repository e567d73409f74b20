"""The journal: an embedded SQLite database (WAL) that can prove a stop.

It records runs, every state transition, every revocation, every egress
decision and every stop report, each with a monotonic timestamp, so that
"nothing happened after stop" can be checked afterwards from the file alone:

    SELECT * FROM egress e JOIN revocations r USING (run_id)
    WHERE e.decision = 'dispatched' AND e.t_ns > r.t_ns;   -- must be empty

Writes happen on the supervisor's event loop thread. Rows are buffered and
written in one transaction at most every COMMIT_DELAY seconds (commit_soon),
because a transaction per row, or even per loop turn, would dominate the
egress round trip (a sequential tool call spans two loop turns);
a revocation flushes the buffer and commits before the call returns
(commit_now), because G1 requires it, and every egress decision made before
it, to be on record before the first signal is sent. A stop report commits
at the end of the loop step that made it (commit_this_step): before anyone
awaiting the stop resumes, and in one transaction with every other run
that ended in that step. The WAL is checkpointed on a thread of its own
(store/checkpoint.py), never inside one of these commits.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import logging
import time
from typing import Any, Iterable

from ..mechanisms.procs import boot_id
from .checkpoint import Checkpointer

log = logging.getLogger("deadstop.journal")

#: Longest a buffered row waits for its transaction. A crash of the
#: supervisor process can lose at most this much of the egress record; a
#: stop never does (revocations commit at once, stop reports before the stop returns).
COMMIT_DELAY = 0.005

#: Refusal rows written per (run, code) in each window of REFUSAL_WINDOW_NS;
#: further refusals in the window are only counted, and written as one
#: summary row when it closes. A garbage flood then costs a few rows a second
#: instead of one per frame (40,000 a second were measured), and the summary
#: still says how large it was.
REFUSAL_ROWS = 5
REFUSAL_WINDOW_NS = 1_000_000_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS supervisors(
    id TEXT PRIMARY KEY, pid INTEGER, pid_create_time REAL, boot_id TEXT,
    started_wall REAL, started_ns INTEGER, ended_wall REAL, containment TEXT);
CREATE TABLE IF NOT EXISTS runs(
    id TEXT PRIMARY KEY, supervisor_id TEXT, kind TEXT, target TEXT, tools TEXT,
    pid INTEGER, pid_create_time REAL, cgroup TEXT, containment TEXT, state TEXT,
    created_ns INTEGER, created_wall REAL, ended_ns INTEGER, ended_wall REAL,
    exit_code INTEGER, exit_signal INTEGER, session TEXT, generation INTEGER, usage TEXT);
CREATE INDEX IF NOT EXISTS runs_session ON runs(session);
CREATE TABLE IF NOT EXISTS sessions(
    key TEXT PRIMARY KEY, agent TEXT, parent TEXT, label TEXT, generation INTEGER,
    created_wall REAL, updated_wall REAL, last_run TEXT, last_outcome TEXT, aborted_last_run INTEGER,
    answer TEXT, answer_generation INTEGER, usage TEXT);
CREATE TABLE IF NOT EXISTS messages(
    seq INTEGER PRIMARY KEY, session TEXT, generation INTEGER, t_ns INTEGER, wall REAL, message TEXT);
CREATE TABLE IF NOT EXISTS transitions(
    seq INTEGER PRIMARY KEY, run_id TEXT, t_ns INTEGER, old TEXT, new TEXT);
CREATE TABLE IF NOT EXISTS revocations(
    run_id TEXT PRIMARY KEY, t_ns INTEGER, source TEXT, reason TEXT);
CREATE TABLE IF NOT EXISTS egress(
    seq INTEGER PRIMARY KEY, run_id TEXT, t_ns INTEGER, req_id INTEGER, verb TEXT,
    tool TEXT, decision TEXT, code INTEGER, detail TEXT);
CREATE INDEX IF NOT EXISTS egress_by_run ON egress(run_id);
CREATE TABLE IF NOT EXISTS stops(run_id TEXT PRIMARY KEY, t_ns INTEGER, report TEXT);
"""


class _Window:
    """Refusals of one (run, code) since `start`: how many were written, how many only counted."""

    __slots__ = ("start", "written", "more", "last", "timer")

    def __init__(self, start: int):
        self.start = start
        self.written = 0
        self.more = 0
        self.last: tuple[int, str, str | None] = (start, "?", None)  # t_ns, verb, tool of the last one counted
        self.timer: asyncio.TimerHandle | None = None


class Journal:
    def __init__(self, path: str):
        self.path = path
        # Owner-only before SQLite opens it (its -wal and -shm files take the
        # same mode): runs are other uids and must read none of it.
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        os.chmod(path, 0o600)
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer's thread does it (checkpoint.py)
        self._checkpointer = Checkpointer(path)
        self.db.executescript(SCHEMA)
        self._migrate()
        self.db.commit()
        self._commit_pending = False
        self._step_commit = False
        self._pending: list[tuple[str, tuple[Any, ...]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._windows: dict[tuple[str | None, int], _Window] = {}
        self.closed = False

    def _migrate(self) -> None:
        """Add columns that a journal written by an older version lacks; drop the index it no longer needs."""
        # (run_id, decision) was the egress index before egress_by_run: its entries of one run are in
        # decision order, so a run's log in seq order needed a sort of all its rows, and an insert
        # landed in as many places of it as the run has decisions. (run_id) keeps each run's rows in
        # seq order (the rowid ends every entry) and appends.
        self.db.execute("DROP INDEX IF EXISTS egress_run")
        wanted = {"ended_wall": "REAL", "session": "TEXT", "generation": "INTEGER", "usage": "TEXT"}
        have = {row[1] for row in self.db.execute("PRAGMA table_info(runs)")}
        for column, kind in wanted.items():
            if column not in have:
                self.db.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    # -- write side -----------------------------------------------------------
    def _exec(self, sql: str, params: Iterable[Any]) -> None:
        self._pending.append((sql, tuple(params)))
        self.commit_soon()

    def commit_soon(self) -> None:
        if self._commit_pending:
            return
        if self._loop is None:
            self.commit_now()
            return
        self._commit_pending = True
        self._loop.call_later(COMMIT_DELAY, self.commit_now)

    def commit_this_step(self) -> None:
        """Commit once the current event-loop step's callbacks have run.

        Every run that ends in the same step (a stop_all wakes hundreds
        together) shares one transaction, and it is on disk before anyone
        awaiting those ends resumes: their wake-ups are queued after this.
        """
        if self._loop is None:
            self.commit_now()
            return
        if not self._step_commit:
            self._step_commit = True
            self._loop.call_soon(self.commit_now)

    def commit_now(self) -> None:
        """Write every buffered row in one transaction and commit it."""
        self._commit_pending = False
        self._step_commit = False
        if self.closed or not self._pending:
            return
        pending, self._pending = self._pending, []
        self._checkpointer.wrote(len(pending))
        try:
            with self.db:  # one transaction; consecutive rows of one statement go in one executemany
                i = 0
                while i < len(pending):
                    sql = pending[i][0]
                    j = i
                    while j < len(pending) and pending[j][0] == sql:
                        j += 1
                    self.db.executemany(sql, [p for _, p in pending[i:j]])
                    i = j
        except (sqlite3.Error, OverflowError, ValueError):
            # One bad row must not lose its neighbours: retry row by row.
            for sql, params in pending:
                try:
                    with self.db:
                        self.db.execute(sql, params)
                except (sqlite3.Error, OverflowError, ValueError):
                    log.exception("journal: dropped a row that SQLite refused: %s", sql.split("(")[0])

    def supervisor_started(self, sup_id: str, pid: int, pid_create_time: float, containment: str) -> None:
        self._exec("INSERT INTO supervisors VALUES (?,?,?,?,?,?,?,?)",
                   (sup_id, pid, pid_create_time, boot_id(), time.time(), time.monotonic_ns(), None, containment))
        self.commit_now()

    def supervisor_ended(self, sup_id: str) -> None:
        self._exec("UPDATE supervisors SET ended_wall=? WHERE id=?", (time.time(), sup_id))
        self.commit_now()

    def run_created(self, run_id: str, sup_id: str, kind: str, target: str, tools: list[str],
                    containment: str, cgroup: str | None, session: str | None = None,
                    generation: int = 0) -> None:
        self._exec("INSERT INTO runs(id, supervisor_id, kind, target, tools, containment, cgroup, state,"
                   " created_ns, created_wall, session, generation) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                   (run_id, sup_id, kind, target, json.dumps(tools), containment, cgroup, "starting",
                    time.monotonic_ns(), time.time(), session, generation))

    def run_started(self, run_id: str, pid: int, pid_create_time: float) -> None:
        self._exec("UPDATE runs SET pid=?, pid_create_time=? WHERE id=?", (pid, pid_create_time, run_id))

    def transition(self, run_id: str, old: str, new: str, t_ns: int) -> None:
        # runs.state is written at the end only (run_ended): the transitions
        # table is the history, and one page fewer per commit keeps the
        # revoke-to-signal path short.
        self._exec("INSERT INTO transitions(run_id, t_ns, old, new) VALUES (?,?,?,?)", (run_id, t_ns, old, new))

    def revoked(self, run_id: str, t_ns: int, source: str, reason: str, commit: bool = True) -> None:
        self._exec("INSERT OR IGNORE INTO revocations VALUES (?,?,?,?)", (run_id, t_ns, source, reason))
        if commit:
            self.commit_now()

    def egress(self, run_id: str | None, t_ns: int, req_id: int | None, verb: str, tool: str | None,
               decision: str, code: int | None = None, detail: str | None = None) -> None:
        self._exec("INSERT INTO egress(run_id, t_ns, req_id, verb, tool, decision, code, detail)"
                   " VALUES (?,?,?,?,?,?,?,?)", (run_id, t_ns, req_id, verb, tool, decision, code, detail))

    def refused(self, run_id: str | None, t_ns: int, req_id: int | None, verb: str, tool: str | None, code: int,
                detail: str, *, quiet: bool = False) -> None:
        """A refusal: a row while its (run, code) window has room, else only counted (see REFUSAL_ROWS).

        `quiet` counts it even when there is room: the broker's budget for
        traffic it cannot attribute to any run is spent.
        """
        key = (run_id, code)
        window = self._windows.get(key)
        if window is not None and t_ns - window.start >= REFUSAL_WINDOW_NS:
            self._close_window(key)
            window = None
        if window is None:
            window = self._open_window(key, t_ns)
        if window.written < REFUSAL_ROWS and not quiet:
            window.written += 1
            self.egress(run_id, t_ns, req_id, verb, tool, "refused", code, detail)
        else:
            window.more += 1
            window.last = (t_ns, verb, tool)

    def flush_refusals(self, run_id: str | None) -> None:
        """Write the summary rows of `run_id`'s open refusal windows now (the run has ended)."""
        for key in [k for k in self._windows if k[0] == run_id]:
            self._close_window(key)

    def _open_window(self, key: tuple[str | None, int], t_ns: int) -> _Window:
        window = self._windows[key] = _Window(t_ns)
        if self._loop is not None:  # else it closes at the next refusal after it, or at close()
            window.timer = self._loop.call_later(REFUSAL_WINDOW_NS / 1e9, self._close_window, key)
        return window

    def _close_window(self, key: tuple[str | None, int]) -> None:
        window = self._windows.pop(key, None)
        if window is None:
            return
        if window.timer is not None:
            window.timer.cancel()
        if window.more and not self.closed:
            t_ns, verb, tool = window.last
            self.egress(key[0], t_ns, None, verb, tool, "refused", key[1], f"x {window.more} more like this")

    def run_ended(self, run_id: str, state: str, t_ns: int, exit_code: int | None, exit_signal: int | None,
                  report: dict[str, Any], usage: dict[str, Any] | None = None) -> None:
        self._exec("UPDATE runs SET state=?, ended_ns=?, ended_wall=?, exit_code=?, exit_signal=?, usage=?"
                   " WHERE id=?", (state, t_ns, time.time(), exit_code, exit_signal, json.dumps(usage or {}),
                                   run_id))
        self._exec("INSERT OR REPLACE INTO stops VALUES (?,?,?)", (run_id, t_ns, json.dumps(report)))
        self.commit_this_step()

    def message(self, session: str, generation: int, message: Any) -> None:
        self._exec("INSERT INTO messages(session, generation, t_ns, wall, message) VALUES (?,?,?,?,?)",
                   (session, generation, time.monotonic_ns(), time.time(), _json(message)))

    def session(self, info: dict[str, Any]) -> None:
        self._exec("INSERT INTO sessions(key, agent, parent, label, generation, created_wall, updated_wall,"
                   " last_run, last_outcome, aborted_last_run, answer, answer_generation, usage)"
                   " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(key) DO UPDATE SET"
                   " generation=excluded.generation, updated_wall=excluded.updated_wall,"
                   " last_run=excluded.last_run, last_outcome=excluded.last_outcome,"
                   " aborted_last_run=excluded.aborted_last_run, answer=excluded.answer,"
                   " answer_generation=excluded.answer_generation, usage=excluded.usage",
                   (info["key"], info["agent"], info["parent"], info["label"], info["generation"],
                    info["created_wall"], info["updated_wall"], info["last_run"], info["last_outcome"],
                    int(bool(info["aborted_last_run"])), _json(info["answer"]), info["answer_generation"],
                    json.dumps(info["usage"])))

    def session_recovered(self, key: str, run_id: str) -> None:
        self._exec("UPDATE sessions SET last_run=?, last_outcome='ended by recovery', aborted_last_run=1,"
                   " updated_wall=? WHERE key=?", (run_id, time.time(), key))

    def supervisor_recovered(self, sup_id: str, by: str) -> None:
        self._exec("UPDATE supervisors SET ended_wall=? WHERE id=?", (time.time(), sup_id))

    def forget(self, session_keys: list[str]) -> int:
        """Delete sessions and every record of their runs; returns how many runs went."""
        self.commit_now()
        marks = ",".join("?" * len(session_keys))
        with self.db:
            run_ids = [r for (r,) in self.db.execute(f"SELECT id FROM runs WHERE session IN ({marks})",
                                                      session_keys)]
            if run_ids:
                rmarks = ",".join("?" * len(run_ids))
                for table, column in (("transitions", "run_id"), ("revocations", "run_id"), ("egress", "run_id"),
                                      ("stops", "run_id"), ("runs", "id")):
                    self.db.execute(f"DELETE FROM {table} WHERE {column} IN ({rmarks})", run_ids)
            self.db.execute(f"DELETE FROM messages WHERE session IN ({marks})", session_keys)
            self.db.execute(f"DELETE FROM sessions WHERE key IN ({marks})", session_keys)
        return len(run_ids)

    def fenced(self, run_id: str, t_ns: int, what: str, detail: str) -> None:
        """An output of a superseded generation that was kept from subscribers and the store."""
        self._exec("INSERT INTO egress(run_id, t_ns, req_id, verb, tool, decision, code, detail)"
                   " VALUES (?,?,?,?,?,?,?,?)", (run_id, t_ns, None, what, None, "fenced", None, detail[:500]))

    def files(self) -> list[str]:
        """The database and its WAL companions (what a run's sandbox masks)."""
        return [self.path, self.path + "-wal", self.path + "-shm"]

    def close(self) -> None:
        if self.closed:
            return
        for key in list(self._windows):
            self._close_window(key)
        try:
            self.commit_now()
        finally:
            self.closed = True
            self._checkpointer.close()
            self.db.close()  # the last connection to close checkpoints the rest


def _json(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return json.dumps(repr(value))
