"""Sessions: a named conversation, at most one active run, a generation counter.

Unified run invalidation lives here. Every new message and every stop bumps
the session's generation *first*, in the caller's loop step; the broker's
pre-tool gate compares each request's generation with the session's, so an
older run can dispatch nothing more from that instant, before it is even
revoked. Then the old run's whole tree (its processes, and the sessions it
spawned) is revoked in one step and stopped, and only then does the new run
start, with every message that arrived meanwhile, combined in order.

Outputs are fenced the same way: an event, stream delta or result of an
older generation never reaches subscribers or becomes the session's answer;
it is journaled as `fenced`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

from ..egress.channel import GenerationCell
from ..errors import DeadstopError
from ..mechanisms.limits import Limits, Usage
from ..store.report import StopReport
from ..engine.stop import StopRequest
from ..engine.states import LIVE, RunState

if TYPE_CHECKING:
    from ..engine.run import AsyncRun
    from .registry import SessionRegistry

log = logging.getLogger("deadstop.sessions")


class SessionStopped(DeadstopError):
    """A message was dropped because its session was stopped before it started."""


@dataclasses.dataclass(frozen=True)
class AgentSpec:
    """What a session runs: registered with `register_agent`, or an ad-hoc callable."""

    name: str
    target: Any  # callable agent(message, **context), or an argv list
    tools: tuple[str, ...] = ()
    limits: Limits | None = None
    grace: float | None = None
    #: May a run of this agent, spawned as a sub-agent, use `sessions.stop`?
    #: Top-level runs may stop what they spawned; sub-agents may not unless True.
    may_stop_sessions: bool = False
    #: Agents whose sessions a run of this agent may send to / stop even if it
    #: did not spawn them (the agent-to-agent allow-list).
    peers: frozenset[str] = frozenset()
    #: Where its runs work (their own uid must be able to use it), extra
    #: environment, network ("none" | "host") and a private /tmp (None: the
    #: supervisor's default).
    cwd: str | None = None
    env: dict[str, str] | None = None
    network: str = "none"
    private_tmp: bool | None = None
    #: None: the supervisor's isolation; "strict": refuse unless every layer is there; "off": a
    #: trusted agent whose runs share the supervisor's identity (named unconfined in their reports)
    isolation: str | None = None


def combine(messages: list[Any]) -> Any:
    """Messages that arrived during one takeover become one input, in order."""
    if len(messages) == 1:
        return messages[0]
    if all(isinstance(m, str) for m in messages):
        return "\n\n".join(messages)
    return list(messages)


class AsyncSession:
    def __init__(self, registry: "SessionRegistry", key: str, agent: str, *, parent: "AsyncSession | None" = None,
                 label: str | None = None, generation: int = 0):
        self._registry = registry
        self.key = key
        self.agent = agent
        self.parent = parent
        self.label = label
        self.children: list[AsyncSession] = []
        self.gen = GenerationCell(generation)
        self.active_run: AsyncRun | None = None
        self.runs: list[str] = []
        self.ended_usage = Usage()  # of runs that have ended
        self.last_stop_source = "api"  # who last stopped this session's tree
        self.answer: Any = None
        self.answer_generation: int | None = None
        self.last_outcome: str | None = None
        self.aborted_last_run = False
        self.created_wall = time.time()
        self.updated_wall = self.created_wall
        self._inbox: list[tuple[Any, asyncio.Future[AsyncRun]]] = []
        self._driver: asyncio.Task[None] | None = None
        #: the run being started for it, from its creation until its start returns (then active_run)
        self.starting_run: AsyncRun | None = None
        self._ending: list[asyncio.Task[StopReport]] = []
        self._on_behalf_of: tuple[AsyncSession, int] | None = None  # who sent the queued messages

    # -- reading ---------------------------------------------------------------
    @property
    def generation(self) -> int:
        return self.gen.value

    @property
    def state(self) -> str:
        run = self.active_run
        if run is not None and run.state in LIVE:
            return "paused" if run.state is RunState.PAUSED else (
                "stopping" if run.state is RunState.STOPPING else "running")
        return "starting" if self._driver is not None and not self._driver.done() else "idle"

    @property
    def active(self) -> bool:
        return self.state != "idle"

    @property
    def usage(self) -> Usage:
        usage = Usage(**self.ended_usage.to_dict())
        run = self.active_run
        if run is not None and run.state in LIVE:
            usage.add(run.live_usage())
        return usage

    def descendants(self) -> list["AsyncSession"]:
        out: list[AsyncSession] = []
        stack = list(self.children)
        while stack:
            s = stack.pop()
            out.append(s)
            stack.extend(s.children)
        return out

    def is_ancestor_of(self, other: "AsyncSession") -> bool:
        node = other.parent
        while node is not None:
            if node is self:
                return True
            node = node.parent
        return False

    def info(self) -> dict[str, Any]:
        return {
            "key": self.key, "agent": self.agent, "state": self.state, "generation": self.generation,
            "parent": self.parent.key if self.parent else None, "label": self.label,
            "children": [c.key for c in self.children], "active_run": self.active_run.id if self.active_run
            and self.active_run.state in LIVE else None, "runs": list(self.runs), "usage": self.usage.to_dict(),
            "last_outcome": self.last_outcome, "aborted_last_run": self.aborted_last_run,
            "answer_generation": self.answer_generation,
            "created_wall": self.created_wall, "updated_wall": self.updated_wall,
        }

    # -- generation ---------------------------------------------------------------
    def bump(self) -> int:
        """New generation: every output and request of older runs is stale from now on."""
        self.gen.value += 1
        self.updated_wall = time.time()
        self._registry.store(self)
        return self.gen.value

    def is_current(self, generation: int) -> bool:
        return generation == self.gen.value

    # -- messages and takeover -------------------------------------------------------
    async def send(self, message: Any, *, on_behalf_of: "tuple[AsyncSession, int] | None" = None) -> "AsyncRun":
        """Start a run with `message`; if a run is active, take it over.

        Takeover: the generation is bumped and the active run's tree is revoked
        in this very step; it is then stopped, and the new run starts with
        every message that arrived meanwhile, combined in order. Returns the
        run that received this message.
        """
        self._registry.engine.check_open()
        fut = asyncio.get_running_loop().create_future()
        self.bump()
        self._inbox.append((message, fut))
        self._on_behalf_of = on_behalf_of
        self._registry.engine.journal.message(self.key, self.generation, message)
        self._registry.engine.publish_session(self.key, "session.message", {"generation": self.generation},
                                              self.generation)
        self._end_tree(mode="stop", source="takeover", reason="a new message superseded the run",
                       include_self=True, bump=False, clear_inbox=False)
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._drive(), name=f"deadstop-session-{self.key}")
        return await asyncio.shield(fut)

    async def _drive(self) -> None:
        while self._inbox:
            # A run that started while these messages queued is superseded too.
            self._end_tree(mode="stop", source="takeover", reason="a new message superseded the run",
                           include_self=True, bump=False, clear_inbox=False)
            ending, self._ending = self._ending, []
            if ending:
                await asyncio.gather(*(asyncio.shield(t) for t in ending), return_exceptions=True)
            if not self._inbox:
                break
            batch, self._inbox = self._inbox, []
            messages = [m for m, _ in batch]
            if self._sender_superseded():
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(SessionStopped(f"session {self.key}: the run that sent the message "
                                                         "was stopped or superseded before it started"))
                continue
            generation = self.generation
            try:
                run = await self._registry.start_run(self, combine(messages), messages)
                if self._sender_superseded():  # the sender ended while this child was starting
                    self._end_tree(mode="kill", source="parent", reason="the sending run was stopped",
                                   include_self=True, bump=True, clear_inbox=True)
                elif not self.is_current(run.generation):  # stopped (or superseded) while starting
                    run.revoke(self.last_stop_source, "the session was stopped while this run was starting")
                    self._ending.append(run.begin_end("kill", self.last_stop_source, "superseded while starting"))
            except BaseException as exc:
                err = exc if isinstance(exc, Exception) else DeadstopError(repr(exc))
                if isinstance(exc, Exception) and not self.is_current(generation):
                    # Stopped or superseded before the spawner was asked: the start was given up, nothing forked.
                    err = SessionStopped(f"session {self.key}: stopped before the run for this message started")
                    err.__cause__ = exc
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(err)
                if not isinstance(exc, Exception):
                    raise
                continue
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(run)

    def _sender_superseded(self) -> bool:
        """Was this message sent by a run (a parent session's) that has since been superseded?"""
        sender = self._on_behalf_of
        return sender is not None and not sender[0].is_current(sender[1])

    # -- ending ------------------------------------------------------------------------
    def _end_tree(self, *, mode: str, source: str, reason: str, include_self: bool, bump: bool,
                  clear_inbox: bool, grace: float | None = None) -> list[asyncio.Task[StopReport]]:
        """Revoke every live run of this session's tree in one step, then start their stops.

        Descendants first in the revocation order does not matter (one loop
        step, no await between); signals go out when the stop tasks run,
        after every channel of the tree is closed.
        """
        requested_at = time.monotonic_ns()  # each report's requested_at: before the revokes below
        StopRequest.of(mode, source, reason, 0.0, 0)  # an unknown mode or source fails here, before any revoke
        runs = self.revoke_tree(source=source, reason=reason, include_self=include_self, bump=bump,
                                clear_inbox=clear_inbox)
        self._registry.engine.journal.commit_now()  # the whole tree's revocations, on record before any signal
        return self.finish_tree(runs, mode, source, reason, grace, requested_at)

    def revoke_tree(self, *, source: str, reason: str, include_self: bool = True, bump: bool = True,
                    clear_inbox: bool = True) -> "list[AsyncRun]":
        """Revoke every live run of the tree, uncommitted (the caller commits once, before any signal)."""
        sessions = ([self] if include_self else []) + self.descendants()
        for s in sessions:
            s.last_stop_source = source  # a run of it still starting is ended with the same source
            if s is not self or bump:
                s.bump()
            if s is not self or clear_inbox:
                s._drop_inbox(reason)
        runs = [run for s in sessions for run in s.live_runs()]
        for run in runs:
            run.revoke(source, reason, commit=False)
        return runs

    def finish_tree(self, runs: "list[AsyncRun]", mode: str, source: str, reason: str, grace: float | None,
                    requested_at: int) -> list[asyncio.Task[StopReport]]:
        """Start the stops of runs `revoke_tree` revoked (their revocations committed)."""
        tasks = [run.begin_end(mode, source, reason, grace, requested_at) for run in runs]
        self._ending.extend(tasks)
        return tasks

    def live_runs(self) -> "list[AsyncRun]":
        """Its run, if live, and one still starting. A stop ends that one with the rest (signalled the
        moment it is attached) rather than leaving it to the look at its generation once its start
        returns: the stop's reports then include it."""
        return [run for run in (self.active_run, self.starting_run) if run is not None and run.state in LIVE]

    def busy(self) -> bool:
        """Something of the tree is live, starting, or waits in an inbox: a stop of it would end something."""
        return any(s.active or s._inbox for s in [self, *self.descendants()])

    def close_inbox(self, reason: str) -> None:
        """Nothing queued will start (the supervisor is closing): fail the queued messages, stop driving."""
        self._drop_inbox(reason)
        if self._driver is not None and not self._driver.done():
            self._driver.cancel()

    def _drop_inbox(self, reason: str) -> None:
        inbox, self._inbox = self._inbox, []
        for _message, fut in inbox:
            if not fut.done():
                fut.set_exception(SessionStopped(f"session {self.key}: message dropped ({reason})"))

    def begin_end(self, mode: str, *, source: str, reason: str,
                  grace: float | None = None) -> list[asyncio.Task[StopReport]]:
        """Bump, drop queued messages and revoke the whole tree now; the returned tasks finish the stops."""
        tasks = self._end_tree(mode=mode, source=source, reason=reason, include_self=True, bump=True,
                               clear_inbox=True, grace=grace)
        return self._stopped(tasks, mode, source)

    def end_revoked(self, runs: "list[AsyncRun]", mode: str, source: str, reason: str, grace: float | None,
                    requested_at: int) -> list[asyncio.Task[StopReport]]:
        """After revoke_tree and its commit (sessions.stop_all does both for every tree at once): begin the
        runs' stops, then as begin_end does."""
        return self._stopped(self.finish_tree(runs, mode, source, reason, grace, requested_at), mode, source)

    def _stopped(self, tasks: list[asyncio.Task[StopReport]], mode: str, source: str) -> list[asyncio.Task[StopReport]]:
        """The tree's stops are begun: kill its session-scoped servers, tell the event stream (session.stopped)."""
        tasks = tasks + self._end_servers()
        self._registry.engine.publish_session(self.key, "session.stopped", {"mode": mode, "source": source,
                                              "runs": len(tasks)}, self.generation)
        return tasks

    async def stop(self, grace: float | None = None, *, source: str = "api",
                   reason: str = "session stop requested") -> list[StopReport]:
        """Bump the generation, drop queued messages, revoke the whole descendant tree, stop it."""
        return await self._await_reports(self.begin_end("stop", source=source, reason=reason, grace=grace))

    async def kill(self, *, source: str = "api", reason: str = "session kill requested") -> list[StopReport]:
        tasks = self._end_tree(mode="kill", source=source, reason=reason, include_self=True, bump=True,
                               clear_inbox=True)
        tasks += self._end_servers()
        return await self._await_reports(tasks)

    def _end_servers(self) -> list[asyncio.Task[StopReport]]:
        """The session-scoped MCP servers of this tree: killed with it (an effect running inside is cut too)."""
        return self._registry.engine.mcp.end_sessions([self.key, *(s.key for s in self.descendants())])

    @staticmethod
    async def _await_reports(tasks: list[asyncio.Task[StopReport]]) -> list[StopReport]:
        return await await_reports(tasks)

    async def pause(self) -> bool:
        """Hold egress and freeze this session's active run and all its descendants' runs.

        True once all of them are frozen; False if there was nothing to pause
        (an idle session) or a run could not be frozen in time.
        """
        runs = self._live_runs()
        if not runs:
            return False
        for run in runs:  # egress first, for the whole tree, before any freeze
            if run.state is RunState.RUNNING:
                self._registry.engine.broker.hold(run.channel)
        results = await asyncio.gather(*(r.pause() for r in runs if r.state in (RunState.RUNNING,
                                                                                  RunState.PAUSED)))
        return all(results)

    async def resume(self) -> bool:
        runs = self._live_runs()
        results = await asyncio.gather(*(r.resume() for r in runs if r.state is RunState.PAUSED))
        return all(results)

    def _live_runs(self) -> list["AsyncRun"]:
        sessions = [self] + self.descendants()
        return [s.active_run for s in sessions if s.active_run is not None and s.active_run.state in LIVE]

    # -- called by the supervisor when a run of this session ends --------------------------
    def run_created(self, run: "AsyncRun") -> None:
        self.starting_run = run

    def run_ended(self, run: "AsyncRun") -> None:
        self.ended_usage.add(run.usage)
        self.updated_wall = time.time()
        if run is self.active_run:
            self.last_outcome = run.state.value
            self.aborted_last_run = run.state in (RunState.STOPPED, RunState.KILLED)
        self._registry.store(self)

    def offer_answer(self, run: "AsyncRun", value: Any) -> bool:
        """The run's return value becomes the answer only if its generation is current."""
        if not self.is_current(run.generation):
            return False
        self.answer, self.answer_generation = value, run.generation
        self._registry.store(self)
        return True


async def await_reports(tasks: list[asyncio.Task[StopReport]]) -> list[StopReport]:
    """The reports of stops begun together (shielded: a cancelled waiter does not cancel a stop)."""
    results = await asyncio.gather(*(asyncio.shield(t) for t in tasks), return_exceptions=True)
    reports = [r for r in results if isinstance(r, StopReport)]
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
            raise r
    return reports
