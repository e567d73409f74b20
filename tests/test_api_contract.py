"""The API keeps its word: clear, public errors instead of surprises."""

from __future__ import annotations

import os
import time
import warnings

import pytest

import behaviours
from deadstop.supervisor import (InvalidTarget, InvalidTransition, RunTimeout, Supervisor, SupervisorClosed)


def test_a_closed_supervisor_says_so_from_every_verb(workspace) -> None:
    sup = Supervisor()
    run = sup.start(behaviours.returns, 1)
    assert run.result(timeout=30) == 1
    sup.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "coroutine was never awaited"
        with pytest.raises(SupervisorClosed):
            sup.start(behaviours.returns, 2)
        with pytest.raises(SupervisorClosed):
            run.stop()
        with pytest.raises(SupervisorClosed):
            sup.stop_all()


def test_limits_as_a_dict_and_a_clear_error_for_an_unknown_one(workspace) -> None:
    with Supervisor() as sup:
        sup.register_tool("echo", lambda x: x)
        run = sup.start(behaviours.calls_and_reports, "echo", "x", tools=["echo"], limits={"tool_calls": 3})
        run.wait(timeout=30)
        with pytest.raises(ValueError, match="tool_cals"):
            sup.start(behaviours.returns, 1, limits={"tool_cals": 3})


def test_a_missing_cwd_is_refused_at_start(tmp_path) -> None:
    with Supervisor() as sup:
        with pytest.raises(InvalidTarget, match="no-such-dir"):
            sup.start(["/bin/true"], cwd=str(tmp_path / "no-such-dir"))


def test_pause_of_a_run_that_is_not_running_is_a_public_error(workspace) -> None:
    with Supervisor() as sup:
        run = sup.start(behaviours.returns, 1)
        run.wait(timeout=30)
        with pytest.raises(InvalidTransition) as info:
            run.pause()
        assert run.id in str(info.value)


def test_a_result_timeout_names_the_run_and_its_state(workspace) -> None:
    with Supervisor() as sup:
        run = sup.start(behaviours.victim)
        started = time.monotonic()
        with pytest.raises(RunTimeout) as info:
            run.result(timeout=0.3)
        assert time.monotonic() - started < 10
        assert isinstance(info.value, TimeoutError)
        assert info.value.run_id == run.id and info.value.state == "running" and run.id in str(info.value)
        run.stop()


def test_pausing_an_idle_session_says_it_did_nothing() -> None:
    with Supervisor() as sup:
        sup.register_agent("idle", behaviours.returns)
        assert sup.session("nobody-home", agent="idle").pause() is False


def test_a_second_supervisor_on_a_live_state_directory_refuses(tmp_path) -> None:
    import os

    from deadstop.supervisor import StateDirInUse

    with Supervisor(state_dir=str(tmp_path)) as first:
        with pytest.raises(StateDirInUse) as info:
            Supervisor(state_dir=str(tmp_path))
        assert f"pid {os.getpid()}" in str(info.value) and first.id in str(info.value)
    with Supervisor(state_dir=str(tmp_path)) as again:  # released at close
        assert again.id != first.id


def test_usage_shows_cpu_and_memory_without_any_limit(workspace) -> None:
    with Supervisor() as sup:
        sup.register_agent("spinner", behaviours.busy_for)
        s = sup.session("spin", agent="spinner")
        run = s.send(0.5)
        run.wait(timeout=60)
        usage = s.usage
    assert usage.cpu_seconds >= 0.2, usage
    assert usage.peak_memory_bytes > 0 and usage.peak_processes >= 1, usage


def test_a_slow_subscriber_gets_a_counted_gap_not_unbounded_memory(monkeypatch, workspace) -> None:
    import deadstop.supervisor.engine.events as core

    monkeypatch.setattr(core, "SUBSCRIBER_BACKLOG", 5)
    with Supervisor() as sup:
        events = sup.subscribe()
        run = sup.start(behaviours.emits, 50)
        run.wait(timeout=60)
        got = []
        for event in events:
            got.append((event.kind, event.data))
            if event.kind == "run.ended":
                break
    kinds = [k for k, _ in got]
    delivered = kinds.count("progress")
    # The backlog (5) plus at most the one event the iterator already took; then the gap, counted, in place.
    assert 5 <= delivered <= 6 and kinds[:delivered] == ["progress"] * delivered, got
    assert got[delivered] == ("events.dropped", {"count": 50 - delivered}), got
    assert kinds[delivered + 1:] == ["run.ended"], got


def test_stop_sources_are_a_closed_list(workspace) -> None:
    from deadstop.supervisor.engine.stop import RevokeSource

    with Supervisor() as sup:
        run = sup.start(behaviours.victim)
        with pytest.raises(ValueError, match="gatway"):
            sup._call(run._core.stop(source="gatway"))
        assert run.state.value == "running", "a refused stop request must not have begun a stop"
        report = sup._call(run._core.stop(source="gateway", reason="operator asked"))
    assert report.revoke_source == RevokeSource.GATEWAY == "gateway"
    assert {s.value for s in RevokeSource} >= {"api", "takeover", "abuse", "quota", "parent", "spawner"}


def test_a_live_state_directory_can_be_inspected_read_only(tmp_path) -> None:
    import os
    import sqlite3

    from deadstop.supervisor import StateView

    with Supervisor(state_dir=str(tmp_path)) as sup:
        sup.register_agent("spinner", behaviours.busy_for)
        s = sup.session("looked-at", agent="spinner")
        run = s.send(0.05)
        run.wait(timeout=60)
        with StateView(str(tmp_path)) as view:  # while the owner lives
            assert view.owner() == f"pid {os.getpid()}, supervisor {sup.id}"
            assert [x["key"] for x in view.sessions()] == ["looked-at"]
            runs = view.runs("looked-at")
            assert [r["id"] for r in runs] == [run.id]
            report = view.report(run.id)
            assert report is not None and report["outcome"] == run.state.value
            assert view.dispatched_after_revoke(run.id) == []
            assert not hasattr(view, "stop") and not hasattr(view, "kill")
            with pytest.raises(sqlite3.OperationalError):
                view._db.execute("DELETE FROM runs")  # the connection itself is read-only
    with StateView(str(tmp_path)) as view:
        assert view.owner() is None, "no live owner after close"
        assert view.report(run.id)["run_id"] == run.id


def test_an_agent_may_be_trusted_or_strict_while_the_rest_stay_isolated(workspace) -> None:
    with Supervisor() as sup:
        sup.register_agent("confined", lambda m, **c: behaviours.identity(), cwd=str(workspace))
        sup.register_agent("trusted", lambda m, **c: behaviours.identity(), cwd=str(workspace), isolation="off")
        confined = sup.session("a", "confined").send("who").result(timeout=60)
        trusted_run = sup.session("b", "trusted").send("who")
        trusted = trusted_run.result(timeout=60)
        assert trusted["uid"] == os.getuid() and trusted["visible_pids"] > 1, trusted
        assert trusted_run.wait(timeout=60).report.isolation["mode"] == "off"
        if sup.isolation.has("identity"):
            assert confined["uid"] != os.getuid(), "a default agent must keep its own identity"
        if sup.isolation.missing:
            with pytest.raises(InvalidTarget, match="strict"):
                sup.register_agent("picky", behaviours.returns, isolation="strict")
        else:
            sup.register_agent("picky", behaviours.returns, isolation="strict")
        with pytest.raises(ValueError, match="isolation"):
            sup.register_agent("typo", behaviours.returns, isolation="of")
