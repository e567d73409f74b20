"""Clients of a `deadstop serve` daemon. Imports only ipc/ (and pyzmq, msgspec): no engine."""

from .client import AsyncClient, Client
from .locate import NoDaemon, locate

__all__ = ["AsyncClient", "Client", "NoDaemon", "locate"]
