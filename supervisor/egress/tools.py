"""Tool registry and the context a handler receives.

A handler is any callable, sync or async, taking JSON-able arguments. If it
declares a parameter named `ctx` it receives a `ToolContext`, whose `check()`
is the commit gate: call it right before the irreversible step (sending the
email, moving the money). `check()` and the revocation of the run's channel
take the same lock, so every `check()` is totally ordered with the revoke:
either it returns a timestamp earlier than `revoked_at`, or it raises.
"""

from __future__ import annotations

import inspect
import threading
import time
from typing import Any, Callable

from ...ipc.errors import DeadstopError, EgressRefused, ErrorCode


class PolicyDenied(EgressRefused):
    """A built-in tool refused the request by policy; the run sees POLICY_DENIED (15)."""

    code = ErrorCode.POLICY_DENIED


class ToolCancelled(DeadstopError):
    """Raised inside a handler by `ctx.check()` once its run is revoked."""


class ToolContext:
    __slots__ = ("run_id", "tool", "call_id", "started_at", "committed_at", "cancelled", "_gate",
                 "_revoked", "usage", "on_thread", "returned_at", "_emit")

    def __init__(self, run_id: str, tool: str, call_id: int, gate: threading.Lock,
                 revoked: Callable[[], str | None], emit: Callable[[str, Any], bool] | None = None):
        self.run_id = run_id
        self.tool = tool
        self.call_id = call_id
        self.started_at = 0
        self.committed_at: int | None = None
        self.cancelled = False
        self._gate = gate
        self._revoked = revoked
        self.usage: dict[str, float] = {}
        self.on_thread = False  # a synchronous handler past its start gate: its code is running
        self.returned_at: int | None = None  # when a handler that outlived the revoke returned
        self._emit = emit

    @property
    def revoked(self) -> bool:
        return self.cancelled or self._revoked() is not None

    def check(self) -> int:
        """Commit gate: raise ToolCancelled if the run is revoked, else return the commit time.

        The returned `time.monotonic_ns()` value is taken under the gate lock,
        so it is guaranteed to be earlier than the run's `revoked_at`.
        """
        with self._gate:
            reason = self._revoked()
            if self.cancelled or reason is not None:
                raise ToolCancelled(f"run {self.run_id}: tool {self.tool!r} cancelled before commit"
                                    f" ({reason or 'cancelled'})")
            self.committed_at = time.monotonic_ns()
            return self.committed_at

    def emit(self, kind: str, data: Any = None) -> bool:
        """An event on behalf of the calling run (a model's streamed delta, say), fenced like the run's own:
        dropped (False) once the run is revoked or its session has moved to a newer generation. From the
        loop's thread only (an async handler)."""
        if self._emit is None or self.revoked:
            return False
        return self._emit(kind, data)

    def report_usage(self, **amounts: float) -> None:
        """Record usage (for example prompt_tokens=..., completion_tokens=...)."""
        for key, value in amounts.items():
            self.usage[key] = self.usage.get(key, 0) + value


class ToolFailure(Exception):
    """A handler's failure with its own wire code (TOOL_UNAVAILABLE, TOOL_TIMEOUT, ...), not TOOL_ERROR."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class _PlainParameters:
    """The binding check of a signature made only of plain parameters, without inspect's machinery per call.

    Signature.bind costs about 4 us a call on the egress hot path; a handler
    whose parameters are all positional-or-keyword (no *args, **kwargs,
    positional-only or keyword-only ones) is checked here with a few set
    operations. Anything this check does not accept goes to Signature.bind,
    which either accepts it too or raises the TypeError the caller sees.
    """

    __slots__ = ("names", "known", "required")

    def __init__(self, params: list[inspect.Parameter]):
        self.names = tuple(p.name for p in params)
        self.known = frozenset(self.names)
        self.required = frozenset(p.name for p in params if p.default is inspect.Parameter.empty)

    @classmethod
    def of(cls, signature: inspect.Signature | None) -> "_PlainParameters | None":
        if signature is None:
            return None
        params = list(signature.parameters.values())
        if any(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params):
            return None
        return cls(params)

    def accepts(self, n_args: int, kwargs: dict[str, Any]) -> bool:
        if n_args > len(self.names):
            return False
        if not kwargs:
            return len(self.required) == 0 or self.required.issubset(self.names[:n_args])
        positional = self.names[:n_args]
        keys = kwargs.keys()
        if not self.known.issuperset(keys) or not keys.isdisjoint(positional):
            return False
        return all(name in kwargs or name in positional for name in self.required)


class Tool:
    __slots__ = ("name", "fn", "is_async", "wants_ctx", "signature", "check_arguments", "_plain")

    def __init__(self, name: str, fn: Callable[..., Any],
                 check_arguments: Callable[[list[Any], dict[str, Any]], None] | None = None):
        if not callable(fn):
            raise TypeError(f"tool {name!r}: handler {fn!r} is not callable")
        self.name = name
        self.fn = fn
        self.is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None))
        try:
            self.signature: inspect.Signature | None = inspect.signature(fn)
        except (TypeError, ValueError):
            self.signature = None
        self.wants_ctx = bool(self.signature and "ctx" in self.signature.parameters)
        self._plain = _PlainParameters.of(self.signature)
        #: raises TypeError for arguments the tool refuses (an MCP tool's input schema), before the call leaves
        self.check_arguments = check_arguments

    def bind(self, args: list[Any], kwargs: dict[str, Any], ctx: ToolContext) -> tuple[list[Any], dict[str, Any]]:
        """Fit the wire arguments to the handler; TypeError names what does not fit."""
        if "ctx" in kwargs:
            raise TypeError("'ctx' is reserved for the tool context")
        if self.check_arguments is not None:
            self.check_arguments(args, kwargs)
        if self.wants_ctx:
            kwargs = {**kwargs, "ctx": ctx}
        plain = self._plain
        if self.signature is not None and (plain is None or not plain.accepts(len(args), kwargs)):
            self.signature.bind(*args, **kwargs)
        return args, kwargs


class ToolRegistry:
    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

    def register(self, name: str, fn: Callable[..., Any],
                 check_arguments: Callable[[list[Any], dict[str, Any]], None] | None = None) -> None:
        if not isinstance(name, str) or not 1 <= len(name) <= 200:
            raise ValueError("tool name must be a string of 1 to 200 characters (the wire's limit for names)")
        self._tools[name] = Tool(name, fn, check_arguments)

    def unregister(self, name: str) -> None:
        self._tools.pop(name, None)

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def names(self) -> list[str]:
        return sorted(self._tools)
