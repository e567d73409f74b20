"""MCP servers as tool sources, against real server processes over stdio: the tests' own server for
the fault cases (tests/mcp_servers/faults.py) and servers the project did not write.

What a server did is read from its own log (a FIFO the test waits on), never from deadstop.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time

import pytest

import behaviours
from deadstop.supervisor import Supervisor

pytest.importorskip("mcp", reason="the mcp SDK is not installed (pip install -e '.[test]')")

HERE = os.path.dirname(os.path.abspath(__file__))
FAULTS = [sys.executable, os.path.join(HERE, "mcp_servers", "faults.py")]


@pytest.fixture
def log(ready):
    """The faults server's log of the calls it received: a FIFO it writes a line to per call."""
    return ready


def _rows(sup, run_id: str) -> list[tuple[str, str, str]]:
    db = sqlite3.connect(sup.journal_path)
    try:
        return db.execute("SELECT tool, decision, COALESCE(detail, '') FROM egress WHERE run_id=? AND verb='call'"
                          " ORDER BY seq", (run_id,)).fetchall()
    finally:
        db.close()


def test_an_mcp_servers_tools_are_brokered_and_checked_against_their_schemas(tmp_path, log) -> None:
    with Supervisor(state_dir=str(tmp_path / "state")) as sup:
        names = sup.register_mcp_server("faults", FAULTS, env={"FAULTS_LOG": log.path})
        assert {"faults.echo", "faults.slow", "faults.crash", "faults.hang", "faults.fail"} <= set(names)
        allowed = ["faults.echo", "faults.fail"]
        ok = sup.start(behaviours.calls_with, "faults.echo", {"text": "hi", "times": 2}, tools=allowed).result(30)
        assert ok["ok"] and ok["value"]["content"][0]["text"] == "hihi"
        assert ok["value"]["isError"] is False and ok["value"]["structuredContent"] == {"result": "hihi"}
        assert log.wait(1)[0]["text"] == "hi"  # it reached the server

        # refused at the broker by the tool's input schema: never reaches the server
        bad = sup.start(behaviours.calls_with, "faults.echo", {"times": "x"}, tools=allowed)
        bad_result = bad.result(30)
        assert not bad_result["ok"] and bad_result["code"] == 11, bad_result  # BAD_ARGUMENTS
        assert "text" in bad_result["message"] or "times" in bad_result["message"]
        denied = sup.start(behaviours.calls_with, "faults.crash", {}, tools=allowed).result(30)
        assert not denied["ok"] and denied["code"] == 7  # not on the allow-list
        failed = sup.start(behaviours.calls_with, "faults.fail", {"why": "disk full"}, tools=allowed).result(30)
        assert not failed["ok"] and failed["code"] == 9 and "Error executing tool fail" in failed["message"]  # its words
        assert [d for _, d, _ in _rows(sup, bad.id)] == ["refused"]
    with pytest.raises(AssertionError):
        log.wait(1, timeout=0.5)  # nothing else reached the server: the bad call never left


def test_the_revoke_cancels_an_mcp_call_at_its_server(tmp_path, log) -> None:
    with Supervisor(state_dir=str(tmp_path / "state")) as sup:
        sup.register_mcp_server("faults", FAULTS, env={"FAULTS_LOG": log.path})
        run = sup.start(behaviours.calls_with, "faults.slow", {"seconds": 60}, tools=["faults.slow"], grace=0.5)
        assert log.wait(1)[0]["event"] == "started"
        report = run.stop()
        assert report.handlers_cancelled == 1 and report.survivors == 0
        assert log.wait(1)[0]["event"] == "cancelled", "the server was told (notifications/cancelled)"
        rows = _rows(sup, run.id)
        assert [(t, d) for t, d, _ in rows] == [("faults.slow", "dispatched"), ("faults.slow", "cancelled")]
        # the server is still there for the next run
        again = sup.start(behaviours.calls_with, "faults.echo", {"text": "after"}, tools=["faults.echo"]).result(30)
        assert again["ok"]
        assert log.wait(1)[0]["text"] == "after"


def test_a_server_that_crashes_fails_its_call_and_the_next_call_starts_it_again(tmp_path, log) -> None:
    with Supervisor(state_dir=str(tmp_path / "state")) as sup:
        sup.register_mcp_server("faults", FAULTS, env={"FAULTS_LOG": log.path})
        sup.register_mcp_server("bystander", FAULTS)
        tools = ["faults.crash", "faults.echo", "bystander.echo"]
        crashed = sup.start(behaviours.calls_with, "faults.crash", {}, tools=tools).result(30)
        first_pid = log.wait(1)[0]["pid"]
        assert not crashed["ok"] and crashed["code"] == 19, crashed  # TOOL_UNAVAILABLE
        other = sup.start(behaviours.calls_with, "bystander.echo", {"text": "fine"}, tools=tools).result(30)
        assert other["ok"], "another server is not touched"
        again = sup.start(behaviours.calls_with, "faults.echo", {"text": "back"}, tools=tools).result(30)
        assert again["ok"], again
        line = log.wait(1)[0]
        assert line["text"] == "back" and line["pid"] != first_pid, "a fresh server process answered"


def test_a_server_that_stops_answering_times_out_and_is_replaced(tmp_path, log) -> None:
    with Supervisor(state_dir=str(tmp_path / "state")) as sup:
        sup.register_mcp_server("faults", FAULTS, env={"FAULTS_LOG": log.path}, timeout=1.0)
        tools = ["faults.hang", "faults.echo"]
        t0 = time.monotonic()
        hung = sup.start(behaviours.calls_with, "faults.hang", {}, tools=tools).result(30)
        assert not hung["ok"] and hung["code"] == 20, hung  # TOOL_TIMEOUT
        assert time.monotonic() - t0 < 20
        hung_pid = log.wait(1)[0]["pid"]
        again = sup.start(behaviours.calls_with, "faults.echo", {"text": "new"}, tools=tools).result(30)
        assert again["ok"], again
        assert log.wait(1)[0]["pid"] != hung_pid


def test_a_server_that_cannot_start_is_refused_at_registration(tmp_path) -> None:
    from deadstop.supervisor.egress.mcp import McpUnavailable

    with Supervisor(state_dir=str(tmp_path / "state")) as sup:
        with pytest.raises(McpUnavailable, match="nothing"):
            sup.register_mcp_server("nothing", [sys.executable, "-c", "import sys; sys.exit(1)"], timeout=5)
        with pytest.raises(ValueError, match="without '.'"):
            sup.register_mcp_server("a.b", FAULTS)


def test_the_daemon_serves_mcp_servers_from_its_configuration(tmp_path, workspace, ready) -> None:
    import json

    from daemonctl import Daemon

    config = f"""
[mcp_servers.faults]
command = "{sys.executable}"
args = ["{FAULTS[1]}"]
timeout = 30

[agents.caller]
target = "daemon_agents:tool_caller"
cwd = "{{work}}"
tools = ["faults.echo"]
"""
    d = Daemon(tmp_path, config, workspace).start()
    try:
        info = d.cli_json("daemon", "info")
        assert "faults.echo" in info["mcp_servers"]["faults"] and "faults.echo" in info["tools"]
        message = json.dumps({"ready": ready.path, "tool": "faults.echo", "args": {"text": "via the daemon"}})
        assert d.cli("sessions", "send", "c1", message, "--agent", "caller").returncode == 0
        (line,) = ready.wait(1)
        assert line["ok"] and line["value"]["content"][0]["text"] == "via the daemon", line
        assert d.cli("daemon", "reload").returncode == 0  # unchanged: the server stays
        assert d.cli_json("daemon", "info")["mcp_servers"] == info["mcp_servers"]
        stopped = d.cli_json("sessions", "stop", "c1")
        assert stopped["reports"][0]["survivors"] == 0
    finally:
        assert d.stop() == 0
    (tmp_path / "bad.toml").write_text("[mcp_servers.x]\nargs = ['y']\n")
    checked = d.cli("serve", "--check", "--config", str(tmp_path / "bad.toml"))
    assert checked.returncode == 1 and "mcp_servers.x: needs command" in checked.stderr, checked.stderr
    (tmp_path / "bad2.toml").write_text("[mcp_servers.x]\ncommand = 'y'\nnetwork = 'host'\n")
    checked = d.cli("serve", "--check", "--config", str(tmp_path / "bad2.toml"))
    assert checked.returncode == 1 and "applies to scope = 'session'" in checked.stderr, checked.stderr


# -- servers the project did not write ------------------------------------------------------------------------
EVERYTHING = os.path.join(HERE, "mcp_node", "node_modules", "@modelcontextprotocol", "server-everything", "dist",
                          "index.js")


def _require(present: bool, why: str) -> None:
    if not present:
        if os.environ.get("DEADSTOP_CI"):
            pytest.fail(why)  # CI installs it: missing there is a broken setup, not a reason to skip
        pytest.skip(why)


def _journal_has(sup, run_id: str, decision: str, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # bounded: the row is written in the step that dispatches the call
        if any(d == decision for _, d, _ in _rows(sup, run_id)):
            return True
        time.sleep(0.02)
    return False


def test_server_everything_answers_and_its_long_operation_is_cut_at_the_revoke(tmp_path) -> None:
    import shutil

    _require(shutil.which("node") is not None and os.path.exists(EVERYTHING),
             "@modelcontextprotocol/server-everything is not installed (npm ci --prefix tests/mcp_node)")
    with Supervisor(state_dir=str(tmp_path / "state")) as sup:
        names = sup.register_mcp_server("everything", ["node", EVERYTHING, "stdio"])
        assert {"everything.echo", "everything.get-sum", "everything.trigger-long-running-operation"} <= set(names)
        tools = ["everything.echo", "everything.get-sum", "everything.trigger-long-running-operation"]
        echoed = sup.start(behaviours.calls_with, "everything.echo", {"message": "hi"}, tools=tools).result(30)
        assert echoed["ok"] and "hi" in echoed["value"]["content"][0]["text"]
        summed = sup.start(behaviours.calls_with, "everything.get-sum", {"a": 2, "b": 40}, tools=tools).result(30)
        assert summed["ok"] and "42" in summed["value"]["content"][0]["text"]
        refused = sup.start(behaviours.calls_with, "everything.get-sum", {"a": "two", "b": 40}, tools=tools).result(30)
        assert not refused["ok"] and refused["code"] == 11  # its schema says number: refused at the broker

        long = sup.start(behaviours.calls_with, "everything.trigger-long-running-operation",
                         {"duration": 60, "steps": 60}, tools=tools, grace=0.5)
        assert _journal_has(sup, long.id, "dispatched")
        report = long.stop()
        assert report.handlers_cancelled == 1 and report.survivors == 0
        assert [d for _, d, _ in _rows(sup, long.id)] == ["dispatched", "cancelled"]
        after = sup.start(behaviours.calls_with, "everything.echo", {"message": "still here"}, tools=tools).result(30)
        assert after["ok"], "the server serves the next run"


def test_mcp_server_git_reads_the_repository_it_was_given(tmp_path) -> None:
    import importlib.util
    import subprocess

    _require(importlib.util.find_spec("mcp_server_git") is not None,
             "mcp-server-git is not installed (pip install -e '.[test]')")
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "notes.txt").write_text("first\n")
    subprocess.run([*git, "add", "notes.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "the first note"], check=True)
    (repo / "notes.txt").write_text("first\nsecond\n")
    with Supervisor(state_dir=str(tmp_path / "state")) as sup:
        names = sup.register_mcp_server("git", [sys.executable, "-m", "mcp_server_git", "--repository", str(repo)])
        assert {"git.git_status", "git.git_log", "git.git_diff_unstaged"} <= set(names)
        tools = ["git.git_log", "git.git_diff_unstaged"]
        logged = sup.start(behaviours.calls_with, "git.git_log", {"repo_path": str(repo)}, tools=tools).result(30)
        assert logged["ok"] and "the first note" in logged["value"]["content"][0]["text"], logged
        diff = sup.start(behaviours.calls_with, "git.git_diff_unstaged", {"repo_path": str(repo)}, tools=tools).result(30)
        assert diff["ok"] and "+second" in diff["value"]["content"][0]["text"], diff


def test_a_session_scoped_server_is_a_run_of_each_session_and_dies_with_it(tmp_path, workspace, ready) -> None:
    """scope="session": each session's calls go to its own server process, started as a contained run;
    stopping the session kills that process mid-call (its effect is cut), and the other session's
    server goes on."""
    from procscan import marked_processes

    _session_scoped(tmp_path, workspace, ready, marked_processes)  # `ready`: a FIFO a server run (its own uid) can write


def _session_scoped(tmp_path, workspace, log, marked_processes) -> None:
    with Supervisor(state_dir=str(tmp_path / "state")) as sup:
        names = sup.register_mcp_server("faults", FAULTS, env={"FAULTS_LOG": log.path}, scope="session",
                                        cwd=str(workspace))
        assert "faults.slow" in names
        sup.register_agent("mcp", behaviours.mcp_agent, tools=["faults.echo", "faults.slow"], cwd=str(workspace))
        a, b = sup.session("a", "mcp"), sup.session("b", "mcp")
        assert a.send({"tool": "faults.echo", "args": {"text": "A"}}).result(60)["content"][0]["text"] == "A"
        pid_a = log.wait(1)[0]["pid"]
        assert b.send({"tool": "faults.echo", "args": {"text": "B"}}).result(60)["content"][0]["text"] == "B"
        pid_b = log.wait(1)[0]["pid"]
        assert pid_a != pid_b, "a server per session"
        servers = {r.id: r for r in sup.run_records() if r.target.startswith("mcp:faults")}
        assert len([r for r in servers.values() if r.state == "running"]) == 2

        a.send({"tool": "faults.slow", "args": {"seconds": 60}})
        started = log.wait(1)[0]
        assert started == {**started, "pid": pid_a, "event": "started"}, "session a's own server"
        reports = a.stop()
        killed = [r for r in reports if r.run_id in servers]
        assert len(killed) == 1 and killed[0].outcome == "killed" and killed[0].survivors == 0
        assert marked_processes(killed[0].run_id) == {}, "the server of the stopped session outlived it"
        # session b's server is untouched and serves on
        assert b.send({"tool": "faults.echo", "args": {"text": "B2"}}).result(60)["content"][0]["text"] == "B2"
        assert log.wait(1)[0]["pid"] == pid_b
    with pytest.raises(AssertionError):
        log.wait(1, timeout=0.5)  # the cut call never finished: no "done"
