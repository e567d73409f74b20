"""Clients of a `deadstop serve` daemon. Imports only ipc/ (and pyzmq, msgspec): no engine.

`Client` (blocking) is in client.py; `AsyncClient` (asyncio, tool providing)
in aio.py, loaded on first use so that the command line never imports asyncio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .client import Client
from .locate import NoDaemon, locate

__all__ = ["AsyncClient", "Client", "NoDaemon", "locate"]


def __getattr__(name: str) -> Any:
    if name == "AsyncClient":
        from .aio import AsyncClient

        return AsyncClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from .aio import AsyncClient
