"""The journal's WAL checkpoints, on a thread of their own instead of in whichever commit crosses the threshold.

SQLite runs an automatic checkpoint inside the commit that takes the WAL
past 1,000 pages: that commit then also copies those pages into the
database file and syncs it. On the event loop that is a pause of
milliseconds (more on a slow disk) at a moment nobody chose, and the commit
that pays it may be a revocation's, which a stop's first signal waits for
(G1). So the journal's own connection never checkpoints; this thread does,
with a connection of its own, in PASSIVE mode (it never blocks a writer or
waits for a reader), every CHECKPOINT_EVERY seconds or sooner when the
writer says many rows went in. SQLite releases the GIL for the whole
checkpoint, so it runs beside the loop, not in its way.
"""

from __future__ import annotations

import logging
import sqlite3
import threading

log = logging.getLogger("deadstop.journal")

#: Longest gap between two checkpoints while rows are being written.
CHECKPOINT_EVERY = 1.0
#: Rows committed since the last checkpoint that call for one at once (about 1,000 pages of WAL).
CHECKPOINT_ROWS = 20_000


class Checkpointer:
    """Checkpoints the WAL of the database at `path` until closed; started by the first `wrote()`."""

    def __init__(self, path: str):
        self._path = path
        self._due = threading.Event()
        self._stop = False
        self._rows = 0
        self._thread: threading.Thread | None = None

    def wrote(self, rows: int) -> None:
        """`rows` were committed (on the writer's thread)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="deadstop-journal-checkpoint", daemon=True)
            self._thread.start()
        self._rows += rows
        if self._rows >= CHECKPOINT_ROWS:
            self._rows = 0
            self._due.set()

    def _serve(self) -> None:
        db = sqlite3.connect(self._path, check_same_thread=False)
        try:
            while not self._stop:
                self._due.wait(CHECKPOINT_EVERY)
                self._due.clear()
                if self._stop:
                    break
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error:  # a busy or closing database: the next round tries again
                    log.debug("journal: checkpoint skipped", exc_info=True)
        finally:
            db.close()

    def close(self) -> None:
        """Stop the thread (the writer's last close checkpoints what is left)."""
        self._stop = True
        self._due.set()
        if self._thread is not None:
            self._thread.join()
