"""deadstop's trusted side: runs, containment, stop sequence, egress broker, journal."""

from .core import AsyncSupervisor, Event
from .errors import (ContainmentDegraded, DeadstopError, EgressRefused, InvalidTarget,
                               LimitUnenforceable, RunFailed, RunNotFound, SessionNotFound, StopIncomplete,
                               SupervisorClosed)
from .report import StopReport
from .run import AsyncRun, ExitInfo
from .states import RunState
from .limits import Limits, Usage
from .sessions import AsyncSession, SessionStopped
from .sync import Run, Session, Supervisor
from .tools import PolicyDenied, ToolCancelled, ToolContext

__all__ = [
    "AsyncRun", "AsyncSession", "AsyncSupervisor", "Limits", "PolicyDenied", "Session", "SessionNotFound",
    "SessionStopped", "Usage", "ContainmentDegraded", "DeadstopError", "EgressRefused", "Event",
    "ExitInfo", "InvalidTarget", "LimitUnenforceable", "Run", "RunFailed", "RunNotFound", "RunState", "StopIncomplete",
    "StopReport", "Supervisor", "SupervisorClosed", "ToolCancelled", "ToolContext",
]
