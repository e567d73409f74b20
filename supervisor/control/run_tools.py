"""The `sessions.*` egress tools: a run's way to the control API.

    sessions.spawn(agent, message, label=None) -> {"key", "run_id", "generation"}
    sessions.list()                            -> [session info, ...]
    sessions.send(key, message)                -> {"key", "run_id", "generation"}
    sessions.stop(key, kill=False)             -> {"key", "runs_stopped", "outcomes"}

They are ordinary tools: a run can use one only if its agent's allow-list
names it. Each call is a ControlAPI verb for the calling run's Principal, so
the policy is the control policy (policy.py): a run acts only on sessions it
spawned or of its agent's peers, never on itself or an ancestor, and a
sub-agent stops sessions only with `may_stop_sessions`. A refusal reaches the
run as POLICY_DENIED (15) and is journaled.

A child is started on behalf of its parent's current generation: if the
parent is stopped or superseded while the child is starting, the child is
stopped as soon as it exists, so no child outlives its stopped ancestor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar

from ...ipc.control import ControlFault, Fault
from ..egress.tools import PolicyDenied, ToolContext, ToolRegistry
from ..errors import SessionNotFound
from .api import session_info
from .policy import Principal

if TYPE_CHECKING:
    from ..engine.engine import Engine
    from .api import ControlAPI

SPAWN, LIST, SEND, STOP = "sessions.spawn", "sessions.list", "sessions.send", "sessions.stop"
NAMES = (SPAWN, LIST, SEND, STOP)

T = TypeVar("T")


def register(tools: ToolRegistry, engine: "Engine", api: "ControlAPI") -> None:
    def caller(ctx: ToolContext) -> Principal:
        run = engine.find_run(ctx.run_id)
        if run is None or run.owner is None:
            raise PolicyDenied(f"run {ctx.run_id} is not part of a session; {ctx.tool} needs one")
        return Principal.of_run(run.id, run.owner.key)

    async def refused_as_policy(call: Callable[[], Awaitable[T]]) -> T:
        """A control refusal is the run's POLICY_DENIED; an unknown session is one it may not see."""
        try:
            return await call()
        except ControlFault as exc:
            if exc.fault in (Fault.FORBIDDEN, Fault.POLICY_DENIED):
                raise PolicyDenied(exc.args[0]) from None
            raise
        except SessionNotFound as exc:
            raise PolicyDenied(str(exc)) from None

    async def spawn(agent: str, message: Any, label: str | None = None, *, ctx: ToolContext) -> dict[str, Any]:
        who = caller(ctx)
        child, run = await refused_as_policy(lambda: api.spawn(who, agent, message, label))
        return {"key": child.key, "run_id": run.id, "generation": child.generation}

    async def list_sessions(*, ctx: ToolContext) -> list[dict[str, Any]]:
        who = caller(ctx)
        own = who.session

        async def visible() -> list[dict[str, Any]]:
            return [session_info(s).to_builtins() for s in api.sessions(who) if s.key != own]
        return await refused_as_policy(visible)

    async def send(key: str, message: Any, *, ctx: ToolContext) -> dict[str, Any]:
        who = caller(ctx)
        run = await refused_as_policy(lambda: api.send(who, key, message))
        return {"key": key, "run_id": run.id, "generation": run.generation}

    async def stop(key: str, kill: bool = False, *, ctx: ToolContext) -> dict[str, Any]:
        who = caller(ctx)
        reports = await refused_as_policy(lambda: api.kill_session(who, key) if kill else api.stop_session(who, key))
        return {"key": key, "runs_stopped": len(reports), "outcomes": [r.outcome for r in reports]}

    tools.register(SPAWN, spawn)
    tools.register(LIST, list_sessions)
    tools.register(SEND, send)
    tools.register(STOP, stop)
