"""A run's egress channel: its credential, allow-list and revocation record.

Revocation is physical: the credential bytes are dropped, so no frame can
authenticate as the run any more, whatever the broker's other checks do. A
digest of the old credential is kept only to tell a late request of the real
run (answered REVOKED and counted) from a forgery (UNAUTHENTICATED).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import threading
import time
from typing import Any


@dataclasses.dataclass(frozen=True)
class RevokeRecord:
    at: int  # time.monotonic_ns()
    source: str  # api | exit | supervisor | spawner | quota | parent | gateway | restart
    reason: str


class GenerationCell:
    """A session's current generation, shared by the channels of all its runs.

    Bumping it makes every request of an older run stale at the broker's
    pre-tool gate at once, before any of those runs is even revoked.
    """

    __slots__ = ("value",)

    def __init__(self, value: int = 0):
        self.value = value


class Channel:
    __slots__ = ("run_id", "_credential", "_digest", "allowed", "generation", "current", "revocation", "gate",
                 "in_flight", "refused_after_revoke", "cancelled_at_revoke", "calls", "max_calls", "held",
                 "paused")

    def __init__(self, run_id: str, credential: bytes, allowed: frozenset[str], generation: int = 0,
                 current: GenerationCell | None = None, max_calls: int | None = None):
        self.run_id = run_id
        self._credential: bytes | None = credential
        self._digest = hashlib.sha256(credential).digest()
        self.allowed = allowed
        self.generation = generation  # the run's own generation (what its frames must carry)
        self.current = current or GenerationCell(generation)  # its session's, now
        self.max_calls = max_calls
        self.paused = False
        self.held: list[tuple[bytes, Any, int]] = []  # requests held while paused, in arrival order
        self.revocation: RevokeRecord | None = None
        # Taken by revoke() and by every ToolContext.check(); see supervisor/tools.py.
        self.gate = threading.Lock()
        self.in_flight: dict[int, Any] = {}  # broker call sequence -> (asyncio handle, ToolContext)
        self.refused_after_revoke = 0
        self.cancelled_at_revoke = 0
        self.calls = 0

    def authenticates(self, presented: bytes) -> bool:
        cred = self._credential
        if cred is not None:
            return hmac.compare_digest(cred, presented)
        return hmac.compare_digest(self._digest, hashlib.sha256(presented).digest())

    @property
    def stale(self) -> bool:
        return self.generation != self.current.value

    def revoked_reason(self) -> str | None:
        rec = self.revocation
        return None if rec is None else f"{rec.source}: {rec.reason}"

    def revoke(self, source: str, reason: str) -> tuple[RevokeRecord, bool]:
        """Close the channel; idempotent. Returns (record, whether this call revoked it)."""
        with self.gate:
            if self.revocation is not None:
                return self.revocation, False
            self.revocation = RevokeRecord(time.monotonic_ns(), source, reason)
            self._credential = None
            return self.revocation, True
