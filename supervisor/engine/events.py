"""What runs emit, as subscribers receive it, and each subscriber's bounded backlog."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from typing import Any


@dataclasses.dataclass(frozen=True)
class Event:
    """Something a run emitted (or a lifecycle change), as delivered to subscribers."""

    run_id: str
    kind: str
    data: Any
    t_ns: int
    session: str | None = None
    generation: int = 0


#: The supervisor's own events about runs and sessions, for subscribers that ask for them
#: (the daemon's event stream does); run.ended and events.dropped go to every subscriber.
LIFECYCLE_KINDS = frozenset({"run.started", "run.tool_call", "run.usage", "run.sample", "run.fenced",
                             "session.message", "session.stopped"})

#: Events a subscriber may have waiting before newer ones are dropped (counted).
SUBSCRIBER_BACKLOG = 10_000


#: A starting run's own events held until its run.started is out; beyond, they are counted.
HELD_PER_RUN = 1_000


class HeldEvents:
    """A starting run's own events, held until the supervisor has said the run started.

    The run's first requests can reach the broker before the spawner's word that it forked
    the run; without this hold a subscriber would see the run's output before its
    run.started. Bounded: what a run emits beyond HELD_PER_RUN in that window is counted
    and announced as one events.dropped, as a slow subscriber's overflow is."""

    __slots__ = ("events", "dropped")

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.dropped = 0

    def hold(self, event: Event) -> None:
        if len(self.events) < HELD_PER_RUN:
            self.events.append(event)
        else:
            self.dropped += 1

    def released(self) -> list[Event]:
        """What to publish, in order, now that the run's start is out."""
        if not self.dropped:
            return self.events
        last = self.events[-1]
        return [*self.events, Event(last.run_id, "events.dropped", {"count": self.dropped}, time.monotonic_ns(),
                                    last.session, last.generation)]


class _Gap:
    """Where a slow subscriber's backlog overflowed: how many events it missed there."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 1


class Subscription:
    """One subscriber's backlog: bounded; what overflowed is counted in place, in order."""

    def __init__(self, session: str | None, lifecycle: bool = False):
        self.session = session
        self.lifecycle = lifecycle  # also the supervisor's own lifecycle events (LIFECYCLE_KINDS)
        self._items: collections.deque[Event | _Gap] = collections.deque()
        self._events = 0  # Events (not gaps) in _items
        self._wake = asyncio.Event()
        self._closed = False

    def offer(self, event: Event) -> None:
        if not self.lifecycle and event.kind in LIFECYCLE_KINDS:
            return
        if self._events >= SUBSCRIBER_BACKLOG and event.kind != "run.ended":
            last = self._items[-1] if self._items else None
            if isinstance(last, _Gap):
                last.count += 1
            else:
                self._items.append(_Gap())
        else:
            self._items.append(event)
            self._events += 1
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    def backlog(self) -> int:
        """Events waiting to be handed out."""
        return self._events

    async def get(self) -> Event | None:
        while not self._items:
            if self._closed:
                return None
            self._wake.clear()
            await self._wake.wait()
        item = self._items.popleft()
        if isinstance(item, _Gap):
            return Event("", "events.dropped", {"count": item.count}, time.monotonic_ns(), self.session)
        self._events -= 1
        return item
