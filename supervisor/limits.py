"""Per-run limits and the usage they are checked against.

Each limit is enforced by the strongest mechanism the machine offers and the
mechanism is named in the run's usage record:

* tool_calls, tokens: counted by the broker as requests arrive (exact).
* wall_clock: a timer that stops while the run is paused.
* cpu_seconds: cgroup cpu.stat, else psutil over the run's processes (sampled).
* memory_bytes: cgroup memory.max where the memory controller is delegated;
  else RLIMIT_AS in the run (address space above its start) plus sampling
  of resident memory.
* processes: cgroup pids.max where the pids controller is delegated; else
  RLIMIT_NPROC (ignored by the kernel for root) plus sampling.

Crossing any of them stops the run; its report names the limit.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Limits:
    wall_clock: float | None = None  # seconds of unpaused run time
    tool_calls: int | None = None  # tool calls dispatched
    tokens: int | None = None  # tokens reported by tool handlers through ctx.report_usage
    cpu_seconds: float | None = None  # CPU time of all the run's processes
    memory_bytes: int | None = None  # resident memory of all the run's processes
    processes: int | None = None  # live processes of the run at once

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"Limits.{field.name} must be a positive number or None, not {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


TOKEN_KEYS = ("prompt_tokens", "completion_tokens", "tokens")


@dataclasses.dataclass
class Usage:
    """What a run (or a whole session) has consumed. Live while it runs."""

    tool_calls: int = 0
    tokens: int = 0
    cpu_seconds: float = 0.0
    peak_memory_bytes: int = 0
    peak_processes: int = 0
    wall_clock: float = 0.0  # unpaused seconds

    def add(self, other: "Usage") -> None:
        self.tool_calls += other.tool_calls
        self.tokens += other.tokens
        self.cpu_seconds += other.cpu_seconds
        self.peak_memory_bytes = max(self.peak_memory_bytes, other.peak_memory_bytes)
        self.peak_processes = max(self.peak_processes, other.peak_processes)
        self.wall_clock += other.wall_clock

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Usage":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in names})


def crossed(limits: Limits | None, usage: Usage) -> str | None:
    """Name of the first limit `usage` exceeds, or None."""
    if limits is None:
        return None
    checks = (
        ("tool_calls", usage.tool_calls),
        ("tokens", usage.tokens),
        ("wall_clock", usage.wall_clock),
        ("cpu_seconds", usage.cpu_seconds),
        ("memory_bytes", usage.peak_memory_bytes),
        ("processes", usage.peak_processes),
    )
    for name, value in checks:
        limit = getattr(limits, name)
        if limit is not None and value > limit:
            return name
    return None


def apply_cgroup_limits(cgroup: Any, limits: Limits) -> dict[str, str]:
    """Write memory.max / pids.max where those controllers are delegated.

    Returns which limits the kernel enforces through the cgroup.
    """
    enforced: dict[str, str] = {}
    for limit, filename in (("memory_bytes", "memory.max"), ("processes", "pids.max")):
        value = getattr(limits, limit)
        if value is not None and cgroup.has(filename):
            try:
                cgroup.write(filename, str(int(value)))
                enforced[limit] = filename
            except OSError:
                pass
    return enforced


def rlimits_for(limits: Limits | None, cgroup: Any) -> dict[str, int]:
    """Resource limits the run sets on itself where the cgroup cannot enforce.

    Values are headroom above what the run already uses when it starts
    (address space of the forked interpreter, processes of the user), which
    the run adds at bootstrap (worker/bootstrap.py).
    """
    if limits is None:
        return {}
    out: dict[str, int] = {}
    if limits.memory_bytes is not None and not (cgroup is not None and cgroup.has("memory.max")):
        out["as_extra"] = int(limits.memory_bytes)
    if limits.processes is not None and not (cgroup is not None and cgroup.has("pids.max")):
        out["nproc_extra"] = int(limits.processes)
    return out
