"""deadstop's trusted side: runs, containment, stop sequence, egress broker, journal."""

from supervisor.core import AsyncSupervisor, Event
from supervisor.errors import (ContainmentDegraded, DeadstopError, EgressRefused, InvalidTarget,
                               LimitUnenforceable, RunFailed, RunNotFound, SessionNotFound, StopIncomplete,
                               SupervisorClosed)
from supervisor.report import StopReport
from supervisor.run import AsyncRun, ExitInfo
from supervisor.states import RunState
from supervisor.limits import Limits, Usage
from supervisor.sessions import AsyncSession, SessionStopped
from supervisor.sync import Run, Session, Supervisor
from supervisor.tools import PolicyDenied, ToolCancelled, ToolContext

__all__ = [
    "AsyncRun", "AsyncSession", "AsyncSupervisor", "Limits", "PolicyDenied", "Session", "SessionNotFound",
    "SessionStopped", "Usage", "ContainmentDegraded", "DeadstopError", "EgressRefused", "Event",
    "ExitInfo", "InvalidTarget", "LimitUnenforceable", "Run", "RunFailed", "RunNotFound", "RunState", "StopIncomplete",
    "StopReport", "Supervisor", "SupervisorClosed", "ToolCancelled", "ToolContext",
]
