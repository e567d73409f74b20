"""AsyncRoutedClient: RoutedClient for asyncio code, every verb a coroutine.

    async with AsyncRoutedClient(["a=/run/deadstop/a", "b=/run/deadstop/b"]) as c:
        await c.send("chat-42", "hi", agent="researcher")
        await asyncio.gather(c.stop("chat-42"), c.stop("chat-43"))   # two owners, at once
        async for d in c.events():
            ...

The routing (owners, the search for an unknown key, merging, a kept owner
that went stale) is RoutedClient's, not a second copy of it: each verb runs
RoutedClient's own code on a thread of this client's pool, so verbs to
different daemons proceed together and the event loop never blocks on a
daemon or on the Kubernetes API (whose official client is blocking). The
price is one thread hop a verb, tens of microseconds against milliseconds
of a stop.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Iterable

from ...ipc import control as wire
from ...ipc.control import ControlFault, Fault
from .client import _Verbs
from .merged_events import DaemonEvent, RoutedEvents
from .owners import DaemonAddress, Owners
from .routed import RoutedClient

#: How often a thread waiting for events looks up, so that closing the stream never waits long for it.
EVENT_POLL = 0.2


class AsyncRoutedClient(_Verbs):
    """asyncio face of RoutedClient (same arguments); `unreachable` is the routed client's, of its last merged verb."""

    def __init__(self, owners: "Owners | str | Iterable[str | DaemonAddress]", **options: Any):
        self.routed = RoutedClient(owners, **options)
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="deadstop-aio-router")

    @property
    def unreachable(self) -> dict[str, str]:
        return self.routed.unreachable

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    async def call(self, verb: str | wire.Request, **args: Any) -> Any:
        """Any control verb, routed as RoutedClient.call routes it."""
        return await self._run(self.routed.call, verb, **args)

    async def owner_of(self, key: str) -> str | None:
        return await self._run(self.routed.owner_of, key)

    async def events(self, session: str | None = None, *, idle_timeout: float | None = None) -> AsyncIterator[DaemonEvent]:
        """Every daemon's events (or `session`'s owner's) as an async iterator of DaemonEvent; see RoutedClient.events.
        Subscribed when the await returns; close it with `aclose()` (or use it in an `async with`)."""
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deadstop-aio-events")
        loop = asyncio.get_running_loop()
        try:
            stream: RoutedEvents = await loop.run_in_executor(
                reader, functools.partial(self.routed.events, session, idle_timeout=idle_timeout))
        except BaseException:
            reader.shutdown(wait=False)
            raise
        return _AsyncEvents(reader, stream, idle_timeout)

    async def close(self) -> None:
        await self._run(self.routed.close)
        self._pool.shutdown(wait=True)

    async def __aenter__(self) -> "AsyncRoutedClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class _AsyncEvents:
    """A RoutedEvents read in short waits on a thread of its own: its sockets are only ever used from that one
    thread (ZeroMQ sockets are not thread-safe), the close included, which therefore waits for a read under way
    (at most EVENT_POLL)."""

    def __init__(self, reader: ThreadPoolExecutor, stream: RoutedEvents, idle_timeout: float | None):
        self._reader, self.stream, self._idle = reader, stream, idle_timeout
        self.unreachable = stream.unreachable
        self._closed = False

    def __aiter__(self) -> "_AsyncEvents":
        return self

    async def __anext__(self) -> DaemonEvent:
        loop = asyncio.get_running_loop()
        waited = 0.0
        while not self._closed:
            got = await loop.run_in_executor(self._reader, self.stream.next_within, EVENT_POLL)
            if got is not None:
                return got
            waited += EVENT_POLL
            if self._idle is not None and waited >= self._idle:
                raise ControlFault(Fault.TIMED_OUT, f"no event from any daemon within {self._idle:g} s")
        raise StopAsyncIteration

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await asyncio.get_running_loop().run_in_executor(self._reader, self.stream.close)
            self._reader.shutdown(wait=True)

    async def __aenter__(self) -> "_AsyncEvents":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


__all__ = ["AsyncRoutedClient"]
