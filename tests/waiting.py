"""Test-side synchronisation: tools that runs call to say they are ready."""

from __future__ import annotations

import threading


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
