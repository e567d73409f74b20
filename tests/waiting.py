"""Test-side synchronisation: tools that runs call to say they are ready."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable


class Countdown:
    """A tool handler that opens once it has been called `n` times."""

    def __init__(self, n: int):
        self._left = n
        self._lock = threading.Lock()
        self._open = threading.Event()

    def __call__(self) -> None:
        with self._lock:
            self._left -= 1
            if self._left <= 0:
                self._open.set()

    def wait(self, timeout: float) -> bool:
        return self._open.wait(timeout)


def late_start_reply(sup: Any, monkeypatch: Any, until: Callable[[], bool], bound: float = 30.0) -> None:
    """Hold every start's word from the spawner back until `until()` is true (or `bound` s passed).

    The run itself is forked and running meanwhile, and the supervisor's loop
    serves its egress: this widens, on purpose, the window a slow host opens
    by chance, in which a run's requests reach the broker before the
    supervisor knows the run has started.
    """
    host = getattr(sup, "core", sup).host  # a Supervisor's engine, or an AsyncSupervisor (the engine itself)
    launch = host.launch

    async def late_launch(*args: Any, **kwargs: Any) -> Any:
        started = await launch(*args, **kwargs)
        deadline = time.monotonic() + bound
        while not until() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return started

    monkeypatch.setattr(host, "launch", late_launch)
