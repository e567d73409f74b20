"""Several daemons' event streams read as one (RoutedClient.events)."""

from __future__ import annotations

import collections
import time
from typing import Any, Iterator, NamedTuple, Sequence

import zmq

from ...ipc import gateway
from ...ipc.control import ControlFault, Fault
from .client import EventStream


class DaemonEvent(NamedTuple):
    """An event of a merged stream, with the daemon it came from."""

    daemon: str
    event: gateway.EventMessage


class RoutedEvents:
    """Several daemons' event streams, read as one: an iterator of DaemonEvent, in arrival order.

    One poll over every subscription; a burst of one daemon is read in one go and then handed out in order, so a
    busy daemon cannot starve a quiet one for longer than its burst. Close it (or use it in a with block).
    """

    def __init__(self, streams: dict[str, EventStream], unreachable: dict[str, str], idle_timeout: float | None):
        self.streams = streams
        #: daemon -> why it could not be subscribed to (its events are not in this stream)
        self.unreachable = unreachable
        self._idle = idle_timeout
        self._poller = zmq.Poller()
        self._by_socket = {}
        for name, stream in streams.items():
            self._poller.register(stream.socket, zmq.POLLIN)
            self._by_socket[stream.socket] = name
        self._ready: collections.deque[DaemonEvent] = collections.deque()

    def __iter__(self) -> Iterator[DaemonEvent]:
        return self

    def __next__(self) -> DaemonEvent:
        got = self.next_within(self._idle)
        if got is None:
            raise ControlFault(Fault.TIMED_OUT, f"no event from any daemon within {self._idle:g} s")
        return got

    def next_within(self, timeout: float | None) -> DaemonEvent | None:
        """The next event, waiting at most `timeout` seconds (None: for ever); None if none came."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = self._poller.poll(None if wait is None else int(wait * 1000))
            if not ready:
                return None
            for sock, _ in ready:
                name = self._by_socket[sock]
                stream = self.streams[name]
                while (event := stream.take()) is not None:
                    self._ready.append(DaemonEvent(name, event))
        return self._ready.popleft()

    def close(self) -> None:
        for stream in self.streams.values():
            stream.close()

    def __enter__(self) -> "RoutedEvents":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__: Sequence[str] = ["DaemonEvent", "RoutedEvents"]
