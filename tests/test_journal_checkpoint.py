"""The journal's WAL is checkpointed beside the event loop, not inside its commits.

A real Supervisor journals real egress: a run makes tool calls until the
WAL has well over a checkpoint's worth of pages. The supervisor's own
connection is set never to checkpoint, so pages reach the database file
only through the checkpointer's thread; the test watches the file grow
while the supervisor is still open (read from the filesystem, not asked of
the code under test), and finds the record whole afterwards.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time

import behaviours
from deadstop.supervisor import Supervisor
from deadstop.supervisor.store import checkpoint

WAIT = 30.0


def test_the_wal_is_checkpointed_while_the_supervisor_runs(tmp_path) -> None:
    calls = 3000  # two egress rows each: more than CHECKPOINT_ROWS / 4 rows, a few MB of WAL
    with Supervisor(state_dir=str(tmp_path)) as sup:
        sup.register_tool("echo", lambda text: text)
        db_file = sup.journal_path
        before = os.path.getsize(db_file)
        run = sup.start(behaviours.calls_many, "echo", calls, tools=["echo"])
        assert run.result(timeout=WAIT) == calls
        deadline = time.monotonic() + checkpoint.CHECKPOINT_EVERY * 10 + WAIT
        while os.path.getsize(db_file) <= before and time.monotonic() < deadline:
            time.sleep(0.05)  # bounded: the checkpointer runs at least every CHECKPOINT_EVERY
        grown = os.path.getsize(db_file)
        wal = os.path.getsize(db_file + "-wal")
        threads = [t for t in threading.enumerate() if t.name == "deadstop-journal-checkpoint"]
    assert grown > before, "pages reached the database file while the supervisor ran: a checkpoint happened"
    assert wal > 0
    assert len(threads) == 1, "one checkpoint thread for the one journal"
    db = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True)
    try:
        (n,) = db.execute("SELECT count(*) FROM egress WHERE run_id = ? AND decision = 'completed'", (run.id,)).fetchone()
    finally:
        db.close()
    assert n == calls, "every row is in the record"
    assert not [t for t in threading.enumerate() if t.name == "deadstop-journal-checkpoint"], \
        "closing the supervisor ended the checkpoint thread"


def test_a_journal_with_the_old_egress_index_opens_with_the_new_one_and_keeps_its_rows(tmp_path) -> None:
    """A journal written before egress_by_run: its (run_id, decision) index is dropped, the rows stay,
    and a run's log in seq order is read from the index without a sort (SQLite's own plan says so)."""
    from deadstop.supervisor.store.journal import Journal

    path = str(tmp_path / "old.db")
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE egress(seq INTEGER PRIMARY KEY, run_id TEXT, t_ns INTEGER, req_id INTEGER, verb TEXT,
                            tool TEXT, decision TEXT, code INTEGER, detail TEXT);
        CREATE INDEX egress_run ON egress(run_id, decision);
    """)
    old.executemany("INSERT INTO egress(run_id, t_ns, req_id, verb, tool, decision) VALUES (?,?,?,?,?,?)",
                    [("r1", i, i, "call", "echo", ("dispatched", "completed")[i % 2]) for i in range(10)])
    old.commit()
    old.close()
    Journal(path).close()
    db = sqlite3.connect(path)
    try:
        indexes = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'"
                                                  " AND tbl_name = 'egress'")}
        assert indexes == {"egress_by_run"}
        assert db.execute("SELECT count(*) FROM egress WHERE run_id = 'r1'").fetchone() == (10,)
        plan = [row[3] for row in db.execute("EXPLAIN QUERY PLAN SELECT * FROM egress WHERE run_id = ?"
                                             " ORDER BY seq LIMIT 50", ("r1",))]
        assert any("egress_by_run" in step for step in plan) and not any("TEMP B-TREE" in s for s in plan), plan
    finally:
        db.close()
