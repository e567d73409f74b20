"""Limits the kernel enforces: hostile runs against memory_bytes and processes.

Each attack is a real run that tries to get past its limit (a fork bomb, a
pile of children each allocating memory, a memfd that no process's RSS
shows). What is asserted is the promise, checked independently of deadstop's
own code: the kernel's own counters of the run's cgroup, read by the test
from the cgroup filesystem (found from /proc/self/mountinfo by this file's
own parser), and the run's processes counted from /proc by their marker
(tests/procscan.py). The run must never be over its limit, and the report
must name the limit and the mechanism.

The attacks need a kernel controller; on a host without one they are skipped
(the refusal of an unenforceable limit is tested on every host, by hiding
the v1 hierarchies from the probe).
"""

from __future__ import annotations

import os
import threading
import time

import pytest

import limit_agents
from procscan import MARKER, marked_processes, wait_gone
from deadstop.supervisor import Limits, LimitUnenforceable, Supervisor
from deadstop.supervisor.mechanisms import cgroup_v1
from waiting import Countdown

BOUND = 30.0
MiB = 1 << 20


# -- an independent view of the cgroup filesystem -----------------------------------
def _mounts() -> dict[str, str]:
    """'v2' and each v1 controller -> mount point, parsed here (not by deadstop)."""
    out: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _src, opts = (right.split() + ["", "", ""])[:3]
            point = left.split()[4]
            if fstype == "cgroup2":
                out.setdefault("v2", point)
            elif fstype == "cgroup":
                for opt in opts.split(","):
                    out.setdefault(opt, point)
    return out


def _gone(name: str, timeout: float = 15.0) -> bool:
    """True once no cgroup directory called `name` is left (the run's end removes them, on a
    short backoff when the kernel still has them busy); bounded."""
    deadline = time.monotonic() + timeout
    while _find_dirs(name):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _find_dirs(name: str, controllers=("memory", "pids", "v2"), depth: int = 6) -> dict[str, str]:
    """controller -> the directory called `name` in that hierarchy (bounded walk)."""
    found: dict[str, str] = {}
    mounts = _mounts()
    for c in controllers:
        top = mounts.get(c)
        if top is None:
            continue
        for dirpath, dirnames, _files in os.walk(top):
            if dirpath.count(os.sep) - top.count(os.sep) >= depth:
                dirnames[:] = []
            if name in dirnames:
                found[c] = os.path.join(dirpath, name)
                break
    return found


def _dirs_with_prefix(prefix: str) -> list[str]:
    out = []
    for c, top in _mounts().items():
        for dirpath, dirnames, _files in os.walk(top):
            if dirpath.count(os.sep) - top.count(os.sep) >= 6:
                dirnames[:] = []
            out.extend(os.path.join(dirpath, d) for d in dirnames if d.startswith(prefix))
    return out


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _keyed(path: str) -> dict[str, int]:
    try:
        with open(path) as f:
            return {k: int(v) for k, v in (line.split() for line in f if line.strip())}
    except OSError:
        return {}


class CgroupWatch(threading.Thread):
    """Reads a run's group files every ~2 ms until the group is removed, keeping
    the largest value seen of each (the kernel's peaks are monotonic, so the
    last read before the removal is the peak up to then)."""

    def __init__(self, files: dict[str, str]):
        super().__init__(daemon=True)
        self.files = files
        self.peak: dict[str, int] = {}
        self.reads = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            alive = False
            for key, path in self.files.items():
                value = _read_int(path)
                if value is not None:
                    alive = True
                    self.peak[key] = max(self.peak.get(key, 0), value)
            self.reads += 1
            if not alive:
                return
            time.sleep(0.002)

    def stop(self) -> None:
        self.done.set()
        self.join(BOUND)


def _live_by_marker() -> dict[str, int]:
    """run id -> live (non-zombie) processes carrying its marker, read from /proc.

    No filter on the test session's variable: a run under isolation starts
    from a clean environment. Only counts are taken here; the leak check
    (conftest) is what kills strays."""
    counts: dict[str, int] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if stat[stat.rindex(b")") + 2:].split()[0] in (b"Z", b"X"):
            continue
        for entry in env:
            if entry.startswith(MARKER):
                run_id = entry[len(MARKER):].decode(errors="replace")
                counts[run_id] = counts.get(run_id, 0) + 1
                break
    return counts


class ProcessCount(threading.Thread):
    """Counts each run's live processes from /proc, as often as it can; keeps the peak per run."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peaks: dict[str, int] = {}
        self.scans = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for run_id, n in _live_by_marker().items():
                self.peaks[run_id] = max(self.peaks.get(run_id, 0), n)
            self.scans += 1

    def stop(self) -> None:
        self.done.set()
        self.join(BOUND)


def _kernel_mechanism(sup: Supervisor, limit: str) -> str:
    mech = sup.limit_enforcement[limit]
    if not mech.startswith("cgroup-"):
        pytest.skip(f"no kernel controller for {limit} on this host: {mech}")
    return mech


def _assert_quota_stop(run, limit: str, mechanism: str) -> None:
    report = run.report
    assert report is not None
    assert report.limit == limit, report
    assert report.revoke_source == "quota", report
    assert report.outcome == "stopped", report
    assert limit in report.revoke_reason, report
    assert report.survivors == 0, report
    assert report.limits_enforcement[limit] == mechanism, report
    assert marked_processes(run.id) == {} and not _live_by_marker().get(run.id), \
        "a process of the run outlived its quota stop"


def _group_files(run_id: str, mechanism: str, names: list[str]) -> dict[str, str]:
    controller = mechanism.split(":")[1]
    key = "v2" if mechanism.startswith("cgroup-v2") else controller
    dirs = _find_dirs(f"run-{run_id}", controllers=(key,))
    assert key in dirs, f"the run's {mechanism} group was not found in the cgroup filesystem"
    return {n: os.path.join(dirs[key], n) for n in names}


# -- processes -------------------------------------------------------------------------
def test_fork_bomb_never_exceeds_processes(layer, tmp_path) -> None:
    limit = 20
    counter = ProcessCount()
    with Supervisor(state_dir=str(tmp_path), containment=layer) as sup:
        mech = _kernel_mechanism(sup, "processes")
        peak_file = "pids.peak"
        sup.register_agent("bomb", limit_agents.fork_bomb, limits=Limits(processes=limit), grace=0.5)
        s = sup.session("bomb", agent="bomb")
        counter.start()
        try:
            run = s.send({"seconds": 3.0, "life": 0.3, "cap": 2000})
            files = _group_files(run.id, mech, [peak_file, "pids.current"])
            watch = CgroupWatch(files)
            watch.start()
            run.wait(BOUND)
            watch.stop()
        finally:
            counter.stop()
        _assert_quota_stop(run, "processes", mech)
        assert counter.scans > 0 and watch.reads > 0
        seen = counter.peaks.get(run.id, 0)
        assert seen <= limit, f"{seen} processes of the run alive at once; the limit is {limit}"
        assert watch.peak.get("pids.current", 0) <= limit, watch.peak
        assert watch.peak.get(peak_file, 0) <= limit, watch.peak
        assert run.report and s.usage.peak_processes <= limit, s.usage
        # the /proc counter may miss the bomb's short-lived children on a loaded host; the kernel's peak does not
        assert max(seen, watch.peak.get(peak_file, 0)) >= 2, "the bomb never forked: the test proves nothing"
        assert _gone(f"run-{run.id}"), "the run's cgroups outlived it"


# -- memory ----------------------------------------------------------------------------
def _memory_peak_until_stopped(run, mech: str, limit: int) -> int:
    """Watch the run's memory as the kernel counts it until the run ends; it must end for
    memory_bytes and never be charged more than `limit`. Returns the peak seen."""
    names = (["memory.max_usage_in_bytes", "memory.usage_in_bytes"] if mech.startswith("cgroup-v1")
             else ["memory.peak", "memory.current"])
    watch = CgroupWatch(_group_files(run.id, mech, names))
    watch.start()
    run.wait(BOUND)
    watch.stop()
    _assert_quota_stop(run, "memory_bytes", mech)
    peak = max(watch.peak.values(), default=0)
    assert peak <= limit, f"the kernel charged the run {peak / MiB:.1f} MiB; the limit is {limit / MiB:.0f} MiB"
    return peak


def test_children_allocating_never_exceed_memory(layer, tmp_path) -> None:
    limit = 200 * MiB
    allocated = Countdown(8)
    with Supervisor(state_dir=str(tmp_path), containment=layer) as sup:
        mech = _kernel_mechanism(sup, "memory_bytes")
        sup.register_tool("allocated", allocated)
        sup.register_agent("hogs", limit_agents.children_allocate, tools=["allocated"],
                           limits=Limits(memory_bytes=limit), grace=0.5)
        s = sup.session("hogs", agent="hogs")
        run = s.send({"children": 8, "mb": 40, "hold": 20})
        peak = _memory_peak_until_stopped(run, mech, limit)
        assert peak >= limit - 45 * MiB, f"the run only reached {peak / MiB:.1f} MiB: the test proves nothing"
        # Five children's 40 MiB alone would be 200 MiB: at most four can have finished.
        finished = 8 - allocated._left
        assert finished <= 4, f"{finished} children allocated 40 MiB each under a 200 MiB limit"
        assert s.usage.peak_memory_bytes <= limit, s.usage
        assert _gone(f"run-{run.id}"), "the run's cgroups outlived it"


def test_memfd_is_counted(layer, tmp_path) -> None:
    limit = 200 * MiB
    written: list[int] = []
    with Supervisor(state_dir=str(tmp_path), containment=layer) as sup:
        mech = _kernel_mechanism(sup, "memory_bytes")
        sup.register_tool("progress", written.append)
        sup.register_agent("memfd", limit_agents.memfd_hog, tools=["progress"],
                           limits=Limits(memory_bytes=limit), grace=0.5)
        s = sup.session("memfd", agent="memfd")
        run = s.send({"mb": 600, "hold": 20})
        _memory_peak_until_stopped(run, mech, limit)
        assert max(written, default=0) < 200, f"the run wrote {max(written)} MiB into its memfd"
        assert s.usage.peak_memory_bytes <= limit, s.usage


# -- refusal where the kernel cannot enforce ----------------------------------------------
@pytest.fixture
def no_v1(tmp_path, monkeypatch):
    """The v1 probe sees a mountinfo without v1 hierarchies (and the run has no v2
    cgroup: containment="process-group"), so no kernel controller is available."""
    fake = tmp_path / "mountinfo"
    with open("/proc/self/mountinfo") as f:
        fake.write_text("".join(line for line in f if " - cgroup " not in line))
    monkeypatch.setattr(cgroup_v1, "MOUNTINFO", str(fake))


def test_unenforceable_limit_is_refused(tmp_path, no_v1) -> None:
    with Supervisor(state_dir=str(tmp_path), containment="process-group") as sup:
        assert sup.limit_enforcement["memory_bytes"].startswith("sampled only")
        assert sup.limit_enforcement["processes"].startswith("sampled only")
        with pytest.raises(LimitUnenforceable, match=r"memory_bytes.*enforcement=\"sampled\""):
            sup.register_agent("hog", limit_agents.allocate, limits=Limits(memory_bytes=60 * MiB))
        assert "hog" not in sup.core.agents
        with pytest.raises(LimitUnenforceable, match="processes"):
            sup.start(limit_agents.sleep_forever, None, limits=Limits(processes=5))
        assert sup.runs() == [], "a refused start left a run behind"
        assert marked_processes() == {}
        # Limits the kernel is not asked for are fine.
        sup.register_agent("clock", limit_agents.sleep_forever, limits=Limits(wall_clock=1.0, tool_calls=3))


def test_sampling_accepted_explicitly(tmp_path, no_v1) -> None:
    limit = 60 * MiB
    with Supervisor(state_dir=str(tmp_path), containment="process-group") as sup:
        sup.register_agent("hog", limit_agents.allocate,
                           limits=Limits(memory_bytes=limit, enforcement="sampled"))
        s = sup.session("memory", agent="hog")
        run = s.send({"step_mb": 5, "max_mb": 400})
        run.wait(BOUND)
        _assert_quota_stop(run, "memory_bytes", "sampled+RLIMIT_AS")
        assert s.usage.peak_memory_bytes > limit, s.usage


def test_limits_enforcement_validated() -> None:
    with pytest.raises(ValueError, match="enforcement"):
        Limits(memory_bytes=MiB, enforcement="hope")


# -- cleanup ---------------------------------------------------------------------------------
def test_v1_groups_removed_at_run_end_and_close(layer, tmp_path) -> None:
    ready = Countdown(1)
    with Supervisor(state_dir=str(tmp_path), containment=layer) as sup:
        mech = _kernel_mechanism(sup, "processes")
        if not mech.startswith("cgroup-v1"):
            pytest.skip("the v2 controllers enforce here; no v1 groups to remove")
        sup.register_tool("ready", ready)
        sup.register_agent("sleeper", limit_agents.ready_then_sleep, tools=["ready"],
                           limits=Limits(processes=10, memory_bytes=100 * MiB))
        first = sup.session("first", agent="sleeper").send("x")
        assert ready.wait(BOUND)
        dirs = _find_dirs(f"run-{first.id}", controllers=("memory", "pids"))
        assert set(dirs) == {"memory", "pids"}, dirs
        with open(os.path.join(dirs["pids"], "cgroup.procs")) as f:
            assert first.pid in {int(x) for x in f.read().split()}, "the run did not join its v1 pids group"
        first.stop()
        assert _gone(f"run-{first.id}"), "the run's v1 groups outlived its stop"
        second = sup.session("second", agent="sleeper").send("x")
        assert _find_dirs(f"run-{second.id}", controllers=("memory", "pids"))
        sup_id = sup.id
        assert _dirs_with_prefix(f"deadstop-{sup_id}-")
    # close() with the second run still live
    assert not _find_dirs(f"run-{second.id}"), "a live run's v1 groups outlived close()"
    assert not _dirs_with_prefix(f"deadstop-{sup_id}-"), "the supervisor's subtrees outlived close()"


def test_dead_supervisors_v1_groups_are_removed(tmp_path) -> None:
    """A SIGKILLed supervisor leaves its v1 subtree (with a process in it); the next one removes both."""
    import asyncio
    import signal
    import subprocess

    from deadstop.supervisor.mechanisms import leftovers

    roots = cgroup_v1.leftover_roots()
    if not roots:
        pytest.skip("no v1 memory/pids hierarchy here")
    # A "supervisor" that dies at once: its pid and start time name the subtree.
    owner = subprocess.Popen(["sleep", "30"])
    ticks = leftovers.start_ticks(owner.pid)
    name = f"deadstop-dead0001-{owner.pid}-{ticks}-{leftovers.pid_namespace()}"
    made = []
    victim = subprocess.Popen(["sleep", "30"])
    try:
        for root in roots:
            os.mkdir(os.path.join(root, name))
            made.append(os.path.join(root, name))
            run_dir = os.path.join(root, name, "run-0123")
            os.mkdir(run_dir)
            with open(os.path.join(run_dir, "cgroup.procs"), "w") as f:
                f.write(str(victim.pid))
        owner.send_signal(signal.SIGKILL)
        owner.wait(BOUND)
        # The v1 part of the sweep every supervisor runs at open (leftovers.sweep()).
        removed = asyncio.run(leftovers.sweep_cgroup_roots(cgroup_v1.leftover_roots(), v2=False))
        paths = {r["path"] for r in removed}
        for d in made:
            assert d in paths, (d, removed)
            assert not os.path.exists(d)
        assert victim.wait(BOUND) == -signal.SIGKILL, "the process left in the dead supervisor's group lives"
    finally:
        for p in (owner, victim):
            if p.poll() is None:
                p.kill()
                p.wait()
        for d in made:
            if os.path.exists(d):
                cgroup_v1.remove_group(d)


def test_run_cannot_leave_its_v1_groups(tmp_path) -> None:
    """A run with its own identity joined its groups as root, then dropped
    privileges: writing itself into any other group's cgroup.procs fails, and
    it is still in its groups (read from outside, /proc/<pid>/cgroup)."""
    got: list[dict] = []
    ready = threading.Event()

    def report(results: dict) -> None:
        got.append(results)
        ready.set()

    with Supervisor(state_dir=str(tmp_path)) as sup:
        mech = _kernel_mechanism(sup, "processes")
        if not mech.startswith("cgroup-v1"):
            pytest.skip("the v2 controllers enforce here")
        if not sup.core.isolation.has("identity"):
            pytest.skip("runs share the supervisor's identity here (isolation without per-run uids)")
        mounts = _mounts()
        targets = []
        for c in ("memory", "pids"):
            targets.append(os.path.join(mounts[c], "cgroup.procs"))  # the hierarchy's root
            for d in cgroup_v1.leftover_roots():
                if d.startswith(mounts[c] + "/") or d == mounts[c]:
                    targets.append(os.path.join(d, "cgroup.procs"))  # the supervisor's own group
        sup.register_tool("report", report)
        sup.register_agent("leaver", limit_agents.leave_v1_groups, tools=["report"],
                           limits=Limits(processes=10, memory_bytes=100 * MiB))
        run = sup.session("leaver", agent="leaver").send({"targets": sorted(set(targets))})
        assert ready.wait(BOUND), "the run never reported"
        assert "moved" not in got[0].values(), got[0]
        with open(f"/proc/{run.pid}/cgroup") as f:
            lines = {c: line.rstrip("\n").rpartition(":")[2] for line in f
                     for c in line.split(":")[1].split(",") if c in ("memory", "pids")}
        for c in ("memory", "pids"):
            assert lines[c].endswith(f"/run-{run.id}"), (c, lines)
        run.stop()
        assert run.report.survivors == 0


def test_escaper_is_still_killed_through_its_v1_groups(layer, tmp_path) -> None:
    """A root run (isolation="off") whose child leaves its process group, its v2
    cgroup and its marker behind is still in its v1 groups: the stop kills it
    there and reports it as escaped, never as a clean stop with a survivor."""
    escaped: list[int] = []
    ready = threading.Event()

    def on_escaped(pid: int) -> None:
        escaped.append(pid)
        ready.set()

    with Supervisor(state_dir=str(tmp_path), containment=layer, isolation="off") as sup:
        mech = _kernel_mechanism(sup, "processes")
        if not mech.startswith("cgroup-v1"):
            pytest.skip("the v2 controllers enforce here; no v1 groups")
        v2 = _mounts().get("v2")
        sup.register_tool("escaped", on_escaped)
        sup.register_agent("escaper", limit_agents.escape_then_linger, tools=["escaped"], grace=0.3,
                           limits=Limits(processes=10))
        message = {"linger": 20, "v2_procs": os.path.join(v2, "cgroup.procs") if layer == "cgroup" else None}
        run = sup.session("escaper", agent="escaper").send(message)
        assert ready.wait(BOUND), "the child never escaped"
        child = escaped[0]
        report = run.stop()
        assert report.survivors == 0, report
        assert child in report.escaped_pids, report
        assert report.escaped >= 1, report
        # Dead: gone, or a zombie its new parent (the spawner) has yet to reap.
        assert wait_gone([child], 5) == [], "the escaper outlived the stop"
        assert _gone(f"run-{run.id}"), "the run's cgroups outlived it"
