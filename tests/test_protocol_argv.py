"""The egress wire (docs/protocol.md) spoken by argv runs that import nothing from deadstop.

Every run here is a real process started by a real Supervisor; every request
crosses the real ZeroMQ socket. The runs are examples/raw_client.py (the
documented client) and tests/agents/raw_adversary.py (hostile frames). What
the run saw on the wire comes back as its reported result; what the broker
decided is read back from the journal file.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import threading
from pathlib import Path

import pytest

from deadstop.supervisor import RunState, Supervisor

REPO = Path(__file__).resolve().parents[1]
RAW_CLIENT = str(REPO / "examples" / "raw_client.py")
ADVERSARY = str(REPO / "tests" / "agents" / "raw_adversary.py")
WAIT = 30.0


class Recorder:
    """A tool handler that records every call it receives (from the broker's threads)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self._lock = threading.Lock()

    def __call__(self, **kwargs):
        with self._lock:
            self.calls.append(kwargs)
        return {"echo": kwargs}


def egress_rows(journal_path: str, run_id: str) -> list[tuple]:
    """(req_id, verb, tool, decision, code) of every egress row journaled for `run_id`, in order."""
    db = sqlite3.connect(f"file:{journal_path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT req_id, verb, tool, decision, code FROM egress WHERE run_id=? ORDER BY seq",
                          (run_id,)).fetchall()
    finally:
        db.close()


def summary(reply: dict) -> tuple:
    """(id, ok, error code, result) of one reply body."""
    return reply["id"], reply["ok"], (reply.get("error") or {}).get("code"), reply.get("result")


def test_raw_client_calls_a_tool_emits_and_reports_its_result(tmp_path, capfd):
    echo = Recorder()
    with Supervisor(state_dir=str(tmp_path)) as sup:
        sup.register_tool("echo", echo)
        events = sup.subscribe()
        run = sup.start([sys.executable, RAW_CLIENT, "echo", '{"x": 1}'], tools=["echo"])
        info = run.wait(timeout=WAIT)
        result = run.result(timeout=WAIT)
        seen = []
        for event in events:  # run.ended was published before wait() returned
            if event.run_id == run.id:
                seen.append((event.kind, event.data))
            if event.kind == "run.ended" and event.run_id == run.id:
                break
        journal = sup.journal_path

    expected = {"tool": "echo", "kwargs": {"x": 1}, "ok": True, "result": {"echo": {"x": 1}}}
    assert echo.calls == [{"x": 1}]
    assert result == expected
    assert (info.state, info.exit_code) == (RunState.EXITED, 0)
    assert run.state is RunState.EXITED
    assert seen == [("raw_client.called", {"tool": "echo", "ok": True}), ("run.ended", {"state": "exited"})]
    # What it printed is what it reported.
    assert json.dumps(expected, sort_keys=True) in capfd.readouterr().out.splitlines()
    assert egress_rows(journal, run.id) == [
        (1, "call", "echo", "dispatched", None),
        (1, "call", "echo", "completed", None),
        (2, "emit", "raw_client.called", "allowed", None),
        (3, "result", None, "allowed", None),
    ]


@pytest.mark.parametrize("tool, code, name", [
    ("forbidden", 7, "TOOL_DENIED"),  # registered, but not on this run's allow-list
    ("no_such_tool", 7, "TOOL_DENIED"),  # not registered at all: same answer, existence not revealed
])
def test_raw_client_calling_outside_its_allow_list_is_refused(tmp_path, tool, code, name):
    echo, forbidden = Recorder(), Recorder()
    with Supervisor(state_dir=str(tmp_path)) as sup:
        sup.register_tool("echo", echo)
        sup.register_tool("forbidden", forbidden)
        run = sup.start([sys.executable, RAW_CLIENT, tool, '{"x": 1}'], tools=["echo"])
        info = run.wait(timeout=WAIT)
        result = run.result(timeout=WAIT)
        journal = sup.journal_path

    assert result["ok"] is False
    assert (result["error"]["code"], result["error"]["name"]) == (code, name)
    assert result["error"]["reason"] is None  # not revoked: nothing to quote
    assert echo.calls == [] and forbidden.calls == []
    assert (info.state, info.exit_code) == (RunState.FAILED, 1)  # raw_client exits 1 on a refused call
    assert egress_rows(journal, run.id) == [
        (1, "call", tool, "refused", code),
        (2, "emit", "raw_client.called", "allowed", None),
        (3, "result", None, "allowed", None),
    ]


# case -> (replies the run saw as (id, ok, code, result), calls the tool received, journal rows)
ADVERSARY_CASES = {
    # A flipped credential byte and an empty credential, for the run's own id and an allowed tool.
    # Refused before authentication: id 0 (the body is never parsed) and the
    # journal row is not filed under the claimed run, only under the sender
    # its uid names, if it has one of its own (see the test below).
    "wrong-credential": (
        [(0, False, 4, None), (0, False, 4, None)],
        [],
        [(100, "result", None, "allowed", None)],
    ),
    # A body that is not JSON (refused with id 0: no id could be read), an
    # unknown verb (refused with its own id), then a valid call with an unknown
    # field: the broker kept serving and ignored the field.
    "malformed-body": (
        [(0, False, 1, None), (41, False, 1, None), (42, True, None, {"echo": {"after": "garbage"}})],
        [{"after": "garbage"}],
        [(0, "?", None, "refused", 1),
         (41, "?", None, "refused", 1),
         (42, "call", "echo", "dispatched", None),
         (42, "call", "echo", "completed", None),
         (100, "result", None, "allowed", None)],
    ),
}


@pytest.mark.parametrize("case", sorted(ADVERSARY_CASES))
def test_hostile_frames_are_refused_with_their_code_and_journaled(tmp_path, case):
    replies, calls, rows = ADVERSARY_CASES[case]
    echo = Recorder()
    with Supervisor(state_dir=str(tmp_path)) as sup:
        sup.register_tool("echo", echo)
        run = sup.start([sys.executable, ADVERSARY, case], tools=["echo"])
        info = run.wait(timeout=WAIT)
        seen = run.result(timeout=WAIT)
        journal = sup.journal_path
        # A run with an identity of its own is the kernel-attested sender of what it forged.
        sender = run.id if sup.core.get_run(run.id).uid is not None else None

    assert [summary(r) for r in seen] == replies
    if case == "wrong-credential":
        db = sqlite3.connect(journal)
        forged = db.execute("SELECT run_id, req_id, code, detail FROM egress WHERE decision = 'refused'").fetchall()
        db.close()
        assert [(r[0], r[1], r[2]) for r in forged] == [(sender, 0, 4), (sender, 0, 4)]
        assert all(run.id in r[3] for r in forged), "the refusal must name the run it claimed to be"
        if sender is not None:
            rows = [(0, "?", None, "refused", 4)] * 2 + rows
    assert echo.calls == calls
    assert (info.state, info.exit_code) == (RunState.EXITED, 0)
    assert egress_rows(journal, run.id) == rows


def test_argv_run_gets_its_channel_from_the_environment_but_its_credential_only_from_the_fd(tmp_path):
    with Supervisor(state_dir=str(tmp_path)) as sup:
        sup.register_tool("echo", Recorder())
        run = sup.start([sys.executable, ADVERSARY, "environment"], tools=["echo"])
        seen = run.result(timeout=WAIT)

    # The exec-time environment names the channel and the credential's fd (other DEADSTOP_*
    # variables of the host may pass through)...
    assert {"DEADSTOP_EGRESS", "DEADSTOP_RUN_ID", "DEADSTOP_GENERATION", "DEADSTOP_CREDENTIAL_FD",
            "DEADSTOP_SUPERVISOR_PID", "DEADSTOP_RUN_MARKER"} <= set(seen["names"])
    # ...but never holds the credential itself.
    assert seen["credential_chars"] == 64  # 32 random bytes, hex
    assert seen["credential_in_environ"] is False
    assert seen["ping"] == {"id": 1, "ok": True, "result": {"state": "running"}}
    assert run.state is RunState.EXITED
