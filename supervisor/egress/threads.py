"""The threads synchronous tool handlers run on, handing results back to the loop in batches.

`loop.run_in_executor` costs, per call, a `concurrent.futures.Future` (with
its own condition variable), an asyncio future chained to it both ways, and a
`call_soon_threadsafe` that writes to the loop's self-pipe and wakes it: with
500 calls in flight that was ~70 us of supervisor CPU a call and the garbage
of every one of them (gen-1 collections of in-flight futures), for a handler
that does nothing. Here a handler's result goes onto a shared queue, and the
loop is woken once for everything that finished since it last looked.

The futures handed out are the loop's own, so the broker cancels, awaits and
inspects them as it would any other: a future cancelled before its handler
reaches a thread never sees its result set (the broker's start gate refuses
such a handler anyway), one cancelled while it runs is left cancelled.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from typing import Any, Callable

_STOP = None  # the work item that ends a thread


class ToolThreads:
    """Up to `max_threads` threads, started as calls wait for one and never more than are waited for."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_threads: int, name: str = "deadstop-tool"):
        self._loop = loop
        self._max = max_threads
        self._name = name
        self._work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._done: collections.deque[tuple[asyncio.Future, Any, BaseException | None]] = collections.deque()
        self._lock = threading.Lock()  # the delivery flag
        self._threads: list[threading.Thread] = []
        # One token per thread blocked waiting for work. A list's append and
        # pop are atomic under the GIL: no lock on the per-call path.
        self._idle: list[None] = []
        self._delivery_pending = False  # a _deliver is scheduled on the loop and has not yet taken the queue
        self._closed = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Run fn(*args) on a thread; a loop future for its outcome. Call on the loop's thread."""
        if self._closed:
            raise RuntimeError("tool threads are closed")
        fut = self._loop.create_future()
        self._work.put((fut, fn, args))
        if self._work.qsize() > len(self._idle) and len(self._threads) < self._max:
            thread = threading.Thread(target=self._serve, name=f"{self._name}-{len(self._threads)}", daemon=True)
            self._threads.append(thread)
            thread.start()
        return fut

    def _serve(self) -> None:
        work = self._work
        idle = self._idle
        while True:
            idle.append(None)
            item = work.get()
            idle.pop()
            if item is _STOP or self._closed:
                return
            fut, fn, args = item
            try:
                outcome: tuple[asyncio.Future, Any, BaseException | None] = (fut, fn(*args), None)
            except BaseException as exc:  # handed to the loop, as an executor would
                outcome = (fut, None, exc)
            del item, fn, args
            self._done.append(outcome)
            del outcome
            with self._lock:
                if self._delivery_pending:
                    continue
                self._delivery_pending = True
            try:
                self._loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop is closed: nobody waits for the outcome
                return

    def _deliver(self) -> None:
        with self._lock:
            self._delivery_pending = False  # from here a thread that finishes schedules another delivery
        done = self._done
        while done:
            fut, result, exc = done.popleft()
            if fut.cancelled():
                continue
            if exc is None:
                fut.set_result(result)
            elif isinstance(exc, StopIteration):  # a future refuses it (it would end the awaiting coroutine)
                fut.set_exception(RuntimeError(f"handler raised {exc!r}"))
            else:
                fut.set_exception(exc)

    def close(self) -> None:
        """Start nothing more: queued calls are cancelled; running handlers finish on their threads.

        Call on the loop's thread. The threads are daemon threads, so a handler
        stuck in a blocking call keeps neither this nor the interpreter's exit
        waiting (an executor's workers are joined at exit).
        """
        self._closed = True
        while True:
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                item[0].cancel()
        for _ in self._threads:
            self._work.put(_STOP)

    @property
    def started(self) -> int:
        """Threads started so far (they are kept for later calls)."""
        return len(self._threads)
