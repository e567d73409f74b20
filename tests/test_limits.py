"""Limits: each one crossed by a real run, which is then stopped and named.

Small limits, real processes. Every test checks that the report names the
limit, that the run was stopped by the quota (not by anything else), and that
none of the run's processes survives (an independent /proc scan).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time


import limit_agents
from procscan import marked_processes
from deadstop.supervisor import Limits, Supervisor
from waiting import Countdown, late_start_reply

QUOTA_EXCEEDED = 14
BOUND = 30.0  # generous bound on every wait: a hang fails, a slow machine does not


class Gate:
    """A tool handler that counts its calls and blocks call number `hold_at`
    until the test opens the gate (so the test can look at live usage)."""

    def __init__(self, hold_at: int | None = None, tokens: dict[str, int] | None = None):
        self.calls = 0
        self.hold_at = hold_at
        self.tokens = tokens
        self.held = threading.Event()
        self.go = threading.Event()
        self._lock = threading.Lock()

    def handler(self, ctx) -> str:
        with self._lock:
            self.calls += 1
            n = self.calls
        if n == self.hold_at:
            self.held.set()
            assert self.go.wait(BOUND), "the test never opened the gate"
        if self.tokens:
            ctx.report_usage(**self.tokens)
        return "ok"


def _refusal(path) -> tuple[str, int, int]:
    with open(path) as f:
        name, code, index = f.read().split()
    return name, int(code), int(index)


def _egress(journal_path: str, run_id: str) -> list[tuple[str, str, int | None]]:
    db = sqlite3.connect(journal_path)
    try:
        return db.execute("SELECT tool, decision, code FROM egress WHERE run_id = ? AND verb = 'call' ORDER BY seq",
                          (run_id,)).fetchall()
    finally:
        db.close()


def _assert_stopped_by(run, limit: str) -> None:
    report = run.report
    assert report is not None
    assert report.limit == limit, report
    assert report.outcome == "stopped", report
    assert report.revoke_source == "quota", report
    assert limit in report.revoke_reason, report
    assert report.survivors == 0, report
    assert marked_processes(run.id) == {}, "a process of the run outlived its quota stop"


def _workspace(tmp_path):
    """A directory the run's own identity can write (its cwd): evidence files go there."""
    work = tmp_path / "work"
    work.mkdir()
    os.chmod(work, 0o777)
    return work


def test_tool_calls_limit(tmp_path) -> None:
    gate = Gate(hold_at=3)
    work = _workspace(tmp_path)
    with Supervisor(state_dir=str(tmp_path)) as sup:
        sup.register_tool("work", gate.handler)
        sup.register_agent("caller", limit_agents.call_until_refused, tools=["work"], grace=BOUND,
                           limits=Limits(tool_calls=5), cwd=str(work))
        s = sup.session("calls", agent="caller")
        out = work / "refusal"
        run = s.send({"tool": "work", "n": 100, "out": str(out)})

        assert gate.held.wait(BOUND), "the run never made its third call"
        live = s.usage
        assert live.tool_calls == 3, live
        assert s.state == "running"
        gate.go.set()

        run.wait(BOUND)
        _assert_stopped_by(run, "tool_calls")
        assert run.report.limits_enforcement == {"tool_calls": "broker"}, run.report
        assert gate.calls == 5, f"{gate.calls} calls reached the handler; the limit is 5"
        name, code, index = _refusal(out)
        assert (code, index) == (QUOTA_EXCEEDED, 5), f"the 6th call should be refused with 14, got {name} {code} at {index}"
        assert s.usage.tool_calls == 5
        rows = _egress(sup.journal_path, run.id)
        assert [d for _, d, _ in rows].count("dispatched") == 5, rows
        assert ("work", "refused", QUOTA_EXCEEDED) in rows, rows
        assert s.state == "idle" and s.info()["aborted_last_run"] is True


def test_a_limit_crossed_before_the_supervisor_knows_the_run_started_still_stops_it(tmp_path, monkeypatch) -> None:
    """The run's calls reach the broker before the spawner's word that it started: the quota
    refusal closes its egress at once, and its stop begins as soon as there is a leader to signal."""
    work = _workspace(tmp_path)
    out = work / "refused"
    with Supervisor(state_dir=str(tmp_path)) as sup:
        sup.register_tool("work", lambda: "ok")
        late_start_reply(sup, monkeypatch, until=out.exists, bound=BOUND)
        run = sup.start(limit_agents.call_until_refused_then_sleep, {"tool": "work", "out": str(out)},
                        tools=["work"], limits=Limits(tool_calls=2), cwd=str(work), grace=BOUND)
        assert out.exists(), "the run was not refused before its start was reported"
        run.wait(BOUND)
        _assert_stopped_by(run, "tool_calls")
        assert [d for _, d, _ in _egress(sup.journal_path, run.id)].count("dispatched") == 2


def test_tokens_limit(tmp_path) -> None:
    gate = Gate(hold_at=2, tokens={"prompt_tokens": 40, "completion_tokens": 20})
    work = _workspace(tmp_path)
    with Supervisor(state_dir=str(tmp_path)) as sup:
        sup.register_tool("llm", gate.handler)
        sup.register_agent("talker", limit_agents.call_until_refused, tools=["llm"], grace=BOUND,
                           limits=Limits(tokens=100), cwd=str(work))
        s = sup.session("tokens", agent="talker")
        out = work / "refusal"
        run = s.send({"tool": "llm", "n": 100, "out": str(out)})

        assert gate.held.wait(BOUND), "the run never made its second call"
        live = s.usage
        assert live.tokens == 60, live
        assert live.tool_calls == 2, live
        gate.go.set()

        run.wait(BOUND)
        _assert_stopped_by(run, "tokens")
        assert gate.calls == 2, f"{gate.calls} calls reached the handler; 120 tokens crossed 100 at the 2nd"
        _name, _code, index = _refusal(out)
        assert index <= 2, "the run was not refused right after crossing its token limit"
        assert s.usage.tokens >= 120, s.usage
        assert [d for _, d, _ in _egress(sup.journal_path, run.id)].count("dispatched") == 2


def test_wall_clock_limit(tmp_path) -> None:
    ready = Countdown(1)
    with Supervisor(state_dir=str(tmp_path)) as sup:
        sup.register_tool("ready", ready)
        sup.register_agent("sleeper", limit_agents.ready_then_sleep, tools=["ready"],
                           limits=Limits(wall_clock=0.5))
        s = sup.session("clock", agent="sleeper")
        started = time.monotonic()
        run = s.send("sleep")
        assert ready.wait(BOUND)
        assert s.state == "running"
        assert s.usage.wall_clock > 0

        run.wait(BOUND)
        elapsed = time.monotonic() - started
        _assert_stopped_by(run, "wall_clock")
        assert run.report.limits_enforcement == {"wall_clock": "timer"}, run.report
        assert elapsed >= 0.5
        assert s.usage.wall_clock >= 0.5, s.usage


def test_paused_time_does_not_count_against_wall_clock(tmp_path) -> None:
    ready = Countdown(1)
    with Supervisor(state_dir=str(tmp_path)) as sup:
        sup.register_tool("ready", ready)
        sup.register_agent("napper", limit_agents.sleep_pause_point_sleep, tools=["ready"],
                           limits=Limits(wall_clock=0.8))
        s = sup.session("nap", agent="napper")
        started = time.monotonic()
        run = s.send({"before": 0.3, "after": 0.3})
        assert ready.wait(BOUND), "the run never reached its pause point"
        assert s.pause()
        assert s.state == "paused"
        frozen_usage = s.usage.wall_clock
        time.sleep(1.0)  # the paused time being measured, not a synchronisation
        assert s.usage.wall_clock == frozen_usage, "the clock ran while paused"
        assert s.resume()

        assert run.result(BOUND) == "done"
        elapsed = time.monotonic() - started
        report = run.report
        assert report.outcome == "exited" and report.limit is None, report
        assert elapsed > 1.6, "the run cannot have finished before its sleeps and the pause"
        assert s.usage.wall_clock < 0.8, s.usage
        assert marked_processes(run.id) == {}


def test_cpu_seconds_limit(layer, tmp_path) -> None:
    ready = Countdown(1)
    with Supervisor(state_dir=str(tmp_path), containment=layer) as sup:
        sup.register_tool("ready", ready)
        sup.register_agent("spinner", limit_agents.busy_loop, tools=["ready"], limits=Limits(cpu_seconds=0.3))
        s = sup.session("cpu", agent="spinner")
        run = s.send("spin")
        assert ready.wait(BOUND)
        run.wait(BOUND)
        _assert_stopped_by(run, "cpu_seconds")
        assert s.usage.cpu_seconds > 0.3, s.usage
        assert run.report.limits_enforcement == {"cpu_seconds": "sampled"}, run.report


def _kernel_or_sampled(sup, limit: str) -> tuple[str, str]:
    """(mechanism, enforcement to ask for): the kernel where this host has a
    controller for `limit`, else sampling, accepted explicitly."""
    mech = sup.limit_enforcement[limit]
    if mech.startswith("cgroup-"):
        return mech, "kernel"
    return ("sampled+RLIMIT_AS" if limit == "memory_bytes" else "sampled"), "sampled"


def test_memory_limit(layer, tmp_path) -> None:
    limit = 60 << 20
    with Supervisor(state_dir=str(tmp_path), containment=layer) as sup:
        mech, enforcement = _kernel_or_sampled(sup, "memory_bytes")
        sup.register_agent("hog", limit_agents.allocate, limits=Limits(memory_bytes=limit, enforcement=enforcement))
        s = sup.session("memory", agent="hog")
        run = s.send({"step_mb": 5, "max_mb": 400})
        run.wait(BOUND)
        _assert_stopped_by(run, "memory_bytes")
        assert run.report.limits_enforcement["memory_bytes"] == mech, run.report
        if enforcement == "kernel":
            # The kernel never charges the run past its limit; it got there (5 MiB steps).
            assert limit - (8 << 20) <= s.usage.peak_memory_bytes <= limit, s.usage
        else:
            assert s.usage.peak_memory_bytes > limit, s.usage


def test_processes_limit(layer, tmp_path) -> None:
    with Supervisor(state_dir=str(tmp_path), containment=layer) as sup:
        mech, enforcement = _kernel_or_sampled(sup, "processes")
        sup.register_agent("forker", limit_agents.fork_sleepers,
                           limits=Limits(processes=5, enforcement=enforcement))
        s = sup.session("forks", agent="forker")
        run = s.send({"children": 10})
        run.wait(BOUND)
        _assert_stopped_by(run, "processes")
        assert run.report.limits_enforcement["processes"] == mech, run.report
        if enforcement == "kernel":
            # The sixth fork was refused (EAGAIN): the run reached its limit, never more.
            assert s.usage.peak_processes == 5, s.usage
        else:
            assert s.usage.peak_processes > 5, s.usage
