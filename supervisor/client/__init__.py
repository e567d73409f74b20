"""Clients of a `deadstop serve` daemon. Imports only ipc/ (and pyzmq, msgspec): no engine.

`Client` (blocking) is in client.py; `AsyncClient` (asyncio, tool providing)
in aio.py, loaded on first use so that the command line never imports asyncio.
`RoutedClient` (routed.py) speaks to many daemons, one per node, sending each
session's verbs to the daemon that owns it (`AsyncRoutedClient`,
aio_routed.py, is its asyncio face); its owner records are
`StaticOwners` (a list of daemons, asked) or `LeaseOwners` (leases.py:
Kubernetes Leases, with the optional `kubernetes` package). Both load on
first use too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .client import Client
from .locate import NoDaemon, locate

__all__ = ["AsyncClient", "AsyncRoutedClient", "Client", "DaemonAddress", "DaemonEvent", "LeaseOwners", "NoDaemon",
           "Owners", "RoutedClient", "StaticOwners", "locate"]

_LAZY = {"AsyncClient": ".aio", "AsyncRoutedClient": ".aio_routed", "RoutedClient": ".routed",
         "StaticOwners": ".owners", "Owners": ".owners", "DaemonAddress": ".owners", "DaemonEvent": ".merged_events",
         "LeaseOwners": ".leases"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module, __name__), name)


if TYPE_CHECKING:
    from .aio import AsyncClient
    from .aio_routed import AsyncRoutedClient
    from .leases import LeaseOwners
    from .merged_events import DaemonEvent
    from .owners import DaemonAddress, Owners, StaticOwners
    from .routed import RoutedClient
