"""Agents and sessions of one supervisor, and their rows in the store.

AsyncSupervisor owns one SessionRegistry over its engine; the control API's
session verbs reach sessions through it. Sessions themselves (generation,
takeover, tree stop) live in session.py; what is read back from the store is
in store/queries.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Sequence

from ..engine.engine import Engine
from ..engine.run import AsyncRun
from ..engine.stop import StopRequest
from ..errors import InvalidTarget, SessionNotFound
from ..mechanisms.limits import Limits, Usage
from ..store import queries
from ..store.report import StopReport
from .session import AgentSpec, AsyncSession


class SessionRegistry:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.agents: dict[str, AgentSpec] = {}
        self._adhoc_agents: dict[str, AgentSpec] = {}  # callables given directly to session()
        self.by_key: dict[str, AsyncSession] = {}

    def register_agent(self, name: str, target: Any, *, tools: Sequence[str] = (), limits: Limits | None = None,
                       grace: float | None = None, may_stop_sessions: bool = False,
                       peers: Sequence[str] = (), cwd: str | None = None, env: dict[str, str] | None = None,
                       network: str = "none", private_tmp: bool | None = None,
                       isolation: str | None = None) -> None:
        """See AsyncSupervisor.register_agent. Checks the target and tools now, not at the first message."""
        if not isinstance(name, str) or not name:
            raise ValueError("agent name must be a non-empty string")
        self.engine.prepare_target(target, (), {})
        limits = Limits.coerce(limits)
        self.engine.check_limits(limits)  # LimitUnenforceable now, not at the first message
        self.engine.check_run_options(tools, cwd, network, isolation)
        self.agents[name] = AgentSpec(name, target, tuple(tools), limits, grace, may_stop_sessions,
                                      frozenset(peers), cwd, dict(env) if env else None, network, private_tmp,
                                      isolation)

    def agent_spec(self, agent: Any) -> AgentSpec:
        if isinstance(agent, AgentSpec):
            return agent
        if isinstance(agent, str):
            spec = self.agents.get(agent)
            if spec is None:
                raise InvalidTarget(f"agent {agent!r} is not registered (registered: {sorted(self.agents)})")
            return spec
        if callable(agent) or isinstance(agent, (list, tuple)):
            name = getattr(agent, "__qualname__", None) or "argv:" + str(agent[0] if isinstance(agent, (list, tuple)) else agent)
            return AgentSpec(name, agent)
        raise InvalidTarget(f"agent must be a registered name or a callable, not {type(agent).__name__}")

    def session(self, key: str, agent: Any = None, *, parent: AsyncSession | None = None,
                label: str | None = None) -> AsyncSession:
        """Create or get the session `key`. A new session needs an agent."""
        self.engine.check_open()
        existing = self.by_key.get(key)
        if existing is not None:
            if agent is not None:
                spec = self.agent_spec(agent)
                if spec.name != existing.agent:
                    raise InvalidTarget(f"session {key!r} runs agent {existing.agent!r}, not {spec.name!r}")
                self._adhoc_agents.setdefault(spec.name, spec)
            return existing
        if agent is None:
            raise InvalidTarget(f"session {key!r} does not exist; name its agent to create it")
        spec = self.agent_spec(agent)
        if spec.name not in self.agents:
            self._adhoc_agents[spec.name] = spec
        s = AsyncSession(self, key, spec.name, parent=parent, label=label)
        if parent is not None:
            parent.children.append(s)
        self.by_key[key] = s
        self.store(s)
        return s

    def get(self, key: str) -> AsyncSession:
        try:
            return self.by_key[key]
        except KeyError:
            raise SessionNotFound(f"no session {key!r}") from None

    def find(self, active: bool | None = None, min_tokens: int | None = None, *, agent: str | None = None,
             older_than: float | None = None) -> list[AsyncSession]:
        """Sessions by state, tokens used, agent, and time since they last changed (seconds)."""
        cutoff = time.time() - older_than if older_than is not None else None
        out = []
        for s in self.by_key.values():
            if active is not None and s.active != active:
                continue
            if agent is not None and s.agent != agent:
                continue
            if cutoff is not None and s.updated_wall > cutoff:
                continue
            if min_tokens is not None and s.usage.tokens < min_tokens:
                continue
            out.append(s)
        return out

    async def start_run(self, session: AsyncSession, message: Any, messages: list[Any]) -> AsyncRun:
        spec = self.agents.get(session.agent) or self._adhoc_agents.get(session.agent)
        if spec is None:
            raise InvalidTarget(f"session {session.key!r}: agent {session.agent!r} is not registered "
                                "in this supervisor (register it again after a restart)")
        context = {"session": session.key, "generation": session.generation, "messages": messages,
                   "parent": session.parent.key if session.parent else None, "label": session.label}
        inbox = {"message": message, "messages": messages, "context": context}
        if callable(spec.target):
            kind, desc, blob, argv = self.engine.prepare_target(spec.target, (message,), context)
        else:
            kind, desc, blob, argv = self.engine.prepare_target(spec.target, (), {})
        try:
            run = await self.engine.launch(kind, desc, blob, argv, list(spec.tools), spec.grace, spec.env, spec.cwd,
                                           limits=spec.limits, owner=session, inbox=inbox, network=spec.network,
                                           private_tmp=spec.private_tmp, isolation=spec.isolation)
        finally:
            session.starting_run = None
        session.active_run = run
        session.runs.append(run.id)
        self.store(session)
        return run

    def load(self) -> None:
        """Sessions survive restarts: rebuild them (idle) from the store."""
        runs_of = queries.session_runs(self.engine.journal.db)
        for row in queries.sessions(self.engine.journal.db):
            s = AsyncSession(self, row.key, row.agent, parent=self.by_key.get(row.parent) if row.parent else None,
                             label=row.label, generation=row.generation)
            if s.parent is not None:
                s.parent.children.append(s)
            s.created_wall, s.updated_wall = row.created_wall, row.updated_wall
            s.last_outcome, s.aborted_last_run = row.last_outcome, row.aborted_last_run
            s.answer, s.answer_generation = row.answer, row.answer_generation
            s.ended_usage = Usage.from_dict(row.usage)
            s.runs = runs_of.get(row.key, [])
            self.by_key[row.key] = s

    def begin_end_all(self, mode: str, *, source: str, reason: str, grace: float | None = None,
                      may_stop: Callable[[AsyncSession], bool] = lambda s: True,
                      ) -> tuple[dict[str, list[str]], list[asyncio.Task[StopReport]]]:
        """Every busy top-level session's tree in one step: every run revoked, the revocations
        committed once, then every stop begun. ({session key: ids of its tree's revoked runs}, the stops)"""
        requested_at = time.monotonic_ns()  # every report's requested_at: before any revoke
        StopRequest.of(mode, source, reason, 0.0, 0)  # an unknown mode or source fails before any revoke
        roots = [s for s in self.by_key.values() if s.parent is None and s.busy() and may_stop(s)]
        revoked = [(root, root.revoke_tree(source=source, reason=reason)) for root in roots]
        self.engine.journal.commit_now()  # every tree's revocations, on record before any signal
        tasks = [t for root, runs in revoked for t in root.end_revoked(runs, mode, source, reason, grace, requested_at)]
        return {root.key: [run.id for run in runs] for root, runs in revoked}, tasks

    async def cleanup(self, older_than: float = 3600, *, dry_run: bool = False) -> list[str]:
        """Remove sessions that are idle, whose whole subtree is idle, and that
        have not changed for `older_than` seconds, with every record of their runs.
        With dry_run, only say which they would be."""
        cutoff = time.time() - older_than

        def removable(s: AsyncSession) -> bool:
            return not s.active and s.updated_wall <= cutoff and all(removable(c) for c in s.children)

        roots = [s for s in self.by_key.values() if removable(s) and (s.parent is None or not removable(s.parent))]
        gone: list[AsyncSession] = []
        for root in roots:
            gone.extend([root] + root.descendants())
        if not gone:
            return []
        keys = [s.key for s in gone]
        if dry_run:
            return keys
        self.engine.journal.forget(keys)
        for s in gone:
            self.by_key.pop(s.key, None)
            self.engine.forget_runs(s.runs)
            if s.parent is not None and s.parent not in gone:
                s.parent.children.remove(s)
        return keys

    def store(self, s: AsyncSession) -> None:
        self.engine.journal.session({
            "key": s.key, "agent": s.agent, "parent": s.parent.key if s.parent else None, "label": s.label,
            "generation": s.generation, "created_wall": s.created_wall, "updated_wall": s.updated_wall,
            "last_run": s.runs[-1] if s.runs else None, "last_outcome": s.last_outcome,
            "aborted_last_run": s.aborted_last_run, "answer": s.answer, "answer_generation": s.answer_generation,
            "usage": s.usage.to_dict()})
