"""Stop semantics beyond the matrix: escalation, cancellation of the caller,
idempotence, refusals after revoke, in-flight handlers, close()."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time

import pytest

import behaviours
import limit_agents
from waiting import Countdown, late_start_reply
from procscan import marked_processes
from deadstop.supervisor import AsyncSupervisor, Supervisor, ToolCancelled


async def _started(sup: AsyncSupervisor, target, *args, tools=("ready", "tick")) -> tuple:
    ready = asyncio.Event()
    sup.register_tool("ready", ready.set)
    sup.register_tool("tick", lambda: None)
    run = await sup.start(target, *args, tools=list(tools))
    await asyncio.wait_for(ready.wait(), 30)
    return run


def test_stop_all_ends_a_run_that_is_still_starting(monkeypatch) -> None:
    """A run forked and running, its start not yet reported: stop_all revokes it with the others, in the
    same step, and its report (stopped once attached) is among stop_all's; nothing of it outlives that."""
    async def main() -> None:
        async with AsyncSupervisor() as sup:
            ready = asyncio.Event()
            sup.register_tool("ready", ready.set)
            up = await sup.start(limit_agents.sleep_forever, {})
            late_start_reply(sup, monkeypatch, bound=60,
                             until=lambda: any(c.revocation is not None for c in list(sup.broker.channels.values())))
            starting = asyncio.create_task(sup.start(limit_agents.ready_then_sleep, {}, tools=["ready"]))
            await asyncio.wait_for(ready.wait(), 60)  # its first call reached the broker: it runs, unreported
            assert not starting.done()
            reports = await asyncio.wait_for(sup.stop_all(grace=5), 60)
            run = await asyncio.wait_for(starting, 60)
            assert {r.run_id for r in reports} == {up.id, run.id}, reports
            mine = next(r for r in reports if r.run_id == run.id)
            assert mine.outcome == "stopped" and mine.revoke_source == "api" and mine.survivors == 0, mine
            assert run.state.value == "stopped"
            assert marked_processes(run.id) == {} and marked_processes(up.id) == {}

    asyncio.run(main())


def test_a_cancelled_start_leaves_no_run_behind(layer, monkeypatch) -> None:
    """The caller gives up on start() while the spawner has forked the run and its answer is on the way
    (a gateway's timeout): the run is still killed, through its layer, and its end is on record."""
    async def main() -> None:
        async with AsyncSupervisor(containment=layer) as sup:
            ready = asyncio.Event()
            sup.register_tool("ready", ready.set)
            gave_up = asyncio.Event()
            late_start_reply(sup, monkeypatch, until=gave_up.is_set, bound=60)
            starting = asyncio.create_task(sup.start(limit_agents.ready_then_sleep, {}, tools=["ready"]))
            await asyncio.wait_for(ready.wait(), 60)  # forked and running, its start not yet reported
            (run,) = list(sup.runs.values())
            starting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await starting
            gave_up.set()
            info = await run.wait(60)  # the spawner's answer arrives; the run is attached and killed
            assert marked_processes(run.id) == {}, "a process of the cancelled start outlived it"
            report = info.report
            assert report.revoke_source == "supervisor" and report.revoke_reason == "start cancelled", report
            assert report.outcome == "killed" and report.survivors == 0, report

    asyncio.run(main())


def test_kill_escalates_a_stop_in_progress(tmp_path) -> None:
    async def main() -> None:
        async with AsyncSupervisor() as sup:
            run = await _started(sup, behaviours.ignore_term, str(tmp_path))
            stopping = asyncio.create_task(run.stop(grace=60))
            while run.progress is None or run.progress.phase != "grace":  # loop turns, not a timed sleep
                await asyncio.sleep(0)
            assert run.state.value == "stopping" and run.channel.revocation is not None
            report = await run.kill()
            assert report is await stopping
            assert report.outcome == "killed" and report.ended_by == "sigkill"
            assert report.kill_sent_at - report.term_sent_at < 30e9, "kill did not cut the 60 s grace short"
            assert marked_processes(run.id) == {}

    asyncio.run(main())


def test_cancelled_caller_does_not_cancel_the_stop(tmp_path) -> None:
    async def main() -> None:
        async with AsyncSupervisor() as sup:
            run = await _started(sup, behaviours.ignore_term, str(tmp_path))
            caller = asyncio.create_task(run.stop(grace=0.2))
            await asyncio.sleep(0)
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
            info = await run.wait(timeout=30)
            assert info.state.value == "stopped" and info.report.ended_by == "sigkill"
            assert info.report.survivors == 0 and marked_processes(run.id) == {}

    asyncio.run(main())


def test_concurrent_stops_share_one_sequence_and_one_revocation(tmp_path) -> None:
    async def main() -> None:
        async with AsyncSupervisor(state_dir=str(tmp_path)) as sup:
            run = await _started(sup, behaviours.busy, str(tmp_path))
            a, b = await asyncio.gather(run.stop(), run.stop(source="gateway", reason="second"))
            assert a is b and a.revoke_source == "api"
            rec, first = run.channel.revoke("cli", "third")
            assert not first and rec.source == "api"
            db = sqlite3.connect(sup.journal.path)
            assert db.execute("SELECT count(*) FROM revocations WHERE run_id=?", (run.id,)).fetchone() == (1,)
            db.close()

    asyncio.run(main())


def test_every_request_after_revoke_is_refused_and_counted(tmp_path) -> None:
    starts: list[int] = []
    ready = threading.Event()
    work = tmp_path / "work"  # the run's own identity writes its log here; the journal stays apart
    work.mkdir()
    work.chmod(0o777)
    with Supervisor(state_dir=str(tmp_path)) as sup:
        async def tick() -> None:
            starts.append(time.monotonic_ns())

        sup.register_tool("tick", tick)
        sup.register_tool("ready", ready.set)
        run = sup.start(behaviours.stubborn_caller, str(work), tools=["tick", "ready"], grace=0.5, cwd=str(work))
        assert ready.wait(30)
        report = run.stop()
    crash = work / "crash.log"
    assert report.ended_by == "sigkill", (report, crash.read_text() if crash.exists() else "")
    refusals = (work / "refusals.log").read_text().split("\n")[:-1]
    assert refusals, "the run kept calling for the whole grace period and must have been refused"
    assert {tuple(line.split()[:2]) for line in refusals} == {("Revoked", "5")}
    assert all(int(line.split()[2]) > report.revoked_at for line in refusals)
    # The revocation notice told the run; from then on it refused its own calls without
    # sending them. At most the call already on its way reached the broker.
    assert report.refused_after_revoke <= 1, report.refused_after_revoke
    # No handler started after the revoke, so no call after it was answered OK.
    assert starts and max(starts) < report.revoked_at


def test_in_flight_async_handler_is_cancelled_and_its_result_discarded(tmp_path) -> None:
    entered = threading.Event()
    finished: list[str] = []
    with Supervisor(state_dir=str(tmp_path)) as sup:
        async def slow() -> str:
            entered.set()
            await asyncio.sleep(60)
            finished.append("sent")
            return "sent"

        sup.register_tool("slow", slow)
        run = sup.start(behaviours.slow_tool_caller, tools=["slow"], grace=0.2)
        assert entered.wait(30)
        report = run.stop()
        assert report.handlers_cancelled == 1 and finished == []
        db = sqlite3.connect(sup.journal_path)
        rows = db.execute("SELECT decision FROM egress WHERE run_id=? AND tool='slow' ORDER BY seq",
                          (run.id,)).fetchall()
        db.close()
    assert [r[0] for r in rows] == ["dispatched", "cancelled"]


def test_in_flight_sync_handler_cannot_pass_its_commit_gate_after_revoke(tmp_path) -> None:
    """A thread cannot be stopped, but its ctx.check() refuses: the stop waits for it (within the
    grace), and it is then cancelled for real (its effect never ran)."""
    entered = threading.Event()
    outcome: list[str] = []
    with Supervisor(state_dir=str(tmp_path)) as sup:
        def slow(ctx) -> str:
            entered.set()
            while not ctx.revoked:  # bounded by the test's stop below
                time.sleep(0.005)
            try:
                ctx.check()
            except ToolCancelled:
                outcome.append("cancelled at the gate")
                raise
            outcome.append("committed")
            return "sent"

        sup.register_tool("slow", slow)
        run = sup.start(behaviours.slow_tool_caller, tools=["slow"], grace=5)
        assert entered.wait(30)
        report = run.stop()
        assert outcome == ["cancelled at the gate"], "stop() returned before the handler it waits for decided"
        assert report.handlers_cancelled == 1 and report.handlers_outlived_revoke == []
        rows = _egress_rows(sup, run.id, "slow")
    assert [r[0] for r in rows] == ["dispatched", "cancelled"] and "commit gate" in rows[1][1]


def test_a_sync_handler_with_no_check_outlives_the_revoke_and_the_report_says_so(tmp_path) -> None:
    """The effect of a blocking handler already running cannot be taken back: stop() waits for it
    within the grace; the report and the journal name it, with the time it returned after the revoke,
    instead of calling it cancelled."""
    entered = threading.Event()
    effects: list[int] = []
    with Supervisor(state_dir=str(tmp_path)) as sup:
        def send_email(ctx) -> str:
            entered.set()
            while not ctx.revoked:  # bounded by the test's stop below
                time.sleep(0.005)
            time.sleep(0.2)  # the SMTP conversation goes on: no ctx.check() anywhere
            effects.append(time.monotonic_ns())
            return "sent"

        sup.register_tool("send_email", send_email)
        run = sup.start(behaviours.slow_tool_caller, "send_email", tools=["send_email"], grace=5)
        assert entered.wait(30)
        report = run.stop()
        stop_returned = time.monotonic_ns()
        assert len(effects) == 1 and report.revoked_at < effects[0] < stop_returned, "stop() waited for the effect"
        (outlived,) = report.handlers_outlived_revoke
        assert outlived["tool"] == "send_email" and report.revoked_at < outlived["returned_at"] <= stop_returned
        assert report.handlers_cancelled == 0
        rows = _egress_rows(sup, run.id, "send_email")
    assert [r[0] for r in rows] == ["dispatched", "outlived_revoke"] and "returned" in rows[1][1]


def test_a_sync_handler_past_the_grace_is_reported_still_running(tmp_path) -> None:
    entered, release, returned = threading.Event(), threading.Event(), threading.Event()
    with Supervisor(state_dir=str(tmp_path)) as sup:
        def stuck(ctx) -> str:
            entered.set()
            release.wait(60)
            returned.set()
            return "late"

        sup.register_tool("stuck", stuck)
        run = sup.start(behaviours.slow_tool_caller, "stuck", tools=["stuck"], grace=0.2)
        assert entered.wait(30)
        report = run.stop()
        assert report.handlers_outlived_revoke == [{"tool": "stuck", "call_id": 1, "returned_at": None}]
        release.set()
        assert returned.wait(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(_egress_rows(sup, run.id, "stuck")) < 2:  # the row follows it
            time.sleep(0.02)
        rows = _egress_rows(sup, run.id, "stuck")
    assert [r[0] for r in rows] == ["dispatched", "outlived_revoke"]


def _egress_rows(sup, run_id: str, tool: str) -> list[tuple[str, str]]:
    db = sqlite3.connect(sup.journal_path)
    try:
        return db.execute("SELECT decision, COALESCE(detail, '') FROM egress WHERE run_id=? AND tool=? ORDER BY seq",
                          (run_id, tool)).fetchall()
    finally:
        db.close()


def test_events_reach_subscribers_in_order() -> None:
    with Supervisor() as sup:
        events = sup.subscribe()
        run = sup.start(behaviours.emits, 5)
        assert run.result(timeout=30) == 5
        got = []
        for ev in events:
            if ev.run_id == run.id:
                got.append((ev.kind, ev.data))
            if ev.kind == "run.ended" and ev.run_id == run.id:
                break
    assert got == [("progress", {"i": i}) for i in range(5)] + [("run.ended", {"state": "exited"})]


def test_close_kills_every_live_run(workspace) -> None:
    ready = Countdown(3)

    sup = Supervisor()
    sup.register_tool("ready", ready)
    sup.register_tool("tick", lambda: None)
    # The escaper writes its pid file into its cwd.
    runs = [sup.start(t, str(workspace), tools=["ready", "tick"], cwd=str(workspace))
            for t in (behaviours.ignore_term, behaviours.setsid_escaper, behaviours.busy)]
    assert ready.wait(30)
    sup.close()
    for run in runs:
        assert run.state.value == "killed"
        assert run.report.revoke_source == "supervisor" and run.report.survivors == 0
        assert marked_processes(run.id) == {}


def test_calls_sharing_a_request_id_are_all_cancelled(tmp_path) -> None:
    """Two in-flight calls of one run with the same id: revoke must cancel both."""
    entered = threading.Semaphore(0)
    effects: list[int] = []
    with Supervisor(state_dir=str(tmp_path)) as sup:
        async def slow() -> str:
            entered.release()
            await asyncio.sleep(60)
            effects.append(time.monotonic_ns())
            return "sent"

        sup.register_tool("slow", slow)
        run = sup.start(behaviours.duplicate_ids, 2, tools=["slow"])
        assert entered.acquire(timeout=30) and entered.acquire(timeout=30)
        report = run.stop()
    assert report.handlers_cancelled == 2
    assert effects == []


def test_a_failing_stop_sequence_still_ends_the_tree_and_reports_it(tmp_path) -> None:
    """A host failure in the middle of the sequence (here: SIGTERM cannot be sent) must not
    leave the run half-stopped: the fail-safe kills and sweeps the layer, and the report says so."""
    async def main() -> None:
        async with AsyncSupervisor() as sup:
            run = await _started(sup, behaviours.tree, str(tmp_path), 5)
            assert len(marked_processes(run.id)) >= 6

            def broken_signal(sig: int) -> None:
                raise OSError(5, "the host failed under the stop")
            run.containment.signal = broken_signal  # the fault injected; the fail-safe is what is tested
            report = await run.stop(grace=30)
            assert report.ended_by == "failsafe" and "the host failed under the stop" in report.failure, report
            assert report.outcome == "killed" and report.survivors == 0, report
            assert report.revoked_at <= report.kill_sent_at, report
            assert marked_processes(run.id) == {}, "the fail-safe left processes of the run alive"
            assert run.state.value == "killed"

    asyncio.run(main())


def test_an_isolated_tool_is_killed_mid_call_by_its_callers_stop(tmp_path, workspace, ready) -> None:
    """register_tool(isolated=True): the blocking handler runs in a helper run of its own, which the
    caller's revoke kills in the same step; its effect (a file it writes 0.5 s in) never happens."""
    outbox = str(workspace)
    with Supervisor(state_dir=str(tmp_path / "state")) as sup:
        sup.register_tool("send_email", behaviours.blocking_send, isolated=True, cwd=outbox)
        done = sup.start(behaviours.calls_with, "send_email",
                         {"to": "ok", "ready_path": ready.path, "outbox": outbox}, tools=["send_email"])
        assert done.result(60) == {"ok": True, "value": "sent to ok"}  # it works when left to finish
        ready.wait(1)
        run = sup.start(behaviours.calls_with, "send_email", {"to": "cut", "ready_path": ready.path, "outbox": outbox},
                        tools=["send_email"], grace=0.2)
        ready.wait(1)  # the helper is in the middle of its call
        report = run.stop()
        assert report.helpers_killed == 1 and report.survivors == 0
        helpers = [r for r in sup.run_records() if r.target.endswith("blocking_send")]
        assert sorted(h.state for h in helpers) == ["exited", "killed"]
        assert all(marked_processes(h.id) == {} for h in helpers), "a helper outlived the stop"
    assert os.path.exists(os.path.join(outbox, "sent-to-ok"))
    assert not os.path.exists(os.path.join(outbox, "sent-to-cut")), "the effect happened after the stop"

def test_stop_all_revokes_every_run_before_signalling_any(tmp_path) -> None:
    ready = Countdown(4)
    with Supervisor(state_dir=str(tmp_path / "state")) as sup:
        sup.register_tool("ready", ready)
        runs = [sup.start(behaviours.victim, tools=["ready"]) for _ in range(4)]
        assert ready.wait(30)
        reports = sup.stop_all(grace=1.0)
    assert len(reports) == 4 and all(r.survivors == 0 for r in reports)
    assert all(r.requested_at <= r.revoked_at for r in reports), "requested_at is taken before the revokes"
    first_signal = min(r.term_sent_at or r.kill_sent_at for r in reports)
    assert max(r.revoked_at for r in reports) < first_signal, "every run revoked before any is signalled"
    assert all(marked_processes(r.id) == {} for r in runs)
