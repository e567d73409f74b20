"""Errors raised on the trusted side. One root (`DeadstopError`), few leaves.

Messages name the run, the PIDs, the signal and the containment layer, so a
log line alone says what failed and to whom.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..ipc.errors import DeadstopError, EgressRefused, ErrorCode

if TYPE_CHECKING:
    from .store.report import StopReport

__all__ = [
    "DeadstopError",
    "EgressRefused",
    "ErrorCode",
    "RunNotFound",
    "SessionNotFound",
    "InvalidTarget",
    "InvalidTransition",
    "StopIncomplete",
    "ContainmentDegraded",
    "LimitUnenforceable",
    "RunFailed",
    "SupervisorClosed",
]


class RunNotFound(DeadstopError):
    """No run with that id is known to this supervisor."""


class SessionNotFound(DeadstopError):
    """No session with that key is known to this supervisor or its store."""


class InvalidTarget(DeadstopError, ValueError):
    """The target cannot be started: not picklable, not callable, argv not found."""


class InvalidTransition(DeadstopError):
    """A verb the run's state does not allow (pause a run that is not running,
    resume one that is not paused); the message names the run and its state."""


class RunTimeout(DeadstopError, TimeoutError):
    """wait() or result() gave up before the run ended; the run goes on (stop it if you meant to)."""

    def __init__(self, message: str, *, run_id: str, state: str):
        super().__init__(message)
        self.run_id = run_id
        self.state = state


class SupervisorClosed(DeadstopError):
    """The supervisor was closed; it starts nothing new."""


class ContainmentDegraded(DeadstopError):
    """A containment layer was required but is not available on this machine."""


class LimitUnenforceable(DeadstopError, ValueError):
    """A memory_bytes or processes limit that no kernel controller on this host can enforce.

    Raised at register_agent and at start, naming the limit and why each
    mechanism is missing, unless the caller accepted sampling explicitly
    with ``Limits(..., enforcement="sampled")``.
    """


class RunFailed(DeadstopError):
    """The run's target raised or the run ended without a result.

    `remote_type` and `remote_traceback` are text sent by the run; they are
    never unpickled.
    """

    def __init__(self, message: str, *, run_id: str, remote_type: str | None = None,
                 remote_traceback: str | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.run_id = run_id
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback
        self.exit_code = exit_code


class StopIncomplete(DeadstopError):
    """Processes of the run were still alive after the sweep.

    Carries the full report; `survivors` lists the PIDs that refused to die.
    """

    def __init__(self, report: "StopReport"):
        super().__init__(
            f"run {report.run_id}: {len(report.survivor_pids)} process(es) still alive after "
            f"SIGKILL and sweep via {report.containment}: pids {report.survivor_pids}")
        self.report = report
        self.survivors = report.survivor_pids
