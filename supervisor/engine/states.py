"""The one run state machine. Every change goes through `RunStateMachine.to`.

There are no side flags beside the state: "is it stopping", "can it be
signalled" and "is it over" are all questions about the state, answered by
the groups below.
"""

from __future__ import annotations

import enum
import time
from typing import Callable


class RunState(str, enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    EXITED = "exited"  # ended by itself, exit code 0
    STOPPED = "stopped"  # ended by stop()
    KILLED = "killed"  # ended by kill() or by escalation requested with kill()
    FAILED = "failed"  # target raised, nonzero exit, died by a foreign signal, or could not start

    def __str__(self) -> str:
        return self.value


LIVE = frozenset({RunState.STARTING, RunState.RUNNING, RunState.PAUSED, RunState.STOPPING})
SIGNALLABLE = frozenset({RunState.RUNNING, RunState.PAUSED, RunState.STOPPING})
TERMINAL = frozenset({RunState.EXITED, RunState.STOPPED, RunState.KILLED, RunState.FAILED})

_ALLOWED: dict[RunState, frozenset[RunState]] = {
    RunState.STARTING: frozenset({RunState.RUNNING, RunState.STOPPING, RunState.FAILED}),
    RunState.RUNNING: frozenset({RunState.PAUSED, RunState.STOPPING}),
    RunState.PAUSED: frozenset({RunState.RUNNING, RunState.STOPPING}),
    # Natural exit also passes through STOPPING: the same sequence revokes the
    # channel and sweeps leftovers of a run that ended by itself.
    RunState.STOPPING: frozenset({RunState.EXITED, RunState.STOPPED, RunState.KILLED, RunState.FAILED}),
}


class RunStateMachine:
    """Holds a run's state; `on_change(old, new, t_ns)` journals each transition."""

    __slots__ = ("run_id", "state", "changed_at", "_on_change")

    def __init__(self, run_id: str, on_change: Callable[[RunState, RunState, int], None]):
        self.run_id = run_id
        self.state = RunState.STARTING
        self.changed_at = time.monotonic_ns()
        self._on_change = on_change

    def to(self, new: RunState) -> None:
        from ..errors import InvalidTransition

        old = self.state
        if new not in _ALLOWED.get(old, frozenset()):
            raise InvalidTransition(f"run {self.run_id}: {old} -> {new} is not allowed")
        self.state = new
        self.changed_at = time.monotonic_ns()
        self._on_change(old, new, self.changed_at)

    @property
    def live(self) -> bool:
        return self.state in LIVE

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL
