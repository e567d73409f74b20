"""Who owns a session: the daemons a router knows, and the owner records it keeps.

`Owners` is what RoutedClient asks (routed.py); `StaticOwners` is a fixed
list of daemons whose ownership is learned by asking them, `LeaseOwners`
(leases.py) one Kubernetes Lease per session shared by every router.
`rendezvous` picks the daemon of a key nobody owns yet.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence, runtime_checkable

from ...ipc.control import ControlFault, Fault

#: $DEADSTOP_DAEMONS: the command line's default for --daemons.
ENV_DAEMONS = "DEADSTOP_DAEMONS"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,252}$")


@dataclass(frozen=True)
class DaemonAddress:
    """A daemon by its name (what owner records hold) and where to reach it (a connection file, a runtime
    directory or a control endpoint; a tcp:// endpoint with its CURVE public key)."""

    name: str
    where: str
    server_key: str | None = None

    @classmethod
    def parse(cls, text: str) -> "DaemonAddress":
        """`NAME=WHERE`, or a bare WHERE that is its own name."""
        name, sep, where = text.partition("=")
        if sep and _NAME.match(name) and where:
            return cls(name, where)
        return cls(text, text)


@runtime_checkable
class Owners(Protocol):
    """Who owns session key K; record that daemon D now owns K; the daemons there are."""

    #: True when the record is shared by every router and written before a session starts (no record: no
    #: session, so a new key is not looked for on every daemon first). False: a cache of what was learned.
    authoritative: bool

    def daemons(self) -> list[DaemonAddress]: ...

    def owner(self, key: str) -> str | None: ...

    def record(self, key: str, daemon: str, *, replacing: str | None = None) -> str:
        """Make `daemon` K's owner unless another already is (or, with `replacing`, unless the owner is no longer
        `replacing`); the owner on record afterwards, which is the earlier writer's if it won."""
        ...

    def forget(self, key: str, *, holder: str | None = None) -> None:
        """Drop K's record (only if `holder` still holds it, when given)."""
        ...

    def refresh(self, key: str) -> str | None:
        """K's owner as its record says now, past any copy kept here (every per-key verb but a stop reads so)."""
        ...


class StaticOwners:
    """A fixed list of daemons; ownership is learned by asking them (the router does) and kept here."""

    authoritative = False

    def __init__(self, daemons: Iterable["str | DaemonAddress"]):
        self._daemons = [d if isinstance(d, DaemonAddress) else DaemonAddress.parse(d) for d in daemons]
        names = [d.name for d in self._daemons]
        if not names:
            raise ControlFault(Fault.BAD_ARGUMENTS, "a routed client needs at least one daemon")
        if len(set(names)) != len(names):
            raise ControlFault(Fault.BAD_ARGUMENTS, f"daemon names must be unique: {', '.join(names)}")
        self._owners: dict[str, str] = {}
        self._lock = threading.Lock()

    @classmethod
    def parse(cls, text: str) -> "StaticOwners":
        """`A,B,...` as --daemons and $DEADSTOP_DAEMONS take it."""
        return cls(part.strip() for part in text.split(",") if part.strip())

    def daemons(self) -> list[DaemonAddress]:
        return list(self._daemons)

    def owner(self, key: str) -> str | None:
        return self._owners.get(key)

    def record(self, key: str, daemon: str, *, replacing: str | None = None) -> str:
        with self._lock:
            current = self._owners.get(key)
            if current is None or current == replacing:
                self._owners[key] = current = daemon
            return current

    def forget(self, key: str, *, holder: str | None = None) -> None:
        with self._lock:
            if holder is None or self._owners.get(key) == holder:
                self._owners.pop(key, None)

    def refresh(self, key: str) -> str | None:
        return self._owners.get(key)  # what was learned is all there is: the daemons are asked by the router


def rendezvous(key: str, names: Iterable[str]) -> str:
    """The daemon a new session goes to: highest hash of (daemon, key). Every router with the same names picks the
    same one, and adding or removing a daemon moves only the new keys that hash to it."""
    return max(names, key=lambda name: hashlib.sha256(f"{name}\0{key}".encode()).digest())


def owners_from(spec: str) -> Owners:
    """--daemons / $DEADSTOP_DAEMONS: `A,B,...` (each `NAME=WHERE` or WHERE) for a static list, or
    `k8s:NAMESPACE` for the Lease records of that namespace (the `kubernetes` package, `deadstop[k8s]`)."""
    if spec.startswith("k8s:"):
        from .leases import LeaseOwners

        return LeaseOwners(spec[len("k8s:"):] or "default")
    return StaticOwners.parse(spec)


__all__: Sequence[str] = ["DaemonAddress", "ENV_DAEMONS", "Owners", "StaticOwners", "owners_from", "rendezvous"]
