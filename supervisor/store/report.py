"""The stop report: how a run ended, with the timestamps that prove it.

All timestamps are `time.monotonic_ns()` values taken in the supervisor
process, so they compare directly with the caller's own monotonic clock.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


class EndedBy(str, enum.Enum):
    """What ended the run's processes (StopReport.ended_by); compares equal to its string."""

    EXITED = "exited"  # the leader exited by itself (its leftovers were still killed)
    SIGTERM = "sigterm"  # the tree left within the grace after SIGTERM
    SIGKILL = "sigkill"  # the layer's SIGKILL (kill(), or the grace ran out)
    SWEPT = "swept"  # the sweep had to kill what the layer's signal did not reach
    FAILSAFE = "failsafe"  # the sequence itself failed (`failure` says how): layer kill and sweep anyway
    NEVER_STARTED = "never-started"  # the start was aborted; anything forked was killed
    RECOVERED = "recovered"  # a restarted supervisor killed what a dead one left

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass
class StopReport:
    run_id: str
    containment: str
    outcome: str = ""  # final RunState value: stopped | killed | exited | failed
    ended_by: str = ""  # an EndedBy value
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
    #: handlers the revoke stopped before their effect: async ones cancelled, queued sync ones never started
    handlers_cancelled: int = 0
    #: synchronous handlers already running on a thread at the revoke (their effect may have happened):
    #: {"tool", "call_id", "returned_at"}, returned_at None if it had not returned when the stop did
    handlers_outlived_revoke: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    #: helper runs of isolated tools (register_tool(..., isolated=True)) in flight at the revoke, killed with it
    helpers_killed: int = 0
    exit_code: int | None = None  # leader's exit status, if it exited
    exit_signal: int | None = None  # signal that ended the leader, if any
    #: processes of the run found outside its containment (left its cgroup or
    #: group), killed by the sweep; always reported, never hidden in `swept`
    escaped: int = 0
    escaped_pids: list[int] = dataclasses.field(default_factory=list)
    #: the isolation layers the run had: {"mode", "active", "missing", "network", ...}
    isolation: dict[str, Any] = dataclasses.field(default_factory=dict)

    #: set when the stop sequence itself raised: what went wrong (ended_by is then "failsafe")
    failure: str | None = None

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: its recursive deep copy was a tenth of a 1,000-run stop_all.
        # The fields are flat; their lists and dicts are copied one level (no caller shares them).
        out = {f.name: _copy(getattr(self, f.name)) for f in _FIELDS}
        out["ended_by"] = str(self.ended_by)
        return out


_FIELDS = dataclasses.fields(StopReport)


def _copy(value: Any) -> Any:
    if isinstance(value, list):
        return [dict(v) if isinstance(v, dict) else v for v in value]
    if isinstance(value, dict):
        return {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in value.items()}
    return value
