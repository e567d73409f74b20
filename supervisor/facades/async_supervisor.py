"""AsyncSupervisor: the asyncio facade. The engine runs things; this adds sessions and the control API.

Every verb a caller has on sessions goes through `self.control` (ControlAPI)
as the in-process library principal, the same code an RPC or the command line
reaches with its own principal; the engine underneath knows nothing of
sessions.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Sequence

from ...ipc import control as wire
from ...ipc.control import RunInfo
from ..control import run_tools
from ..control.api import ControlAPI
from ..control.policy import LIBRARY, Principal
from ..engine.engine import Engine
from ..engine.events import Event
from ..mechanisms.limits import Limits
from ..sessions.registry import SessionRegistry
from ..sessions.session import AgentSpec, AsyncSession


class AsyncSupervisor(Engine):
    """Start runs, broker their egress, stop them for good; sessions on top.

    Use as ``async with AsyncSupervisor() as sup:``. Options:

    state_dir     where the journal lives (default: a temporary directory
                  removed at close); pass one to keep the journal. One live
                  supervisor owns a state directory (StateDirInUse otherwise;
                  StateView reads one that is in use).
    containment   "auto" (strongest available), "cgroup" (fail if cgroup v2
                  is not writable) or "process-group" (force the fallback).
    grace         default seconds between SIGTERM and SIGKILL.
    isolation     "auto" (every layer the host gives; `sup.isolation` names
                  the missing ones), "strict" (refuse to open unless every
                  layer is there) or "off" (trusted code: runs share the
                  supervisor's identity, namespaces and environment).
    uid_range     (first uid, count) that per-run identities come from.
    spawner_timeout  seconds the spawner may take to answer a start; past
                  that it is declared lost and every run is killed through
                  its cgroup.

    Coroutines: open, close, start, stop_all, cleanup, call. Plain methods (they
    neither wait nor touch a process): register_tool, register_agent,
    session, get_session, sessions, get_run, run_records, check_limits.
    subscribe is an async iterator.
    """

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.registry = SessionRegistry(self)
        self.control = ControlAPI(self, self.registry)
        run_tools.register(self.tools, self, self.control)

    async def __aenter__(self) -> "AsyncSupervisor":
        await self.open()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # -- the engine's hooks ---------------------------------------------------------------------
    def _loaded(self) -> None:
        self.registry.load()

    def _closing(self) -> None:
        for s in self.registry.by_key.values():  # queued messages will never start now
            s.close_inbox("supervisor closing")

    def owner_of(self, key: str) -> AsyncSession | None:
        return self.registry.by_key.get(key)

    # -- agents and sessions --------------------------------------------------------------------
    def register_agent(self, name: str, target: Any, *, tools: Sequence[str] = (), limits: Limits | None = None,
                       grace: float | None = None, may_stop_sessions: bool = False,
                       peers: Sequence[str] = (), cwd: str | None = None, env: dict[str, str] | None = None,
                       network: str = "none", private_tmp: bool | None = None,
                       isolation: str | None = None) -> None:
        """Name an agent that sessions (and sub-agents, via sessions.spawn) can run.

        cwd, env, network, private_tmp: as for start(), for every run of the agent.

        may_stop_sessions: a sub-agent of this kind may use `sessions.stop`
        (top-level runs may always stop sessions they spawned).
        peers: agents whose sessions runs of this one may send to or stop
        without having spawned them (the agent-to-agent allow-list).
        isolation: None (the supervisor's), "strict" (refused here unless the
        host gives every layer) or "off" (a trusted agent: its runs get no
        sandbox and no identity of their own; their reports say mode "off").
        """
        self.registry.register_agent(name, target, tools=tools, limits=limits, grace=grace,
                                     may_stop_sessions=may_stop_sessions, peers=peers, cwd=cwd, env=env,
                                     network=network, private_tmp=private_tmp, isolation=isolation)

    @property
    def agents(self) -> dict[str, AgentSpec]:
        return {a.name: a for a in self.control.agents(LIBRARY)}

    def session(self, key: str, agent: Any = None, *, parent: AsyncSession | None = None,
                label: str | None = None) -> AsyncSession:
        """Create or get the session `key`. A new session needs an agent."""
        self.check_open()
        return self.control.open_session(LIBRARY, key, agent, parent=parent, label=label)

    def get_session(self, key: str) -> AsyncSession:
        return self.control.session(LIBRARY, key)

    def sessions(self, active: bool | None = None, min_tokens: int | None = None) -> list[AsyncSession]:
        """Sessions, optionally only (in)active ones or those that used at least `min_tokens`."""
        return self.control.sessions(LIBRARY, active=active, min_tokens=min_tokens)

    async def cleanup(self, older_than: float = 3600) -> list[str]:
        """Remove idle sessions unchanged for `older_than` seconds, with every record of their runs."""
        return await self.control.cleanup(LIBRARY, older_than)

    def run_records(self, session: str | None = None, *, active: bool | None = None,
                    limit: int = 1000) -> list[RunInfo]:
        """Every run the store knows (live ones from memory), oldest first: ControlAPI's runs.list."""
        return self.control.runs(LIBRARY, session=session, active=active, limit=limit)

    async def subscribe(self, session: str | None = None, *, lifecycle: bool = False) -> AsyncIterator[Event]:
        """Events emitted by runs (of one session, or all), plus run.ended, until close.

        lifecycle: also the supervisor's own events (session.message,
        session.stopped, run.started, run.tool_call, run.usage, run.fenced).
        A run's own events never come before its run.started (HeldEvents).

        Stale output fence: an event is checked again as it is handed out; if
        its session has moved to a newer generation meanwhile, it is dropped
        (and journaled as fenced) instead of delivered.

        A subscriber that falls behind by SUBSCRIBER_BACKLOG events loses the
        newest ones (never a `run.ended`), and then receives one
        `events.dropped` event whose data says how many it missed, so the
        supervisor's memory does not grow with a slow reader.
        """
        async for event in self.control.subscribe(LIBRARY, session, lifecycle=lifecycle):
            yield event

    async def call(self, request: "wire.Request | bytes | str", principal: Principal = LIBRARY) -> Any:
        """One verb of the control table (ipc/control.py), as `principal`: a request struct, or its JSON.

        Returns the verb's reply struct; raises ControlFault (a numbered Fault)
        for anything refused. This is the same path an RPC or the command line
        takes.
        """
        if isinstance(request, (bytes, str)):
            decoded: wire.Request = wire.decode_request(request.encode() if isinstance(request, str) else request)
        else:
            decoded = request
        return await self.control.call(principal, decoded)
