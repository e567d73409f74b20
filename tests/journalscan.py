"""The journal read as a test reads it: a read-only SQLite connection of its own, independent of the supervisor's."""

from __future__ import annotations

import sqlite3
from typing import Any


def rows(journal: str, sql: str, *args: Any) -> list[tuple]:
    """The rows `sql` selects from the journal at `journal` (read-only: a test never writes the record it checks)."""
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()
