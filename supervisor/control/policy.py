"""Who may call which verb on which session: the one place caller policy lives.

A `Principal` is a caller identity, fixed when it connects or is created:

    library   code in the supervisor's own process: every scope, every session
    operator  a person at the command line on the supervisor's host: every scope
    gateway   a client holding a key: the scopes its key was given
    run       a run acting through its `sessions.*` tools: read and write, and
              only on sessions it spawned (directly or below) or on sessions of
              its agent's `peers`; never on itself or an ancestor; a sub-agent
              stops sessions only if its agent has `may_stop_sessions`

Every refusal is a `ControlFault` (FORBIDDEN for a missing scope,
POLICY_DENIED for a session the caller may not touch) raised before the
verb does anything.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Iterable

from ...ipc.control import ControlFault, Fault, Scope, Verb

if TYPE_CHECKING:
    from ..sessions.registry import SessionRegistry
    from ..sessions.session import AsyncSession

ALL_SCOPES = frozenset(Scope)

#: principal kind -> the revoke source its stops are recorded with
_SOURCES = {"library": "api", "operator": "cli", "gateway": "gateway", "run": "parent", "console": "console"}


@dataclasses.dataclass(frozen=True)
class Principal:
    """A caller: what kind it is, a name for the journal, its scopes, and (a run) its session."""

    kind: str
    name: str
    scopes: frozenset[Scope] = ALL_SCOPES
    session: str | None = None  # kind "run": the session of the calling run
    run_id: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in _SOURCES:
            raise ValueError(f"principal kind must be one of {sorted(_SOURCES)}, not {self.kind!r}")
        if self.kind == "run" and not self.session:
            raise ValueError("a run principal needs the key of the run's session")

    @classmethod
    def library(cls) -> "Principal":
        return LIBRARY

    @classmethod
    def operator(cls, name: str = "operator") -> "Principal":
        return cls("operator", name)

    @classmethod
    def console(cls, name: str, scopes: Iterable[Scope | str]) -> "Principal":
        return cls("console", name, frozenset(Scope(s) for s in scopes))

    @classmethod
    def gateway(cls, name: str, scopes: Iterable[Scope | str]) -> "Principal":
        return cls("gateway", name, frozenset(Scope(s) for s in scopes))

    @classmethod
    def of_run(cls, run_id: str, session: str) -> "Principal":
        return cls("run", f"run {run_id}", frozenset({Scope.READ, Scope.WRITE}), session=session, run_id=run_id)

    @property
    def source(self) -> str:
        """The revoke source of a stop this caller asks for (StopReport.revoke_source)."""
        return _SOURCES[self.kind]

    def describe(self) -> str:
        return f"{self.kind} {self.name!r}" if self.kind != "run" else f"session {self.session} ({self.name})"


LIBRARY = Principal("library", "in-process")


class Policy:
    """The checks, over the registry's sessions and agents. Holds no state of its own."""

    def __init__(self, registry: "SessionRegistry"):
        self._registry = registry

    def check_scope(self, who: Principal, verb: Verb) -> None:
        if verb.scope not in who.scopes:
            raise ControlFault(Fault.FORBIDDEN, f"{who.describe()} may not use {verb.name}: it needs the "
                                                f"{verb.scope.value!r} scope (it has {sorted(s.value for s in who.scopes)})")
        if verb.name == "sessions.spawn" and who.kind != "run":
            raise ControlFault(Fault.FORBIDDEN, "sessions.spawn is a run's verb (it starts a sub-agent below the "
                                                "caller's own session); use sessions.send with an agent")

    def caller_session(self, who: Principal) -> "AsyncSession":
        assert who.session is not None
        session = self._registry.by_key.get(who.session)
        if session is None:
            raise ControlFault(Fault.POLICY_DENIED, f"{who.describe()}: its session is gone")
        return session

    def may_see(self, who: Principal, target: "AsyncSession") -> bool:
        if who.kind != "run":
            return True
        caller = self.caller_session(who)
        if caller.is_ancestor_of(target):
            return True
        return target is not caller and not target.is_ancestor_of(caller) and target.agent in self._peers(caller)

    def check_may_act(self, who: Principal, target: "AsyncSession", verb: str) -> None:
        """A run may act on what it spawned, and on its peers' sessions; never on itself or an ancestor."""
        if who.kind != "run":
            return
        caller = self.caller_session(who)
        if target is caller or target.is_ancestor_of(caller):
            raise ControlFault(Fault.POLICY_DENIED, f"session {caller.key} may not {verb} itself or an ancestor "
                                                    f"({target.key})")
        if caller.is_ancestor_of(target) or target.agent in self._peers(caller):
            return
        raise ControlFault(Fault.POLICY_DENIED,
                           f"session {caller.key} (agent {caller.agent!r}) did not spawn {target.key} and its agent "
                           f"may not act on agent {target.agent!r}: add it to register_agent(..., peers=[...])")

    def check_may_stop(self, who: Principal) -> None:
        """A sub-agent stops sessions only if its agent was registered with may_stop_sessions=True."""
        if who.kind != "run":
            return
        caller = self.caller_session(who)
        if caller.parent is None:
            return
        spec = self._registry.agents.get(caller.agent)
        if spec is None or not spec.may_stop_sessions:
            raise ControlFault(Fault.POLICY_DENIED,
                               f"session {caller.key} is a sub-agent (agent {caller.agent!r}); sub-agents may not "
                               "stop sessions unless the agent is registered with may_stop_sessions=True")

    def _peers(self, caller: "AsyncSession") -> frozenset[str]:
        spec = self._registry.agents.get(caller.agent)
        return spec.peers if spec is not None else frozenset()
