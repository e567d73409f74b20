"""A read-only view of a state directory, safe while its supervisor lives.

A second supervisor may not open a live state directory (mechanisms/
statelock.py): it would answer stop() of runs it does not own. An operator
or a tool can still look: `StateView` opens the journal read-only (SQLite
`mode=ro`, so WAL readers see what the owner committed), starts no spawner,
takes no lock, and offers no verb that changes anything.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from typing import Any

from ..errors import DeadstopError
from ..store import queries


class StateView:
    """What a state directory's journal says: sessions, runs, stop reports, the egress log."""

    def __init__(self, state_dir: str):
        path = os.path.join(state_dir, "journal.db")
        if not os.path.exists(path):
            raise DeadstopError(f"{state_dir} holds no journal (journal.db)")
        self.state_dir = state_dir
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)

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
        return [dataclasses.asdict(r) for r in queries.sessions(self._db)]

    def runs(self, session: str | None = None) -> list[dict[str, Any]]:
        return [r.to_dict() for r in queries.runs(self._db, session=session)]

    def report(self, run_id: str) -> dict[str, Any] | None:
        """The run's stop report as it was stored, or None while it has none."""
        return queries.report(self._db, run_id)

    def egress(self, run_id: str, limit: int = 1000) -> list[dict[str, Any]]:
        return queries.egress(self._db, run_id, limit)

    def dispatched_after_revoke(self, run_id: str) -> list[dict[str, Any]]:
        """The proof: tool calls dispatched after the run's revocation (must be empty)."""
        return queries.dispatched_after_revoke(self._db, run_id)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "StateView":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
