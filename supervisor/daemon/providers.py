"""Gateway-provided tools: a run's call to one is relayed to the client that provides it.

A connected client sends `tools.provide`; from then on each tool it named
is registered in the supervisor as an async handler that pushes a
`tool.call` to that client and waits for its `tools.result`. The tool's
secrets (an SMTP password, an API token) stay in the gateway, and every
call still passes the broker's gate: allow-list, generation, revocation.

At the run's revoke the broker cancels the handler; the handler then pushes
`tool.cancel` to the provider and forgets the call, so a result that comes
later is refused (NOT_RUNNING) and reaches no one. A provider that
disconnects fails each of its in-flight calls at once (the run sees
TOOL_ERROR naming the disconnect) and stops providing its tools.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
from typing import Any, Callable, Hashable

import msgspec

from ...ipc import gateway
from ...ipc.control import ControlFault, Fault
from ..egress.tools import ToolContext, ToolRegistry

log = logging.getLogger("deadstop.daemon")


#: Who provides a tool: whatever identifies one connection to the daemon (its listener and routing id).
Peer = Any


class ProviderGone(Exception):
    """The client that provides the tool disconnected (or never connected) before answering."""


@dataclasses.dataclass
class _Call:
    provider: Hashable
    run_id: str
    future: asyncio.Future[Any]


class Providers:
    def __init__(self, tools: ToolRegistry, push: Callable[[Peer, bytes], None],
                 session_of: Callable[[str], str | None]):
        self._tools = tools
        self._push = push  # (peer, body) -> sent on that peer's control socket
        self._session_of = session_of
        self.by_tool: dict[str, Peer] = {}
        self.declared: set[str] = set()
        self._calls: dict[str, _Call] = {}

    def declare(self, name: str) -> None:
        """The configuration says a client provides `name`: runs may list it now; until a client
        provides it, a call fails with TOOL_ERROR saying so."""
        self.declared.add(name)
        self._tools.register(name, self._handler(name))

    def provide(self, provider: Peer, names: list[str]) -> list[str]:
        """`provider` answers these tools from now on (the last client to provide a tool wins)."""
        for name in names:
            if name not in self.declared:
                raise ControlFault(Fault.BAD_ARGUMENTS,
                                   f"tool {name!r} is not declared provided in the daemon's configuration "
                                   f"([tools.{name}] provided = true); declared: {sorted(self.declared)}")
        for name in names:
            self.by_tool[name] = provider
        return sorted(names)

    def _handler(self, name: str) -> Callable[..., Any]:
        async def relay(*args: Any, ctx: ToolContext, **kwargs: Any) -> Any:
            provider = self.by_tool.get(name)
            if provider is None:
                raise ProviderGone(f"no client provides tool {name!r} now")
            call_id = secrets.token_hex(8)
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._calls[call_id] = _Call(provider, ctx.run_id, fut)
            self._push(provider, msgspec.json.encode(gateway.ToolCall(
                call_id=call_id, run_id=ctx.run_id, session=self._session_of(ctx.run_id), tool=name,
                args=list(args), kwargs=kwargs)))
            try:
                return await fut
            except asyncio.CancelledError:  # the run was revoked: tell the provider, refuse what comes later
                if self._calls.get(call_id) is not None:
                    self._push(provider, msgspec.json.encode(gateway.ToolCancel(
                        call_id=call_id, reason=f"run {ctx.run_id} was revoked")))
                raise
            finally:
                self._calls.pop(call_id, None)
        relay.__name__ = f"provided:{name}"
        return relay

    def result(self, provider: Peer, answer: gateway.ToolsResult) -> bool:
        call = self._calls.get(answer.call_id)
        if call is None or call.future.done():
            raise ControlFault(Fault.NOT_RUNNING, f"call {answer.call_id} is not in flight (cancelled at its run's "
                                                  "revoke, or already answered): its result is refused")
        if call.provider != provider:
            raise ControlFault(Fault.POLICY_DENIED, f"call {answer.call_id} was sent to another provider")
        if answer.ok:
            call.future.set_result(answer.value)
        else:
            call.future.set_exception(RuntimeError(answer.error or "the provider reported a failure"))
        return True

    def gone(self, provider: Peer) -> int:
        """The provider disconnected: fail its in-flight calls, stop relaying its tools. Returns how many failed."""
        for name in [n for n, p in self.by_tool.items() if p == provider]:
            del self.by_tool[name]
        failed = 0
        for call in list(self._calls.values()):
            if call.provider == provider and not call.future.done():
                call.future.set_exception(ProviderGone(f"the client providing this tool disconnected before "
                                                       f"answering (run {call.run_id})"))
                failed += 1
        if failed:
            log.warning("deadstop: a tool provider disconnected with %d call(s) in flight", failed)
        return failed
