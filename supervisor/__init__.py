"""deadstop's trusted side: runs, containment, stop sequence, egress broker, journal."""

from supervisor.core import AsyncSupervisor, Event
from supervisor.errors import (ContainmentDegraded, DeadstopError, EgressRefused, InvalidTarget, RunFailed,
                               RunNotFound, StopIncomplete, SupervisorClosed)
from supervisor.report import StopReport
from supervisor.run import AsyncRun, ExitInfo
from supervisor.states import RunState
from supervisor.sync import Run, Supervisor
from supervisor.tools import ToolCancelled, ToolContext

__all__ = [
    "AsyncRun", "AsyncSupervisor", "ContainmentDegraded", "DeadstopError", "EgressRefused", "Event",
    "ExitInfo", "InvalidTarget", "Run", "RunFailed", "RunNotFound", "RunState", "StopIncomplete",
    "StopReport", "Supervisor", "SupervisorClosed", "ToolCancelled", "ToolContext",
]
