"""deadstop's trusted side: runs, containment, stop sequence, egress broker, journal.

The public names load on first use (PEP 562), so that `deadstop --help` and
other light callers do not pay for ZeroMQ, psutil and the engine:
``from deadstop.supervisor import Supervisor`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

#: public name -> the submodule that defines it
_EXPORTS = {
    "AsyncSupervisor": "facades.async_supervisor", "Event": "engine.events",
    "ControlAPI": "control.api", "Principal": "control.policy", "ControlFault": ".ipc.control", "Fault": ".ipc.control",
    "ContainmentDegraded": "errors", "DeadstopError": "errors", "EgressRefused": "errors",
    "InvalidTarget": "errors", "InvalidTransition": "errors", "LimitUnenforceable": "errors",
    "RunFailed": "errors", "RunNotFound": "errors", "RunTimeout": "errors", "SessionNotFound": "errors", "StopIncomplete": "errors",
    "SupervisorClosed": "errors",
    "StopReport": "store.report",
    "AsyncRun": "engine.run", "ExitInfo": "engine.run",
    "RunState": "engine.states",
    "Limits": "mechanisms.limits", "Usage": "mechanisms.limits", "Proxy": "egress.proxy",
    "AsyncSession": "sessions.session", "SessionStopped": "sessions.session",
    "Run": "facades.sync", "Session": "facades.sync", "Supervisor": "facades.sync",
    "PolicyDenied": "egress.tools", "ToolCancelled": "egress.tools", "ToolContext": "egress.tools",
    "IsolationProfile": "mechanisms.isolation",
    "StateDirInUse": "mechanisms.statelock",
    "StateView": "facades.inspect",
}

__all__ = [
    "__version__",
    "AsyncRun",
    "ControlAPI",
    "ControlFault",
    "AsyncSession",
    "AsyncSupervisor",
    "ContainmentDegraded",
    "DeadstopError",
    "EgressRefused",
    "Event",
    "ExitInfo",
    "Fault",
    "InvalidTarget",
    "InvalidTransition",
    "IsolationProfile",
    "LimitUnenforceable",
    "Limits",
    "Proxy",
    "PolicyDenied",
    "Principal",
    "Run",
    "RunFailed",
    "RunNotFound",
    "RunState",
    "RunTimeout",
    "Session",
    "SessionNotFound",
    "SessionStopped",
    "StateDirInUse",
    "StateView",
    "StopIncomplete",
    "StopReport",
    "Supervisor",
    "SupervisorClosed",
    "ToolCancelled",
    "ToolContext",
    "Usage",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # next time without this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # what static checkers and IDEs see
    from ..ipc.control import ControlFault, Fault
    from .control.api import ControlAPI
    from .control.policy import Principal
    from .engine.events import Event
    from .facades.async_supervisor import AsyncSupervisor
    from .errors import (ContainmentDegraded, DeadstopError, EgressRefused, InvalidTarget, InvalidTransition,
                         LimitUnenforceable, RunFailed, RunNotFound, RunTimeout, SessionNotFound, StopIncomplete,
                         SupervisorClosed)
    from .mechanisms.isolation import IsolationProfile
    from .mechanisms.limits import Limits, Usage
    from .store.report import StopReport
    from .engine.run import AsyncRun, ExitInfo
    from .sessions.session import AsyncSession, SessionStopped
    from .engine.states import RunState
    from .mechanisms.statelock import StateDirInUse
    from .facades.inspect import StateView
    from .facades.sync import Run, Session, Supervisor
    from .egress.tools import PolicyDenied, ToolCancelled, ToolContext
