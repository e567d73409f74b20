"""The console's picture of the daemon, kept current from its event stream, and fanned out to browsers.

One subscription to the daemon's events feeds every open page: an event
about a session marks it stale, and one refresh (`sessions.show`, the same
verb the CLI uses) a short moment later answers for the whole burst;
`run.sample` events carry live usage and update the row without a call.
Each page receives the rows that changed as server-sent events: nothing in
the browser polls.

Usage over a run (the session page's charts) is what the console saw while
it watched: a bounded series per run, for the newest runs only.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

import msgspec

from ...ipc.control import ControlFault, Fault
from ..client.aio import AsyncClient

log = logging.getLogger("deadstop.console")

#: A burst of events about one session is answered by one refresh this much later (seconds).
COALESCE = 0.05
#: Points kept per run, and runs kept, for the usage charts.
SERIES_POINTS, SERIES_RUNS = 720, 256
#: Messages a page may have waiting; a page further behind is dropped (it reconnects and gets a snapshot).
PAGE_BACKLOG = 1000
#: A row's refresh unanswered this long is given up and tried again (the console's client itself waits for
#: ever: a page's stop may take that long); seconds before a failed refresh is tried again.
REFRESH_TIMEOUT, REFRESH_RETRY = 10.0, 1.0

_ROW_EVENTS = frozenset({"run.started", "run.ended", "run.usage", "run.fenced", "session.message",
                         "session.stopped", "run.tool_call"})


class Feed:
    """Rows of every session, live; and the pages listening for their changes."""

    def __init__(self, client: AsyncClient):
        self.client = client
        self.rows: dict[str, dict[str, Any]] = {}
        self.series: collections.OrderedDict[str, collections.deque[dict[str, Any]]] = collections.OrderedDict()
        self._pages: set[asyncio.Queue[tuple[str, Any] | None]] = set()
        self._stale: set[str] = set()
        self._sampled_unseen: set[str] = set()  # sampled while no page listened: refreshed when one comes
        self._seqs: dict[str, int] = {}
        self._resync = False  # the stream lost events: read every row again
        self._wake = asyncio.Event()
        self.ready = asyncio.Event()

    # -- pages -----------------------------------------------------------------------------------------
    def listen(self) -> asyncio.Queue[tuple[str, Any] | None]:
        queue: asyncio.Queue[tuple[str, Any] | None] = asyncio.Queue(PAGE_BACKLOG)
        self._pages.add(queue)
        if self._sampled_unseen:  # their CPU totals moved while nobody looked: read them now
            self._stale |= self._sampled_unseen
            self._sampled_unseen = set()
            self._wake.set()
        return queue

    def leave(self, queue: asyncio.Queue[tuple[str, Any] | None]) -> None:
        self._pages.discard(queue)

    def close_pages(self) -> None:
        for queue in list(self._pages):
            self._drop(queue)

    def _broadcast(self, kind: str, data: Any) -> None:
        for queue in list(self._pages):
            try:
                queue.put_nowait((kind, data))
            except asyncio.QueueFull:
                self._drop(queue)

    def _drop(self, queue: asyncio.Queue[tuple[str, Any] | None]) -> None:
        self._pages.discard(queue)
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(None)  # the page's stream ends; its EventSource reconnects

    # -- the daemon's side -----------------------------------------------------------------------------
    async def run(self) -> None:
        """Follow the daemon for ever: subscribe first, then read every row, then apply events."""
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the daemon restarted its stream, a call timed out: start over
                log.warning("deadstop console: event stream lost (%s); following again", exc)
                await asyncio.sleep(0.5)

    async def _follow(self) -> None:
        stream = await self.client.subscribe()  # in place before the snapshot: no change falls between
        refresher = asyncio.ensure_future(self._refresh_forever())
        try:
            await self._snapshot()
            self.ready.set()
            async for event in stream:
                if refresher.done():  # it failed: the rows would go stale for good; follow again from a snapshot
                    refresher.result()
                    raise RuntimeError("the refresher ended")
                self._apply(event)
        finally:
            refresher.cancel()
            await stream.aclose()

    async def _snapshot(self) -> None:
        infos = await self.client.sessions()
        self.rows = {s.key: self._row(msgspec.to_builtins(s), self.rows.get(s.key)) for s in infos}
        self._broadcast("snapshot", self.public_rows())

    def _apply(self, event: Any) -> None:
        key = event.session
        if event.kind == "events.dropped":
            self._resync = True  # what was missed is unknown: every row is read again
            self._wake.set()
        if not key:
            return
        last = self._seqs.get(key)
        if last is not None and event.seq > last + 1:  # ZeroMQ dropped some for us: this row is stale
            self._mark(key)
        self._seqs[key] = event.seq
        if event.kind == "run.sample":
            self._sample(key, event.run_id, event.data or {})
        elif event.kind in _ROW_EVENTS:
            self._mark(key)
            if event.kind == "run.ended":
                self._broadcast("run", {"key": key, "run_id": event.run_id})

    def _sample(self, key: str, run_id: str, data: dict[str, Any]) -> None:
        point = {"t": time.time(), **{k: data.get(k, 0) for k in
                                      ("tokens", "cpu_seconds", "memory_bytes", "processes", "tool_calls")}}
        series = self.series.get(run_id)
        if series is None:
            series = self.series[run_id] = collections.deque(maxlen=SERIES_POINTS)
            while len(self.series) > SERIES_RUNS:
                self.series.popitem(last=False)
        series.append(point)
        row = self.rows.get(key)
        if row is not None:
            row["live"] = {**point, "run_id": run_id}
        self._broadcast("sample", {"key": key, "run_id": run_id, "point": point})
        # The session's own totals (its ended runs and this one) come with a refresh: a call to the
        # daemon per sample, made only while a page is listening (the rest when one comes).
        if self._pages:
            self._mark(key)
        else:
            self._sampled_unseen.add(key)

    def _mark(self, key: str) -> None:
        self._stale.add(key)
        self._wake.set()

    async def _refresh_forever(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(COALESCE)
            self._wake.clear()
            if self._resync:
                self._resync, self._stale = False, set()
                await self._snapshot()
                continue
            keys, self._stale = self._stale, set()
            await asyncio.gather(*(self._refresh(k) for k in keys))

    async def _refresh(self, key: str) -> None:
        try:
            info = msgspec.to_builtins(await asyncio.wait_for(self.client.session(key), REFRESH_TIMEOUT))
        except ControlFault as exc:
            if exc.fault is Fault.NO_SUCH_SESSION:
                self._seqs.pop(key, None)
                if self.rows.pop(key, None) is not None:
                    self._broadcast("remove", {"key": key})
            else:
                self._retry(key, exc)
            return
        except asyncio.TimeoutError as exc:
            self._retry(key, exc)
            return
        old = self.rows.get(key)
        row = self._row(info, old)
        self.rows[key] = row
        if old is None and row.get("parent") in self.rows:
            self._mark(row["parent"])  # its children changed
        self._broadcast("row", row)

    def _retry(self, key: str, exc: BaseException) -> None:
        """A refresh that failed is not the row's last word: it is read again shortly."""
        log.warning("deadstop console: session %r not refreshed (%r); trying again", key, exc)
        asyncio.get_running_loop().call_later(REFRESH_RETRY, self._mark, key)

    def _row(self, info: dict[str, Any], old: dict[str, Any] | None = None) -> dict[str, Any]:
        """The session as the table shows it: its info, and the newest sample of its active run."""
        row = dict(info)
        live = (old or {}).get("live")
        if row.get("active_run") and live and live.get("run_id") == row["active_run"]:
            row["live"] = live
        return row

    async def current_rows(self) -> list[dict[str, Any]]:
        """The rows, with those sampled while no page listened read again first (a caller without a page)."""
        keys, self._sampled_unseen = self._sampled_unseen, set()
        await asyncio.gather(*(self._refresh(k) for k in keys))
        return self.public_rows()

    def public_rows(self) -> list[dict[str, Any]]:
        return list(self.rows.values())
