"""A run's egress channel: its credential, allow-list and revocation record.

Revocation is physical: the credential bytes are dropped, so no frame can
authenticate as the run any more, whatever the broker's other checks do, and
a run with an endpoint of its own has it closed by the broker (see
Broker.revoke). A digest of the old credential is kept only to tell a late
request of the real run (answered REVOKED and counted) from a forgery
(UNAUTHENTICATED).
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


#: Peer identities (ZeroMQ connections) remembered per channel, to send each
#: the revocation notice. A run rarely has more sockets than this (one per
#: process and thread); past it the oldest is forgotten, which costs that
#: connection only the notice: the revoke itself does not depend on it.
MAX_PEERS = 64


class TokenBucket:
    """A budget of events: `burst` at once, refilled at `rate` per second.

    Refilled lazily from the caller's clock, so an idle bucket costs nothing.
    """

    __slots__ = ("_per_ns", "_burst", "_tokens", "_stamp")

    def __init__(self, rate: float, burst: int):
        self._per_ns = rate / 1e9
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = time.monotonic_ns()

    def take(self, now_ns: int) -> bool:
        """Spend one token; False when the budget is exhausted."""
        tokens = min(self._burst, self._tokens + (now_ns - self._stamp) * self._per_ns)
        self._stamp = now_ns
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True


class Channel:
    __slots__ = ("run_id", "_credential", "_digest", "allowed", "generation", "current", "revocation", "gate",
                 "in_flight", "refused_after_revoke", "cancelled_at_revoke", "calls", "max_calls", "held",
                 "held_bytes", "address", "endpoint", "peer_uid", "peer_gid", "peers", "budget",
                 "abused", "outliving", "outlived", "proxy", "on_revoke", "revoke_tasks", "emit")

    def __init__(self, run_id: str, credential: bytes, allowed: frozenset[str], generation: int = 0,
                 current: GenerationCell | None = None, max_calls: int | None = None, *,
                 budget: TokenBucket, address: str = "", peer_uid: int | None = None,
                 peer_gid: int | None = None):
        self.run_id = run_id
        self.address = address  # what the run connects to: its own endpoint, or the broker's shared one
        self.endpoint: str | None = None  # its own endpoint while bound (the broker binds and unbinds it)
        self.peer_uid = peer_uid  # when set, the kernel-attested uid every request must come from
        self.peer_gid = peer_gid
        self.peers: dict[bytes, None] = {}  # connections it authenticated on, oldest first
        self.budget = budget  # refusals it may draw before it is stopped for abuse
        self.abused = False
        self._credential: bytes | None = credential
        self._digest = hashlib.sha256(credential).digest()
        self.allowed = allowed
        self.generation = generation  # the run's own generation (what its frames must carry)
        self.current = current or GenerationCell(generation)  # its session's, now
        self.max_calls = max_calls
        #: None while requests flow; while the run is paused, the requests held, in arrival order.
        #: (The queue's existence is the pause: there is no separate flag to disagree with it.)
        self.held: list[tuple[bytes, Any, int]] | None = None
        self.held_bytes = 0  # their body sizes, summed
        self.revocation: RevokeRecord | None = None
        # Taken by revoke() and by every ToolContext.check(); see supervisor/egress/tools.py.
        self.gate = threading.Lock()
        self.in_flight: dict[int, Any] = {}  # broker call sequence -> (asyncio handle, ToolContext)
        self.refused_after_revoke = 0
        self.cancelled_at_revoke = 0  # handlers the revoke stopped before their effect (never started, or cancelled)
        #: synchronous handlers already running on a thread at the revoke: nothing can stop a thread, so
        #: they are waited for (within the grace) and reported, never counted as cancelled
        self.outliving: dict[int, Any] = {}  # broker call sequence -> (asyncio handle, ToolContext)
        self.outlived: list[Any] = []  # their ToolContexts, in revoke order (returned_at set when they return)
        self.proxy: Any = None  # the run's network proxy (egress/proxy.py RunProxy), cut with the revoke
        #: called in the revoke's step (an isolated tool's helper run is killed by one); what they return
        #: (the helpers' stop tasks) is kept in revoke_tasks, for the stop to wait on
        self.on_revoke: list[Any] = []
        self.revoke_tasks: list[Any] = []
        self.emit: Any = None  # (kind, data) -> bool: an event on the run's behalf (a tool handler's ctx.emit)
        self.calls = 0

    def authenticates(self, presented: bytes) -> bool:
        cred = self._credential
        if cred is not None:
            return hmac.compare_digest(cred, presented)
        return hmac.compare_digest(self._digest, hashlib.sha256(presented).digest())

    def saw(self, ident: bytes) -> None:
        """Remember a connection the run authenticated on, for the revocation notice."""
        peers = self.peers
        if ident not in peers:
            if len(peers) >= MAX_PEERS:
                del peers[next(iter(peers))]
            peers[ident] = None

    @property
    def holding(self) -> bool:
        return self.held is not None

    def take_held(self, *, keep_holding: bool = False) -> list[tuple[bytes, Any, int]]:
        """Empty the held queue, returning what it held in arrival order."""
        held, self.held, self.held_bytes = self.held or [], [] if keep_holding else None, 0
        return held

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
