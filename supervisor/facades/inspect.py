"""A read-only view of a state directory, safe while its supervisor lives.

A second supervisor may not open a live state directory (supervisor/
statelock.py): it would answer stop() of runs it does not own. An operator
or a tool can still look: `StateView` opens the journal read-only (SQLite
`mode=ro`, so WAL readers see what the owner committed), starts no spawner,
takes no lock, and offers no verb that changes anything.
"""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any

from ..errors import DeadstopError


class StateView:
    """What a state directory's journal says: sessions, runs, stop reports, the egress log."""

    def __init__(self, state_dir: str):
        path = os.path.join(state_dir, "journal.db")
        if not os.path.exists(path):
            raise DeadstopError(f"{state_dir} holds no journal (journal.db)")
        self.state_dir = state_dir
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        self._db.row_factory = sqlite3.Row

    def owner(self) -> str | None:
        """The live supervisor holding the directory ("pid N, supervisor ID"), or None."""
        import fcntl

        try:
            fd = os.open(os.path.join(self.state_dir, "lock"), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # held exclusively: its owner lives
                return os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def sessions(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT key, agent, parent, label, generation, last_run, last_outcome, usage"
                                " FROM sessions ORDER BY created_wall").fetchall()
        return [{**dict(r), "usage": json.loads(r["usage"] or "{}")} for r in rows]

    def runs(self, session: str | None = None) -> list[dict[str, Any]]:
        sql = ("SELECT id, session, generation, kind, target, state, pid, containment, created_wall, ended_wall"
               " FROM runs")
        rows = (self._db.execute(sql + " WHERE session = ? ORDER BY created_ns", (session,)) if session
                else self._db.execute(sql + " ORDER BY created_ns")).fetchall()
        return [dict(r) for r in rows]

    def report(self, run_id: str) -> dict[str, Any] | None:
        """The run's stop report as it was stored, or None while it has none."""
        row = self._db.execute("SELECT report FROM stops WHERE run_id = ?", (run_id,)).fetchone()
        return json.loads(row["report"]) if row else None

    def egress(self, run_id: str, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT t_ns, req_id, verb, tool, decision, code, detail FROM egress"
                                " WHERE run_id = ? ORDER BY seq LIMIT ?", (run_id, limit)).fetchall()
        return [dict(r) for r in rows]

    def dispatched_after_revoke(self, run_id: str) -> list[dict[str, Any]]:
        """The proof: tool calls dispatched after the run's revocation (must be empty)."""
        rows = self._db.execute(
            "SELECT e.t_ns, e.req_id, e.tool FROM egress e JOIN revocations r USING (run_id)"
            " WHERE e.run_id = ? AND e.decision = 'dispatched' AND e.t_ns > r.t_ns", (run_id,)).fetchall()
        return [dict(r) for r in rows]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "StateView":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
