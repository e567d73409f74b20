"""The stop report: how a run ended, with the timestamps that prove it.

All timestamps are `time.monotonic_ns()` values taken in the supervisor
process, so they compare directly with the caller's own monotonic clock.
"""

from __future__ import annotations

import dataclasses
from typing import Any

@dataclasses.dataclass
class StopReport:
    run_id: str
    containment: str
    outcome: str = ""  # final RunState value: stopped | killed | exited | failed
    ended_by: str = ""  # exited | sigterm | sigkill | swept; never-started (an aborted start), recovered (by a restart)
    requested_at: int = 0  # stop()/kill() called, or leader exit noticed
    revoked_at: int = 0
    revoke_source: str = ""  # api | exit | supervisor | spawner | quota | ...
    revoke_reason: str = ""
    limit: str | None = None  # the limit whose crossing stopped the run (revoke_source "quota")
    #: what enforced each of the run's limits: "broker" (tool_calls, tokens),
    #: "timer" (wall_clock), "sampled" (cpu_seconds; memory_bytes / processes
    #: only with Limits(enforcement="sampled")), "cgroup-v2:memory",
    #: "cgroup-v1:memory", "cgroup-v2:pids", "cgroup-v1:pids"
    limits_enforcement: dict[str, str] = dataclasses.field(default_factory=dict)
    term_sent_at: int | None = None
    kill_sent_at: int | None = None
    reaped_at: int = 0
    survivors: int = 0
    survivor_pids: list[int] = dataclasses.field(default_factory=list)
    swept: int = 0  # processes the sweep had to kill after the layer's signal
    refused_after_revoke: int = 0
    handlers_cancelled: int = 0
    exit_code: int | None = None  # leader's exit status, if it exited
    exit_signal: int | None = None  # signal that ended the leader, if any
    #: processes of the run found outside its containment (left its cgroup or
    #: group), killed by the sweep; always reported, never hidden in `swept`
    escaped: int = 0
    escaped_pids: list[int] = dataclasses.field(default_factory=list)
    #: the isolation layers the run had: {"mode", "active", "missing", "network", ...}
    isolation: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
