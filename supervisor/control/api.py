"""ControlAPI: every verb of ipc/control.py, implemented once, for a Principal.

Two ways in, one implementation:

* object verbs (`send`, `stop_session`, `runs`, ...) return the engine's and
  the session layer's own objects (AsyncSession, AsyncRun, StopReport); the
  asyncio and blocking facades and the `sessions.*` run tools call these;
* `call(principal, request)` takes a request struct of the verb table and
  returns its reply struct, for callers in another process (RPC, CLI,
  console), raising ControlFault with a numbered Fault.

Policy is applied here and nowhere else (policy.py). A verb that ends runs
does its checks, then bumps the generation and revokes in the caller's own
loop step: there is no await before `session.stop()` / `run.begin_end()` on
any path, so nothing the tree sends after the call is dispatched.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import time
from typing import TYPE_CHECKING, Any, AsyncIterator

from ...ipc import control as wire
from ...ipc.control import ControlFault, Fault
from .._version import __version__
from ..engine.events import Event
from ..engine.run import AsyncRun
from ..engine.states import LIVE
from ..errors import (DeadstopError, InvalidTarget, InvalidTransition, LimitUnenforceable, RunNotFound,
                      SessionNotFound, StopIncomplete, SupervisorClosed)
from ..store import queries
from ..store.report import StopReport
from ..sessions.session import await_reports
from .policy import LIBRARY, Policy, Principal

if TYPE_CHECKING:
    from ..engine.engine import Engine
    from ..sessions.registry import SessionRegistry
    from ..sessions.session import AgentSpec, AsyncSession

_FAULTS: list[tuple[type[BaseException], Fault]] = [
    (SessionNotFound, Fault.NO_SUCH_SESSION), (RunNotFound, Fault.NO_SUCH_RUN),
    (InvalidTransition, Fault.NOT_RUNNING), (LimitUnenforceable, Fault.LIMIT_UNENFORCEABLE),
    (InvalidTarget, Fault.INVALID_TARGET), (SupervisorClosed, Fault.SHUTTING_DOWN),
    (StopIncomplete, Fault.STOP_INCOMPLETE), (ValueError, Fault.BAD_ARGUMENTS), (DeadstopError, Fault.FAILED),
]


#: Idempotency keys of sessions.send remembered (the oldest forgotten first). They live as
#: long as the supervisor: a restarted daemon does not know the keys of the previous one.
IDEMPOTENCY_KEYS = 10_000

_REPORT_FIELDS = frozenset(f.name for f in dataclasses.fields(StopReport))


def fault_of(exc: BaseException) -> ControlFault:
    """The numbered fault a library error stands for on the wire."""
    if isinstance(exc, ControlFault):
        return exc
    for kind, fault in _FAULTS:
        if isinstance(exc, kind):
            detail = exc.report.to_dict() if isinstance(exc, StopIncomplete) else None
            return ControlFault(fault, str(exc), detail=detail)
    return ControlFault(Fault.FAILED, f"{type(exc).__name__}: {exc}")


class ControlAPI:
    def __init__(self, engine: "Engine", registry: "SessionRegistry"):
        self._engine = engine
        self._registry = registry
        self.policy = Policy(registry)
        self._started = time.monotonic()
        #: (caller kind, caller name, session, idempotency key) -> the first send's reply
        self._sent: collections.OrderedDict[tuple[str, str, str, str], asyncio.Future[wire.SendReply]] = \
            collections.OrderedDict()

    # -- sessions ---------------------------------------------------------------------------------
    def _verb(self, who: Principal, name: str) -> None:
        self.policy.check_scope(who, wire.VERBS[name])

    def _session(self, who: Principal, key: str) -> "AsyncSession":
        """A session to read: one the caller may not see is reported as absent."""
        session = self._registry.by_key.get(key)
        if session is None or not self.policy.may_see(who, session):
            raise SessionNotFound(f"no session {key!r}")
        return session

    def sessions(self, who: Principal = LIBRARY, *, active: bool | None = None, min_tokens: int | None = None,
                 agent: str | None = None, older_than: float | None = None) -> list["AsyncSession"]:
        self._verb(who, "sessions.list")
        found = self._registry.find(active=active, min_tokens=min_tokens, agent=agent, older_than=older_than)
        return [s for s in found if self.policy.may_see(who, s)]

    def session(self, who: Principal, key: str) -> "AsyncSession":
        self._verb(who, "sessions.show")
        return self._session(who, key)

    def open_session(self, who: Principal, key: str, agent: Any = None, *, parent: "AsyncSession | None" = None,
                     label: str | None = None) -> "AsyncSession":
        """Get the session `key`, creating it for `agent` (a registered name, or in-process a callable)."""
        existing = self._registry.by_key.get(key)
        if existing is not None and agent is None:
            return self.session(who, key)
        self._verb(who, "sessions.send")
        if who.kind == "run":
            raise ControlFault(Fault.POLICY_DENIED, f"{who.describe()} creates sessions with sessions.spawn only")
        if who is not LIBRARY and agent is not None and not isinstance(agent, str):
            raise ControlFault(Fault.BAD_ARGUMENTS, "an agent from outside the process must be a registered name")
        return self._registry.session(key, agent, parent=parent, label=label)

    async def send(self, who: Principal, key: str, message: Any, *, agent: Any = None) -> AsyncRun:
        """A message to the session (created for `agent` if new); takes over its active run."""
        self._verb(who, "sessions.send")
        if who.kind == "run" or (agent is None and key in self._registry.by_key):
            target = self._registry.get(key)  # acting on it: check_may_act says why not
        else:
            target = self.open_session(who, key, agent)
        self.policy.check_may_act(who, target, "send to")
        if who.kind == "run":
            caller = self.policy.caller_session(who)
            return await target.send(message, on_behalf_of=(caller, caller.generation))
        return await target.send(message)

    async def spawn(self, who: Principal, agent: str, message: Any,
                    label: str | None = None) -> tuple["AsyncSession", AsyncRun]:
        """A run starts a sub-agent session below its own, on behalf of its current generation."""
        self._verb(who, "sessions.spawn")
        caller = self.policy.caller_session(who)
        if agent not in self._registry.agents:
            raise ControlFault(Fault.POLICY_DENIED, f"agent {agent!r} is not registered; sub-agents must be "
                                                    "registered agents")
        n = len(caller.children) + 1
        while f"{caller.key}/{label or agent}-{n}" in self._registry.by_key:  # cleanup may have removed siblings
            n += 1
        child = self._registry.session(f"{caller.key}/{label or agent}-{n}", agent, parent=caller, label=label)
        run = await child.send(message, on_behalf_of=(caller, caller.generation))
        return child, run

    def _stoppable(self, who: Principal, key: str, verb: str) -> "AsyncSession":
        self._verb(who, verb)
        self.policy.check_may_stop(who)
        target = self._registry.get(key)
        self.policy.check_may_act(who, target, "stop")
        return target

    @staticmethod
    def _reason(who: Principal, requested: str) -> str:
        """The revoke reason on record: what was asked, and by whom when not in-process."""
        return requested if who is LIBRARY else f"{requested} by {who.describe()}"

    async def stop_session(self, who: Principal, key: str, grace: float | None = None) -> list[StopReport]:
        target = self._stoppable(who, key, "sessions.stop")
        return await target.stop(grace, source=who.source, reason=self._reason(who, "session stop requested"))

    def begin_stop_session(self, who: Principal, key: str, grace: float | None = None) -> list[str]:
        """Revoke the session's tree and start its stop; returns the revoked run ids without waiting."""
        target = self._stoppable(who, key, "sessions.stop")
        live = [run.id for s in [target, *target.descendants()] for run in s.live_runs()]
        target.begin_end("stop", source=who.source, reason=self._reason(who, "session stop requested"), grace=grace)
        return live

    def begin_stop_all(self, who: Principal, grace: float | None = None, *,
                       kill: bool = False) -> tuple[dict[str, list[str]], list[asyncio.Task[StopReport]]]:
        """Every busy top-level session's tree, revoked in one step and committed once; their stops begun."""
        self._verb(who, "sessions.stop_all")
        if who.kind == "run":  # its own session and its ancestors would be among them
            raise ControlFault(Fault.POLICY_DENIED, "a run may not stop every session")
        mode = "kill" if kill else "stop"
        return self._registry.begin_end_all(mode, source=who.source, reason=self._reason(who, f"{mode} all requested"),
                                            grace=grace)

    async def stop_all_sessions(self, who: Principal, grace: float | None = None, *,
                                kill: bool = False) -> tuple[dict[str, list[str]], list[StopReport]]:
        trees, tasks = self.begin_stop_all(who, grace, kill=kill)
        return trees, await await_reports(tasks)

    async def kill_session(self, who: Principal, key: str) -> list[StopReport]:
        target = self._stoppable(who, key, "sessions.kill")
        return await target.kill(source=who.source, reason=self._reason(who, "session kill requested"))

    async def pause_session(self, who: Principal, key: str) -> bool:
        target = self._stoppable(who, key, "sessions.pause")
        return await target.pause()

    async def resume_session(self, who: Principal, key: str) -> bool:
        target = self._stoppable(who, key, "sessions.resume")
        return await target.resume()

    async def cleanup(self, who: Principal, older_than: float = 3600, *, dry_run: bool = False) -> list[str]:
        self._verb(who, "sessions.cleanup")
        return await self._registry.cleanup(older_than, dry_run=dry_run)

    # -- runs ---------------------------------------------------------------------------------------
    def _run_visible(self, who: Principal, session_key: str | None) -> bool:
        if who.kind != "run":
            return True
        owner = self._registry.by_key.get(session_key) if session_key else None
        return owner is not None and self.policy.may_see(who, owner)

    def live_run(self, who: Principal, run_id: str) -> AsyncRun:
        """A run still in memory (live, or ended moments ago); RunNotFound otherwise."""
        self._verb(who, "runs.show")
        run = self._engine.find_run(run_id)
        if run is None or not self._run_visible(who, run.owner.key if run.owner else None):
            raise RunNotFound(f"no run {run_id!r} in supervisor {self._engine.id}")
        return run

    def run_info(self, who: Principal, run_id: str) -> wire.RunInfo:
        """Any run this store knows, live or ended long ago."""
        self._verb(who, "runs.show")
        run = self._engine.find_run(run_id)
        if run is not None:
            if not self._run_visible(who, run.owner.key if run.owner else None):
                raise RunNotFound(f"no run {run_id!r}")
            return run_info(run)
        row = queries.run(self._engine.journal.db, run_id)
        if row is None or not self._run_visible(who, row.session):
            raise RunNotFound(f"no run {run_id!r} in this state directory")
        return stored_run_info(row)

    def runs(self, who: Principal = LIBRARY, *, session: str | None = None, active: bool | None = None,
             limit: int = 1000) -> list[wire.RunInfo]:
        """Live runs from memory, ended ones from the store; oldest first."""
        self._verb(who, "runs.list")
        live = [r for r in self._engine.runs.values() if r.state in LIVE and (session is None or
                (r.owner is not None and r.owner.key == session))]
        out = {r.id: run_info(r) for r in live}
        if active is not True:
            self._engine.journal.commit_now()
            for row in queries.runs(self._engine.journal.db, session=session, ended=True, limit=limit):
                out.setdefault(row.id, stored_run_info(row))
        if active is False:
            out = {k: v for k, v in out.items() if v.state not in {s.value for s in LIVE}}
        infos = [i for i in out.values() if self._run_visible(who, i.session)]
        return infos[-limit:]

    async def stop_run(self, who: Principal, run_id: str, grace: float | None = None) -> StopReport:
        """Stop one run; idempotent: a run that already ended answers with its report."""
        run = self._for_stop(who, run_id, "runs.stop")
        if isinstance(run, StopReport):
            return run
        return await run.stop(grace, source=who.source, reason=self._reason(who, "stop requested"))

    async def kill_run(self, who: Principal, run_id: str) -> StopReport:
        run = self._for_stop(who, run_id, "runs.kill")
        if isinstance(run, StopReport):
            return run
        return await run.kill(source=who.source, reason=self._reason(who, "kill requested"))

    def _for_stop(self, who: Principal, run_id: str, verb: str) -> AsyncRun | StopReport:
        """The run to end, or the stored report of one that ended and left memory."""
        self._verb(who, verb)
        run = self._engine.find_run(run_id)
        if run is None:
            row = queries.run(self._engine.journal.db, run_id)
            if row is None or not self._run_visible(who, row.session):
                raise RunNotFound(f"no run {run_id!r} in this state directory")
            if row.report is None:
                raise InvalidTransition(f"run {run_id} belongs to supervisor {row.supervisor_id}, not this one")
            return StopReport(**{k: v for k, v in row.report.items() if k in _REPORT_FIELDS})
        if who.kind == "run":
            self.policy.check_may_stop(who)
            owner = self._registry.by_key.get(run.owner.key) if run.owner else None
            if owner is None:
                raise ControlFault(Fault.POLICY_DENIED, f"{who.describe()} may not stop run {run_id}: no session")
            self.policy.check_may_act(who, owner, "stop")
        return run

    def egress(self, who: Principal, run_id: str, offset: int = 0, limit: int = 100) -> wire.EgressReply:
        """A page of the run's egress log, read from the journal, and the after-revoke check over all of it."""
        self._verb(who, "runs.egress")
        if offset < 0 or not 1 <= limit <= 1000:
            raise ControlFault(Fault.BAD_ARGUMENTS, "offset must be >= 0 and limit 1..1000")
        self.run_info(who, run_id)  # RunNotFound for a run the caller may not see
        db = self._engine.journal.db
        self._engine.journal.commit_now()  # the newest rows too
        rows, total = queries.egress_page(db, run_id, offset, limit)
        revoked = queries.revocation(db, run_id)
        late = queries.dispatched_rows_after_revoke(db, run_id)
        return wire.EgressReply(run_id=run_id, rows=[wire.EgressRow(**r) for r in rows], offset=offset, total=total,
                                revoked_at=revoked[0] if revoked else None, revoke_source=revoked[1] if revoked else None,
                                dispatched_after_revoke=[wire.EgressRow(**r) for r in late],
                                outlived_revoke=[wire.EgressRow(**r) for r in
                                                 queries.rows_decided(db, run_id, "outlived_revoke")])

    # -- agents, events, health -------------------------------------------------------------------------
    def agents(self, who: Principal = LIBRARY) -> list["AgentSpec"]:
        self._verb(who, "agents.list")
        return list(self._registry.agents.values())

    async def subscribe(self, who: Principal, session: str | None = None, *,
                        lifecycle: bool = False) -> AsyncIterator[Event]:
        self._verb(who, "events.subscribe")
        if who.kind == "run":
            raise ControlFault(Fault.FORBIDDEN, "a run may not subscribe to events")
        async for event in self._engine.events(session, lifecycle=lifecycle):
            yield event

    def health(self, who: Principal = LIBRARY) -> wire.Health:
        self._verb(who, "health")
        engine = self._engine
        return wire.Health(supervisor_id=engine.id, version=__version__, pid=os.getpid(),
                           containment=engine.containment, isolation=engine.isolation.to_dict(),
                           live_runs=sum(1 for r in engine.runs.values() if r.state in LIVE),
                           sessions=len(self._registry.by_key), uptime=time.monotonic() - self._started)

    # -- the wire ------------------------------------------------------------------------------------
    async def call(self, who: Principal, request: wire.Request) -> Any:
        """Run one request struct for `who`; its reply struct, or ControlFault. (Not events.subscribe.)"""
        try:
            return await self._call(who, request)
        except ControlFault:
            raise
        except Exception as exc:
            raise fault_of(exc) from exc

    async def _call(self, who: Principal, r: wire.Request) -> Any:
        if isinstance(r, wire.SessionsList):
            return [session_info(s) for s in self.sessions(who, active=r.active, min_tokens=r.min_tokens,
                                                           agent=r.agent, older_than=r.older_than)]
        if isinstance(r, wire.SessionsShow):
            return session_info(self.session(who, r.key))
        if isinstance(r, wire.SessionsSend):
            if r.agent is not None and r.agent not in self._registry.agents:
                raise ControlFault(Fault.NO_SUCH_AGENT, f"agent {r.agent!r} is not registered "
                                                        f"(registered: {sorted(self._registry.agents)})")
            return await self._idempotent(who, r)
        if isinstance(r, wire.SessionsSpawn):
            child, run = await self.spawn(who, r.agent, r.message, r.label)
            return wire.SendReply(key=child.key, run_id=run.id, generation=child.generation)
        if isinstance(r, wire.SessionsStop):
            if not r.wait:
                revoked = self.begin_stop_session(who, r.key, r.grace)
                return wire.StopReply(key=r.key, already_ended=not revoked, waited=False, revoked=revoked)
            return _stop_reply(r.key, await self.stop_session(who, r.key, r.grace))
        if isinstance(r, wire.SessionsKill):
            return _stop_reply(r.key, await self.kill_session(who, r.key))
        if isinstance(r, wire.SessionsStopAll):
            if not r.wait:
                trees, _tasks = self.begin_stop_all(who, r.grace, kill=r.kill)
                return wire.StopAllReply(sessions=list(trees), waited=False, trees=trees,
                                         revoked=[run_id for ids in trees.values() for run_id in ids])
            trees, reports = await self.stop_all_sessions(who, r.grace, kill=r.kill)
            return wire.StopAllReply(sessions=list(trees), trees=trees, reports=[rep.to_dict() for rep in reports],
                                     revoked=[run_id for ids in trees.values() for run_id in ids])
        if isinstance(r, wire.SessionsPause):
            return await self.pause_session(who, r.key)
        if isinstance(r, wire.SessionsResume):
            return await self.resume_session(who, r.key)
        if isinstance(r, wire.SessionsCleanup):
            return await self.cleanup(who, r.older_than, dry_run=r.dry_run)
        if isinstance(r, wire.RunsList):
            return self.runs(who, session=r.session, active=r.active, limit=r.limit)
        if isinstance(r, wire.RunsShow):
            return self.run_info(who, r.run_id)
        if isinstance(r, (wire.RunsStop, wire.RunsKill)):
            try:
                if isinstance(r, wire.RunsStop):
                    await self.stop_run(who, r.run_id, r.grace)
                else:
                    await self.kill_run(who, r.run_id)
            except StopIncomplete:
                pass  # the report below names the survivors
            return self.run_info(who, r.run_id)
        if isinstance(r, wire.RunsEgress):
            return self.egress(who, r.run_id, r.offset, r.limit)
        if isinstance(r, wire.AgentsList):
            return [agent_info(a) for a in self.agents(who)]
        if isinstance(r, wire.HealthCheck):
            return self.health(who)
        raise ControlFault(Fault.UNKNOWN_VERB, f"verb {type(r).__name__} is not served by call()")


    async def _idempotent(self, who: Principal, r: wire.SessionsSend) -> wire.SendReply:
        """sessions.send, once per idempotency key: a retry gets the first attempt's reply (or waits for it)."""
        if r.idempotency_key is None:
            run = await self.send(who, r.key, r.message, agent=r.agent)
            return wire.SendReply(key=r.key, run_id=run.id, generation=run.generation)
        slot = (who.kind, who.name, r.key, r.idempotency_key)
        first = self._sent.get(slot)
        if first is not None:
            self._sent.move_to_end(slot)
            return await asyncio.shield(first)
        fut: asyncio.Future[wire.SendReply] = asyncio.get_running_loop().create_future()
        self._sent[slot] = fut
        while len(self._sent) > IDEMPOTENCY_KEYS:
            self._sent.popitem(last=False)
        try:
            run = await self.send(who, r.key, r.message, agent=r.agent)
        except BaseException as exc:
            self._sent.pop(slot, None)  # a failed send may be retried for real
            fut.set_exception(exc)
            fut.exception()  # retrieved: a retry that raced this one re-raises it
            raise
        fut.set_result(wire.SendReply(key=r.key, run_id=run.id, generation=run.generation))
        return fut.result()


def _stop_reply(key: str, reports: list[StopReport]) -> wire.StopReply:
    return wire.StopReply(key=key, reports=[x.to_dict() for x in reports], already_ended=not reports)


# -- info structs from live objects ----------------------------------------------------------------------
def session_info(s: "AsyncSession") -> wire.SessionInfo:
    return wire.SessionInfo(**s.info())


def run_info(run: AsyncRun) -> wire.RunInfo:
    return wire.RunInfo(id=run.id, state=run.state.value, kind=run.kind, target=run.target,
                        session=run.owner.key if run.owner else None, generation=run.generation, pid=run.pid,
                        containment=getattr(run.containment, "name", None), tools=list(run.tools),
                        usage=run.live_usage().to_dict(), report=run.report.to_dict() if run.report else None)


def stored_run_info(row: queries.RunRow) -> wire.RunInfo:
    return wire.RunInfo(id=row.id, state=row.state, kind=row.kind, target=row.target, session=row.session,
                        generation=row.generation, pid=row.pid, containment=row.containment, tools=row.tools,
                        usage=row.usage, report=row.report)


def agent_info(a: "AgentSpec") -> wire.AgentInfo:
    limits = {k: v for k, v in (a.limits.to_dict() if a.limits is not None else {}).items() if v is not None}
    return wire.AgentInfo(name=a.name, kind="python" if callable(a.target) else "argv", tools=list(a.tools),
                          limits=limits, may_stop_sessions=a.may_stop_sessions, peers=sorted(a.peers))
