"""Per-run limits, how each is enforced, and the usage they are checked against.

Each limit is enforced by the strongest mechanism the machine offers, and
the mechanism is named in every StopReport (`report.limits_enforcement`):

* tool_calls, tokens: counted by the broker as requests arrive (exact): "broker".
* wall_clock: a timer that stops while the run is paused: "timer".
* cpu_seconds: sampled every sample_interval (cgroup cpu.stat where the run
  has a v2 cgroup, else psutil over its processes): "sampled". A run can
  overshoot by one interval's worth of CPU.
* memory_bytes: the kernel, strongest first: cgroup v2 memory.max (plus
  memory.swap.max 0) where the memory controller is delegated,
  "cgroup-v2:memory"; else the v1 memory controller of a hybrid host
  (memory.limit_in_bytes, and memsw where swap is accounted; see
  supervisor/mechanisms/cgroup_v1.py), "cgroup-v1:memory". Memory is counted as the
  kernel counts it: anonymous memory, page cache, shmem and memfd alike.
  At the limit the kernel reclaims, then its OOM killer kills inside the
  run's group; the supervisor notices (OOM eventfd, memory.events, and the
  oom_kill count read when the leader exits and on every sample) and stops
  the run naming memory_bytes.
* processes: the kernel's pids controller (v2 pids.max, else v1 pids.max),
  "cgroup-v2:pids" / "cgroup-v1:pids". It counts tasks, threads included,
  as the kernel does. A fork past the limit fails with EAGAIN inside the
  run; the supervisor reads the refusal count (pids.events `max`) on every
  sample (v1 gives no notification) and stops the run naming processes.

Where no kernel controller is available for memory_bytes or processes, the
limit is refused (LimitUnenforceable, at register_agent and at start) unless
the caller accepts sampling with ``Limits(..., enforcement="sampled")``:
then RLIMIT_AS (address space above the run's start) / RLIMIT_NPROC (which
the kernel ignores for root) inside the run, plus sampling of resident
memory and process count, "sampled+RLIMIT_AS" / "sampled". A hostile run
can outrun sampling between two samples (fork bombs, memfds that are not
resident in any process).

Crossing any of them stops the run; its report names the limit.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from .cgroup_v1 import read_int, read_keyed
from ..errors import LimitUnenforceable


KERNEL = "kernel"
SAMPLED = "sampled"
ENFORCEMENT_CHOICES = (KERNEL, SAMPLED)
#: Limits a kernel controller can enforce, and the controller for each.
KERNEL_LIMITS = {"memory_bytes": "memory", "processes": "pids"}
V2_PREFIX = "cgroup-v2:"
V1_PREFIX = "cgroup-v1:"


@dataclasses.dataclass(frozen=True)
class Limits:
    wall_clock: float | None = None  # seconds of unpaused run time
    tool_calls: int | None = None  # tool calls dispatched
    tokens: int | None = None  # tokens reported by tool handlers through ctx.report_usage
    cpu_seconds: float | None = None  # CPU time of all the run's processes
    memory_bytes: int | None = None  # memory charged to the run, as the kernel counts it
    #: live tasks of the run at once, threads included, as the kernel counts
    #: them (a Python run that uses egress has 3: its thread and ZeroMQ's two)
    processes: int | None = None
    #: "kernel": memory_bytes / processes must be enforced by a kernel
    #: controller, or the limit is refused. "sampled": the kernel is still
    #: used where it can be; elsewhere sampling is accepted.
    enforcement: str = KERNEL

    def __post_init__(self) -> None:
        for name in LIMIT_NAMES:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"Limits.{name} must be a positive number or None, not {value!r}")
        if self.enforcement not in ENFORCEMENT_CHOICES:
            raise ValueError(f"Limits.enforcement must be one of {ENFORCEMENT_CHOICES}, not {self.enforcement!r}")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def coerce(cls, value: "Limits | dict[str, Any] | None") -> "Limits | None":
        """Limits from a Limits, a dict of its fields (as a config file gives them), or None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise ValueError(f"unknown limit(s) {unknown}; known: {[*LIMIT_NAMES, 'enforcement']}")
            return cls(**value)
        raise TypeError(f"limits must be a Limits, a dict or None, not {type(value).__name__}")


LIMIT_NAMES = ("wall_clock", "tool_calls", "tokens", "cpu_seconds", "memory_bytes", "processes")


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
        return dict(self.__dict__)  # flat numbers: asdict's recursive copy is wasted on every live_usage

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


class LimitSupport:
    """Which kernel mechanism this supervisor has for memory_bytes and processes.

    Probed once, at open: a v2 controller counts only if it is enabled in the
    subtree_control of the supervisor's v2 subtree (so every run cgroup has
    memory.max / pids.max); a v1 controller only if the supervisor's subtree
    in that hierarchy could be created.
    """

    def __init__(self, v2_tree: Any, v2_why: str, v1_tree: Any):
        self.mechanisms: dict[str, str] = {}
        self.why_not: dict[str, str] = {}
        enabled: set[str] = set()
        if v2_tree is not None:
            try:
                with open(os.path.join(v2_tree.root.path, "cgroup.subtree_control")) as f:
                    enabled = set(f.read().split())
            except OSError:
                pass
        for limit, controller in KERNEL_LIMITS.items():
            if controller in enabled:
                self.mechanisms[limit] = V2_PREFIX + controller
                continue
            if v1_tree is not None and controller in v1_tree.roots:
                self.mechanisms[limit] = V1_PREFIX + controller
                continue
            if v2_tree is None:
                why2 = f"no v2 cgroup for runs ({v2_why})" if v2_why else "no v2 cgroup for runs"
            else:
                why2 = f"the {controller} controller is not delegated to {v2_tree.root.path}"
            why1 = (v1_tree.why.get(controller) if v1_tree is not None else None) or "not probed"
            self.why_not[limit] = f"cgroup v2: {why2}; cgroup v1: {why1}"

    def describe(self) -> dict[str, str]:
        """limit -> its kernel mechanism, or "sampled only: <why>"."""
        out = dict(self.mechanisms)
        for limit, why in self.why_not.items():
            out[limit] = f"sampled only: {why}"
        return out

    def plan(self, limits: Limits | None) -> dict[str, str]:
        """limit -> mechanism for every limit set; LimitUnenforceable if one cannot be enforced as asked."""
        if limits is None:
            return {}
        out: dict[str, str] = {}
        for name in LIMIT_NAMES:
            value = getattr(limits, name)
            if value is None:
                continue
            if name in ("tool_calls", "tokens"):
                out[name] = "broker"
            elif name == "wall_clock":
                out[name] = "timer"
            elif name == "cpu_seconds":
                out[name] = "sampled"
            elif name in self.mechanisms:
                out[name] = self.mechanisms[name]
            elif limits.enforcement == SAMPLED:
                out[name] = "sampled+RLIMIT_AS" if name == "memory_bytes" else "sampled"
            else:
                raise LimitUnenforceable(
                    f"Limits.{name}={value} cannot be enforced by the kernel on this host ({self.why_not[name]}). "
                    f"Pass Limits(..., enforcement=\"sampled\") to accept sampling instead, which a hostile "
                    f"run can outrun between two samples.")
        return out


class KernelLimits:
    """The kernel side of one run's memory_bytes / processes limits (v2 and/or v1 groups)."""

    def __init__(self, plan: dict[str, str], v2: Any, v1: Any):
        self.plan = plan
        self.v2 = v2  # the run's v2 Cgroup, where a v2 controller enforces something
        self.v1 = v1  # cgroup_v1.V1RunGroups, where a v1 controller does
        self._v2_watches: list[int] = []
        self._oom_fd: int | None = None
        self._loop: Any = None
        self._watcher: Any = None
        self._limits: Limits | None = None

    @classmethod
    def create(cls, run_id: str, limits: Limits | None, plan: dict[str, str],
               v1_tree: Any) -> "KernelLimits | None":
        """The run's v1 groups with their limits written, before the run exists;
        None if the kernel enforces none of its limits. apply_v2() writes the
        v2 ones once the run's v2 cgroup exists. Raises OSError if a limit the
        plan puts on the kernel cannot be set."""
        if limits is None:
            return None
        v2_used = [n for n in KERNEL_LIMITS if plan.get(n, "").startswith(V2_PREFIX)]
        v1_used = [n for n in KERNEL_LIMITS if plan.get(n, "").startswith(V1_PREFIX)]
        if not v2_used and not v1_used:
            return None
        v1 = None
        if v1_used:
            v1 = v1_tree.run_groups(run_id, [KERNEL_LIMITS[n] for n in v1_used])
            try:
                if "memory_bytes" in v1_used:
                    assert limits.memory_bytes is not None  # the plan names only limits that are set
                    v1.limit_memory(int(limits.memory_bytes))
                    v1.watch_oom()
                if "processes" in v1_used:
                    assert limits.processes is not None
                    v1.limit_pids(int(limits.processes))
            except BaseException:
                v1.remove()
                raise
        kernel = cls(plan, None, v1)
        kernel._limits = limits
        return kernel

    def apply_v2(self, cgroup: Any) -> None:
        """memory.max (and memory.swap.max 0) / pids.max in the run's v2 cgroup, where the plan says v2."""
        v2_used = [n for n in KERNEL_LIMITS if self.plan.get(n, "").startswith(V2_PREFIX)]
        if not v2_used:
            return
        if cgroup is None:
            raise OSError(f"{', '.join(v2_used)}: the run has no v2 cgroup to enforce them in")
        limits = self._limits
        assert limits is not None  # create() set them: a plan names only limits that are set
        if "memory_bytes" in v2_used:
            cgroup.write("memory.max", str(int(limits.memory_bytes or 0)))
            if cgroup.has("memory.swap.max"):
                cgroup.write("memory.swap.max", "0")  # swap is no way past the limit
        if "processes" in v2_used:
            cgroup.write("pids.max", str(int(limits.processes or 0)))
        self.v2 = cgroup

    def join_files(self) -> list[str]:
        """cgroup.procs files the run joins at bootstrap (start message key join_cgroups)."""
        return self.v1.procs_files() if self.v1 is not None else []

    def _v2_events(self, name: str) -> dict[str, int]:
        return read_keyed(os.path.join(self.v2.path, name))

    def crossed(self) -> str | None:
        """The kernel-enforced limit the run ran into (an OOM kill, a refused fork), or None."""
        mem = self.plan.get("memory_bytes", "")
        if mem.startswith(V1_PREFIX) and self.v1.oom_kills() > 0:
            return "memory_bytes"
        if mem.startswith(V2_PREFIX):
            ev = self._v2_events("memory.events")
            if ev.get("oom", 0) or ev.get("oom_kill", 0):
                return "memory_bytes"
        pids = self.plan.get("processes", "")
        if pids.startswith(V1_PREFIX) and self.v1.fork_refusals() > 0:
            return "processes"
        if pids.startswith(V2_PREFIX) and self._v2_events("pids.events").get("max", 0):
            return "processes"
        return None

    def peaks(self) -> tuple[int | None, int | None]:
        """(peak memory, peak tasks) as the kernel counted them, where it enforces them."""
        memory = processes = None
        mem = self.plan.get("memory_bytes", "")
        if mem.startswith(V1_PREFIX):
            memory = self.v1.memory_peak()
        elif mem.startswith(V2_PREFIX):
            memory = read_int(os.path.join(self.v2.path, "memory.peak"))  # 5.19+
            if memory is None:
                memory = read_int(os.path.join(self.v2.path, "memory.current"))
        pids = self.plan.get("processes", "")
        if pids.startswith(V1_PREFIX):
            processes = self.v1.pids_peak()
        elif pids.startswith(V2_PREFIX):
            processes = read_int(os.path.join(self.v2.path, "pids.peak"))
            if processes is None:
                processes = read_int(os.path.join(self.v2.path, "pids.current"))
        return memory, processes

    def watch(self, loop: Any, watcher: Any, callback: Callable[[], None]) -> None:
        """Call `callback` when the kernel notifies a crossing: the v1 OOM eventfd,
        v2 memory.events / pids.events changes. (v1 pids.events notifies nothing:
        the sampler reads it.)"""
        self._loop, self._watcher = loop, watcher
        if self.v1 is not None and self.v1._oom_efd is not None:
            fd = self._oom_fd = self.v1._oom_efd

            def on_oom() -> None:
                try:
                    os.eventfd_read(fd)
                except OSError:
                    pass
                callback()

            loop.add_reader(fd, on_oom)
        if self.v2 is not None and watcher is not None:
            for name in ("memory.events", "pids.events"):
                if self.v2.has(name):
                    try:
                        self._v2_watches.append(watcher.watch(os.path.join(self.v2.path, name), callback))
                    except OSError:
                        pass

    def _unwatch(self) -> None:
        if self._oom_fd is not None and self._loop is not None:
            self._loop.remove_reader(self._oom_fd)
            self._oom_fd = None
        for wd in self._v2_watches:
            self._watcher.unwatch(wd)
        self._v2_watches = []

    def v1_live_members(self) -> list[int]:
        return self.v1.live_members() if self.v1 is not None else []

    def cleanup(self) -> bool:
        """Stop watching; kill what is left in the v1 groups and remove them (the v2
        cgroup is the containment's to remove). Never waits (it runs on the event
        loop): a group still busy is removed at close. False if one could not be
        removed now."""
        self._unwatch()
        if self.v1 is not None:
            return bool(self.v1.remove(kill_bound=0))
        return True


def rlimits_for(limits: Limits | None, plan: dict[str, str]) -> dict[str, int]:
    """Resource limits the run sets on itself where no kernel controller enforces.

    Values are headroom above what the run already uses when it starts
    (address space of the forked interpreter, processes of the user), which
    the run adds at bootstrap (worker/bootstrap.py).
    """
    if limits is None:
        return {}
    out: dict[str, int] = {}
    if limits.memory_bytes is not None and plan.get("memory_bytes", "").startswith("sampled"):
        out["as_extra"] = int(limits.memory_bytes)
    if limits.processes is not None and plan.get("processes", "").startswith("sampled"):
        out["nproc_extra"] = int(limits.processes)
    return out
