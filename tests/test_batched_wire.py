"""The batched wire (ds2): one message, many requests, each checked and answered as if alone.

Real runs on a real supervisor speak ds2 by hand (tests/batch_agents.py) or
through the Python client, which batches its async calls. What is checked
is what docs/protocol.md section 3a promises: every request of a batch gets
exactly one reply with its own id and its own verdict; a body that is no
batch is refused once; a run revoked in the middle of a batch has nothing of
the rest carried out; ds1 still works beside ds2; and a stop with hundreds
of batched calls in flight ends every one of them, with nothing dispatched
after the revoke (the journal, read independently).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from typing import Any

import pytest

import batch_agents as B
from deadstop.ipc import framing
from deadstop.ipc.errors import ErrorCode
from deadstop.supervisor import Supervisor
from deadstop.supervisor.egress.broker import REFUSAL_BURST
from journalscan import rows as _rows

WAIT = 30.0


def _replies(messages: list) -> dict[int, Any]:
    """id -> (ok, result or error code) over every reply of every ds2 message."""
    out: dict[int, Any] = {}
    for version, body in messages:
        assert version == "ds2", f"a ds2 request was answered in {version}: {body}"
        assert isinstance(body, list), body
        for reply in body:
            assert reply["id"] not in out, f"two replies for id {reply['id']}"
            out[reply["id"]] = (True, reply.get("result")) if reply["ok"] else (False, reply["error"]["code"])
    return out


@pytest.fixture
def sup(tmp_path):
    s = Supervisor(state_dir=str(tmp_path))
    s.register_tool("echo", lambda text: text)
    s.register_tool("secret", lambda: "never")
    try:
        yield s
    finally:
        s.close()


def _call(i: int, tool: str = "echo", *args: Any, **kwargs: Any) -> dict:
    return {"verb": "call", "id": i, "tool": tool, "args": list(args), "kwargs": kwargs}


def test_every_request_of_a_batch_gets_its_own_reply_and_verdict(sup) -> None:
    batch = [_call(1, "echo", "a"), _call(2, "secret"), {"verb": "call", "id": 3},  # no tool: MALFORMED, id 3
             {"verb": "emit", "id": 4, "kind": "run.forged"}, {"verb": "ping", "id": 5},
             _call(6, "echo", nope=1), {"verb": "emit", "id": 7, "kind": "progress", "data": 1},
             "not an object", _call(9, "echo", "b")]
    run = sup.start(B.exchange, [{"version": "ds2", "body": batch}], len(batch), tools=["echo"])
    got = _replies(run.result(timeout=WAIT))
    journal = sup.journal_path
    sup.close()  # every row committed: the journal is read as the record it leaves
    code = ErrorCode
    assert got == {1: (True, "a"), 2: (False, code.TOOL_DENIED), 3: (False, code.MALFORMED),
                   4: (False, code.RESERVED_KIND), 5: (True, {"state": "running"}), 6: (False, code.BAD_ARGUMENTS),
                   7: (True, None), 0: (False, code.MALFORMED), 9: (True, "b")}
    # The journal has each request's own decision rows, in the batch's order (a call's `completed`
    # row comes when its handler, on a thread, returns).
    rows = _rows(journal, "SELECT req_id, verb, tool, decision, code FROM egress WHERE run_id = ? AND req_id < 100"
                 " AND decision != 'completed' ORDER BY seq", run.id)
    assert rows[:8] == [(1, "call", "echo", "dispatched", None), (2, "call", "secret", "refused", code.TOOL_DENIED),
                        (3, "?", None, "refused", code.MALFORMED),
                        (4, "emit", "run.forged", "refused", code.RESERVED_KIND),
                        (6, "call", "echo", "refused", code.BAD_ARGUMENTS), (7, "emit", "progress", "allowed", None),
                        (0, "?", None, "refused", code.MALFORMED), (9, "call", "echo", "dispatched", None)]
    assert _rows(journal, "SELECT req_id FROM egress WHERE run_id = ? AND decision = 'completed' ORDER BY req_id",
                 run.id) == [(1,), (9,)]


def test_a_body_that_is_no_batch_is_refused_once_and_ds1_still_works_beside_it(sup) -> None:
    too_many = [{"verb": "emit", "id": i, "kind": "flood"} for i in range(1, framing.MAX_BATCH + 2)]
    messages = [{"version": "ds2", "body": {"verb": "ping", "id": 1}},  # an object, not an array
                {"version": "ds2", "body": []},
                {"version": "ds2", "body": "[1, 2"},  # not JSON
                {"version": "ds2", "body": too_many},
                {"version": "ds1", "body": {"verb": "ping", "id": 42}},
                {"version": "ds2", "body": [{"verb": "ping", "id": 43}]},
                {"version": "ds3", "body": [{"verb": "ping", "id": 44}]}]
    run = sup.start(B.exchange, messages, 7)
    got = run.result(timeout=WAIT)
    journal = sup.journal_path
    sup.close()  # every row committed: the journal is read as the record it leaves
    ds2 = [r for v, body in got if v == "ds2" for r in body]  # replies of one receive step share a message
    ds1 = [body for v, body in got if v == "ds1"]
    assert sorted((r["id"], r["ok"] or r["error"]["code"]) for r in ds2) == [
        (0, ErrorCode.MALFORMED)] * 4 + [(43, True)]
    # ds1 is answered in ds1; an unknown version is refused BAD_VERSION, in ds1, before anything is parsed.
    assert sorted((r["id"], r["ok"] or r["error"]["code"]) for r in ds1) == [(0, ErrorCode.BAD_VERSION), (42, True)]
    assert _rows(journal, "SELECT count(*) FROM egress WHERE run_id = ? AND verb = 'emit'", run.id) == [(0,)], \
        "nothing of an oversized batch was carried out"


def test_a_stale_batch_is_refused_request_by_request(sup) -> None:
    batch = [_call(11, "echo", "x"), {"verb": "ping", "id": 12}, {"verb": "emit", "id": 13, "kind": "k"}]
    run = sup.start(B.exchange, [{"version": "ds2", "body": batch, "generation": "7"}], 3, tools=["echo"])
    got = _replies(run.result(timeout=WAIT))
    stale = (False, ErrorCode.STALE_GENERATION)
    assert got == {11: stale, 12: stale, 13: stale}
    sup.close()
    assert _rows(sup.journal_path, "SELECT count(*) FROM egress WHERE run_id = ? AND decision = 'dispatched'",
                 run.id) == [(0,)]


@pytest.mark.parametrize("isolation", ["auto", "off"])  # with an endpoint of its own, and on the shared one
def test_a_run_revoked_in_the_middle_of_its_batch_has_nothing_of_the_rest_carried_out(tmp_path, isolation) -> None:
    # Garbage (no tool named) spends the refusal budget; the run is revoked for abuse inside the
    # batch, right after its REFUSAL_BURST-th refusal; the valid calls at the end must never run.
    n = framing.MAX_BATCH
    batch = [{"verb": "call", "id": i} for i in range(1, n - 4)] + [_call(i, "echo", "late") for i in range(n - 4, n + 1)]
    work = tmp_path / "work"  # writable by the run's own identity
    work.mkdir()
    os.chmod(work, 0o777)
    out = work / "replies.json"
    with Supervisor(state_dir=str(tmp_path / "state"), isolation=isolation) as sup:
        sup.register_tool("echo", lambda text: text)
        run = sup.start(B.exchange, [{"version": "ds2", "body": batch}], n + 1, 3.0, True, str(out),
                        tools=["echo"], grace=5.0, cwd=str(work))
        info = run.wait(timeout=WAIT)
        journal = sup.journal_path
    assert info.report.revoke_source == "abuse", info.report
    assert info.report.survivors == 0
    messages = json.loads(out.read_text())
    replies = [r for _v, body in messages for r in (body if isinstance(body, list) else [body])]
    codes = [r["error"]["code"] if not r["ok"] else 0 for r in replies if r["id"] != 0]
    notice = [i for i, r in enumerate(replies) if r["id"] == 0]
    assert notice and replies[notice[0]]["error"]["code"] == ErrorCode.REVOKED, "the revocation notice came"
    assert set(codes) <= {ErrorCode.MALFORMED, ErrorCode.REVOKED}, "no request of the batch was carried out"
    if isolation == "off":  # the shared endpoint stays: every request of the batch is answered, after the notice
        assert codes == [ErrorCode.MALFORMED] * (REFUSAL_BURST + 1) + [ErrorCode.REVOKED] * (n - REFUSAL_BURST - 1)
    assert _rows(journal, "SELECT count(*) FROM egress WHERE run_id = ? AND decision = 'dispatched'", run.id) == [(0,)]
    assert _rows(journal, "SELECT count(*) FROM egress WHERE run_id = ? AND decision = 'refused'", run.id) != [(0,)]


def test_hundreds_of_async_calls_through_the_batching_client_all_come_back_right(sup) -> None:
    n = 700  # more than one batch of MAX_BATCH
    run = sup.start(B.many_acalls, "echo", n, tools=["echo"])
    assert run.result(timeout=WAIT) == list(range(n))
    sup.close()
    rows = _rows(sup.journal_path, "SELECT decision, count(*) FROM egress WHERE run_id = ? AND verb = 'call'"
                 " GROUP BY decision ORDER BY decision", run.id)
    assert rows == [("completed", n), ("dispatched", n)]


def test_a_stop_ends_every_batched_call_in_flight_and_nothing_is_dispatched_after_it(tmp_path) -> None:
    n = 500
    entered = threading.Semaphore(0)
    work = tmp_path / "work"  # writable by the run's own identity; the state directory is masked from it
    work.mkdir()
    os.chmod(work, 0o777)
    sup = Supervisor(state_dir=str(tmp_path / "state"))

    async def hang() -> None:
        entered.release()
        await asyncio.sleep(3600)

    sup.register_tool("hang", hang)
    try:
        run = sup.start(B.acalls_until_revoked, str(work), "hang", n, tools=["hang"], grace=3.0, cwd=str(work))
        for _ in range(n):
            assert entered.acquire(timeout=WAIT), "every call reached its handler"
        report = run.stop()
        ends = json.loads((work / "ends.json").read_text())
        journal = sup.journal_path
    finally:
        sup.close()
    assert report.handlers_cancelled == n and report.survivors == 0, report
    assert sum(ends["ended"].values()) == n and set(ends["ended"]) <= {"Revoked"}, ends
    assert ends["after"] == "Revoked", "a call after the revocation raised at once"
    assert _rows(journal, "SELECT count(*) FROM egress e JOIN revocations r USING (run_id) WHERE e.run_id = ?"
                 " AND e.decision = 'dispatched' AND e.t_ns > r.t_ns", run.id) == [(0,)]
    assert _rows(journal, "SELECT count(*) FROM egress WHERE run_id = ? AND decision = 'dispatched'",
                 run.id) == [(n,)]
