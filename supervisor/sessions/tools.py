"""Built-in egress tools with which a run manages sub-agent sessions.

    sessions.spawn(agent, message, label=None) -> {"key", "run_id", "generation"}
    sessions.list()                            -> [session info, ...]
    sessions.send(key, message)                -> {"key", "run_id", "generation"}
    sessions.stop(key, kill=False)             -> {"key", "runs_stopped", "outcomes"}

They are ordinary tools: a run can use one only if its agent's allow-list
names it. Policy, on top of that (every refusal is a POLICY_DENIED error to
the run and a journal row):

* A run may send to or stop only sessions its own session spawned (directly
  or below), or sessions of agents named in its agent's `peers` allow-list.
* A sub-agent (a session with a parent) may not use `sessions.stop` unless
  its agent was registered with `may_stop_sessions=True`.
* No session may act on itself or on its ancestors.

A child is started on behalf of its parent's current generation: if the
parent is stopped or superseded while the child is starting, the child is
stopped as soon as it exists, so no child outlives its stopped ancestor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..egress.tools import PolicyDenied, ToolContext

if TYPE_CHECKING:
    from ..engine.engine import AsyncSupervisor
    from .session import AsyncSession

SPAWN, LIST, SEND, STOP = "sessions.spawn", "sessions.list", "sessions.send", "sessions.stop"
NAMES = (SPAWN, LIST, SEND, STOP)


def _caller(sup: "AsyncSupervisor", ctx: ToolContext) -> "AsyncSession":
    run = sup.runs.get(ctx.run_id)
    if run is None or run.session is None:
        raise PolicyDenied(f"run {ctx.run_id} is not part of a session; {ctx.tool} needs one")
    return run.session


def check_may_act(sup: "AsyncSupervisor", caller: "AsyncSession", target: "AsyncSession", verb: str) -> None:
    if target is caller or target.is_ancestor_of(caller):
        raise PolicyDenied(f"session {caller.key} may not {verb} itself or an ancestor ({target.key})")
    if caller.is_ancestor_of(target):
        return
    spec = sup.agents.get(caller.agent)
    if spec is not None and target.agent in spec.peers:
        return
    raise PolicyDenied(f"session {caller.key} (agent {caller.agent!r}) did not spawn {target.key} and its agent "
                       f"may not act on agent {target.agent!r}: add it to register_agent(..., peers=[...])")


def check_may_stop(sup: "AsyncSupervisor", caller: "AsyncSession") -> None:
    if caller.parent is None:
        return
    spec = sup.agents.get(caller.agent)
    if spec is None or not spec.may_stop_sessions:
        raise PolicyDenied(f"session {caller.key} is a sub-agent (agent {caller.agent!r}); sub-agents may not use "
                           f"{STOP} unless the agent is registered with may_stop_sessions=True")


def register(sup: "AsyncSupervisor") -> None:
    async def spawn(agent: str, message: Any, label: str | None = None, *, ctx: ToolContext) -> dict[str, Any]:
        caller = _caller(sup, ctx)
        if agent not in sup.agents:
            raise PolicyDenied(f"agent {agent!r} is not registered; sub-agents must be registered agents")
        n = len(caller.children) + 1
        while f"{caller.key}/{label or agent}-{n}" in sup.registry.by_key:  # cleanup may have removed siblings
            n += 1
        key = f"{caller.key}/{label or agent}-{n}"
        child = sup.session(key, agent, parent=caller, label=label)
        run = await child.send(message, on_behalf_of=(caller, caller.generation))
        return {"key": key, "run_id": run.id, "generation": child.generation}

    async def list_sessions(*, ctx: ToolContext) -> list[dict[str, Any]]:
        caller = _caller(sup, ctx)
        spec = sup.agents.get(caller.agent)
        peers = spec.peers if spec is not None else frozenset()
        visible = caller.descendants() + [s for s in sup.sessions() if s.agent in peers and s is not caller
                                          and not s.is_ancestor_of(caller) and not caller.is_ancestor_of(s)]
        return [s.info() for s in visible]

    async def send(key: str, message: Any, *, ctx: ToolContext) -> dict[str, Any]:
        caller = _caller(sup, ctx)
        target = _target(sup, key)
        check_may_act(sup, caller, target, "send to")
        run = await target.send(message, on_behalf_of=(caller, caller.generation))
        return {"key": key, "run_id": run.id, "generation": target.generation}

    async def stop(key: str, kill: bool = False, *, ctx: ToolContext) -> dict[str, Any]:
        caller = _caller(sup, ctx)
        check_may_stop(sup, caller)
        target = _target(sup, key)
        check_may_act(sup, caller, target, "stop")
        source, reason = "parent", f"stopped by session {caller.key}"
        reports = await (target.kill(source=source, reason=reason) if kill
                         else target.stop(source=source, reason=reason))
        return {"key": key, "runs_stopped": len(reports), "outcomes": [r.outcome for r in reports]}

    sup.tools.register(SPAWN, spawn)
    sup.tools.register(LIST, list_sessions)
    sup.tools.register(SEND, send)
    sup.tools.register(STOP, stop)


def _target(sup: "AsyncSupervisor", key: str) -> "AsyncSession":
    from ..errors import SessionNotFound

    try:
        return sup.get_session(key)
    except SessionNotFound:
        raise PolicyDenied(f"no session {key!r}") from None
