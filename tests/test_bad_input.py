"""Bad input gets a clear error and breaks nothing: every case here runs
beside a healthy run that must keep working throughout."""

from __future__ import annotations

import threading

import pytest

import behaviours
from procscan import marked_processes
from deadstop.supervisor import InvalidTarget, RunFailed, Supervisor


@pytest.fixture
def sup_with_bystander(tmp_path):
    ready = threading.Event()
    with Supervisor(state_dir=str(tmp_path)) as sup:
        sup.register_tool("echo", lambda text: text)
        sup.register_tool("ready", ready.set)
        sup.register_tool("boom", _boom)
        sup.register_tool("bad_result", lambda: object())
        bystander = sup.start(behaviours.victim, tools=["ready"])
        assert ready.wait(30)
        yield sup
        assert bystander.state.value == "running", "a bad input disturbed another run"
        probe = sup.start(behaviours.calls_and_reports, "echo", "still fine", tools=["echo"])
        assert probe.result(timeout=30) == {"ok": True, "value": "still fine"}
        bystander.stop()


def _boom() -> None:
    raise RuntimeError("tool exploded")


def test_unknown_tool_in_allow_list_is_refused_at_start(sup_with_bystander) -> None:
    with pytest.raises(InvalidTarget, match="'nope' is not registered"):
        sup_with_bystander.start(behaviours.returns, 1, tools=["nope"])


def test_unpicklable_target_is_refused_at_start(sup_with_bystander) -> None:
    lock = threading.Lock()
    with pytest.raises(InvalidTarget, match="cannot be pickled"):
        sup_with_bystander.start(lambda: lock)


@pytest.mark.parametrize("target", [42, [], ["ok", 3], "a string"])
def test_target_of_the_wrong_kind_is_refused(sup_with_bystander, target) -> None:
    with pytest.raises(InvalidTarget):
        sup_with_bystander.start(target)


def test_missing_command_is_refused_at_start(sup_with_bystander) -> None:
    with pytest.raises(InvalidTarget, match="not found"):
        sup_with_bystander.start(["deadstop-no-such-command-xyz"])


def test_target_that_raises_fails_with_its_traceback_as_text(sup_with_bystander) -> None:
    run = sup_with_bystander.start(behaviours.raises, "bad things")
    with pytest.raises(RunFailed) as info:
        run.result(timeout=30)
    assert info.value.remote_type == "ValueError"
    assert "bad things" in str(info.value) and "raise ValueError" in info.value.remote_traceback
    assert run.state.value == "failed"
    assert run.report.exit_code == 1


@pytest.mark.parametrize("code,state", [(0, "exited"), (3, "failed")])
def test_run_that_exits_at_once(sup_with_bystander, code, state) -> None:
    run = sup_with_bystander.start(behaviours.exits_at_once, code)
    info = run.wait(timeout=30)
    assert info.state.value == state and info.exit_code == code
    assert info.report.ended_by == "exited" and info.report.survivors == 0
    # stop() after the end returns the same report instead of failing
    assert run.stop() is info.report or run.stop() == info.report


def test_result_that_is_not_json(sup_with_bystander) -> None:
    run = sup_with_bystander.start(behaviours.returns_unjsonable)
    with pytest.raises(RunFailed, match="not JSON"):
        run.result(timeout=30)


def test_tool_argument_that_is_not_json_raises_in_the_run(sup_with_bystander) -> None:
    run = sup_with_bystander.start(behaviours.calls_with_unjsonable_argument, tools=["echo"])
    message = run.result(timeout=30)
    assert message.startswith("TypeError") and "'echo'" in message and "not JSON" in message


@pytest.mark.parametrize("tool,args,expected_type,code", [
    ("boom", [], "ToolError", 9),
    ("bad_result", [], "EgressRefused", 12),
    ("echo", [1, 2, 3], "EgressRefused", 11),
    ("undeclared", [], "ToolDenied", 7),  # allow-list first: existence is not revealed
])
def test_tool_failures_reach_the_run_as_typed_errors(sup_with_bystander, tool, args, expected_type, code) -> None:
    tools = ["boom", "bad_result", "echo"]
    run = sup_with_bystander.start(behaviours.calls_and_reports, tool, *args, tools=tools)
    out = run.result(timeout=30)
    assert out["ok"] is False and out["type"] == expected_type and out["code"] == code
    if tool == "boom":
        assert "tool exploded" in out["message"]


def test_tool_not_on_the_allow_list_is_denied(sup_with_bystander) -> None:
    run = sup_with_bystander.start(behaviours.calls_and_reports, "echo", "x", tools=[])
    out = run.result(timeout=30)
    assert out == {"ok": False, "type": "ToolDenied", "code": 7, "message": out["message"]}
    assert "allow-list" in out["message"]


def test_run_leaving_children_behind_has_them_swept(sup_with_bystander, tmp_path) -> None:
    run = sup_with_bystander.start(behaviours.leaves_children_behind, str(tmp_path))
    assert run.result(timeout=30) == "bye"
    assert run.state.value == "exited"
    assert run.report.survivors == 0 and run.report.kill_sent_at is not None
    assert marked_processes(run.id) == {}
