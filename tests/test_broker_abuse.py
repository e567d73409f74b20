"""A run that abuses the egress broker is cut off, and costs nobody else anything.

Real runs on a real supervisor: a garbage flood is stopped for abuse with a
journal that stays small while a bystander keeps working; deep JSON is
MALFORMED, never INTERNAL; a run cannot emit the supervisor's own event
kinds; a paused run's held queue is capped, and a batch (ds2) held while
paused is released in arrival order; a run's own endpoint is gone after the
stop; a run blocked in a call learns of its revocation at once.

The kernel-attested identity is tested on the broker of a real supervisor
with channels opened for test uids, spoken to by a helper process that
drops to such a uid before it connects (that needs root).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import tempfile
import threading
import time
from typing import Any

import pytest
import zmq

import abuse_agents as A
import behaviours
from journalscan import rows as _rows
from procscan import marked_processes
from waiting import late_start_reply
from deadstop.ipc import framing
from deadstop.ipc.errors import ErrorCode
from deadstop.supervisor import Supervisor
from deadstop.supervisor.egress.broker import MAX_HELD, MAX_HELD_BYTES, REFUSAL_BURST
from deadstop.supervisor.store.journal import REFUSAL_ROWS
from deadstop.supervisor.facades.sync import _value

WAIT = 30.0
#: Test identities, inside no range a host or deadstop's default would use.
UID_A, UID_B = 2_099_000_123, 2_099_000_124


# -- helpers -----------------------------------------------------------------------
class Helper:
    """A process forked before any supervisor thread exists, that later does one job as another uid.

    Forking first keeps the child free of the supervisor's threads and
    sockets; the job (and the uid to take) arrives on a pipe once the test
    knows it, and the answer comes back as JSON.
    """

    def __init__(self) -> None:
        cmd_r, self._cmd = os.pipe()
        self._res, res_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(self._cmd)
            os.close(self._res)
            _helper_main(cmd_r, res_w)
        os.close(cmd_r)
        os.close(res_w)

    def run(self, job: str, timeout: float = WAIT, **args: Any) -> Any:
        command = memoryview(json.dumps({"job": job, **args}).encode())
        while command:
            command = command[os.write(self._cmd, command):]
        os.close(self._cmd)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self._res], [], [], max(0.0, deadline - time.monotonic()))[0]:
                chunk = os.read(self._res, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
        self.close()
        out = json.loads(b"".join(chunks) or b'{"error": "helper timed out"}')
        assert "error" not in out, out.get("error")
        return out["result"]

    def close(self) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(self.pid, 0)
            os.close(self._res)
            self.pid = 0


def _helper_main(cmd_r: int, res_w: int) -> None:
    try:
        low, high = sorted((cmd_r, res_w))  # the parent's sockets (the broker's among them) are not ours
        os.closerange(3, low)
        os.closerange(low + 1, high)
        os.closerange(high + 1, 1 << 16)
        data = b""
        while chunk := os.read(cmd_r, 1 << 20):
            data += chunk
        cmd = json.loads(data)
        if cmd.get("uid") is not None:
            os.setgroups([])
            os.setresgid(cmd["gid"], cmd["gid"], cmd["gid"])
            os.setresuid(cmd["uid"], cmd["uid"], cmd["uid"])
        result = JOBS[cmd.pop("job")](**{k: v for k, v in cmd.items() if k not in ("uid", "gid")})
        out = {"result": result}
    except BaseException as exc:  # reported to the test, which fails with it
        out = {"error": f"{type(exc).__name__}: {exc}"}
    os.write(res_w, json.dumps(out).encode())
    os._exit(0)


def _frames(message: list[str]) -> list[bytes]:
    return [part.encode("latin-1") for part in message]


def _job_exchange(address: str, messages: list[list[str]], expect: int, wait_ms: int, linger_ms: int = 0) -> list:
    """Send every message, then collect reply bodies: `expect` of them within `wait_ms`, and any
    that follow within `linger_ms`."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    for message in messages:
        sock.send_multipart(_frames(message))
    replies = []
    deadline = time.monotonic() + wait_ms / 1000
    while len(replies) < expect and sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
        replies.append(json.loads(sock.recv_multipart()[-1]))
    while linger_ms and sock.poll(linger_ms):
        replies.append(json.loads(sock.recv_multipart()[-1]))
    sock.close(0)
    ctx.term()
    return replies


def _job_flood(address: str, message: list[str], count: int, seconds: float) -> int:
    """Send `message` up to `count` times within `seconds`, never blocking; return how many went."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    frames, sent = _frames(message), 0
    deadline = time.monotonic() + seconds
    while sent < count and time.monotonic() < deadline:
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
            sent += 1
        except zmq.Again:
            time.sleep(0.001)
        while sock.poll(0):
            sock.recv_multipart()
    sock.close(0)
    ctx.term()
    return sent


JOBS = {"exchange": _job_exchange, "flood": _job_flood}


def _request(chan: dict, body: dict | bytes, run_id: str | None = None, credential: str | None = None) -> list[str]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return ["ds1", run_id or chan["run_id"], credential or chan["credential"], chan["generation"],
            raw.decode("latin-1")]


def _refusals(journal: str, run_id: str | None) -> tuple[int, int]:
    """(rows written, refusals they stand for) of one run's refusals (None: unattributed)."""
    rows = _rows(journal, "SELECT detail FROM egress WHERE decision = 'refused' AND run_id IS ?", run_id)
    total = sum(int(d.split()[1]) if d and d.endswith("more like this") else 1 for (d,) in rows)
    return len(rows), total


def _core_run(sup: Supervisor, run):
    return sup.core.get_run(run.id)


@pytest.fixture
def work(tmp_path):
    """The runs' workspace, writable by their own identities; the journal stays apart, in tmp_path/state."""
    path = tmp_path / "work"
    path.mkdir()
    os.chmod(path, 0o777)
    (tmp_path / "state").mkdir()
    return path


def _supervisor(work, **options: Any) -> Supervisor:
    sup = Supervisor(state_dir=str(work.parent / "state"), **options)
    sup.register_tool("echo", lambda text: text)
    sup.register_tool("tick", lambda: None)
    return sup


# -- floods and budgets --------------------------------------------------------------
@pytest.mark.parametrize("isolation", ["auto", "off"])  # with an endpoint of its own, and on the shared one
def test_garbage_flood_is_stopped_for_abuse_with_a_small_journal_and_a_working_bystander(work, isolation) -> None:
    with _supervisor(work, isolation=isolation) as sup:
        bystander = sup.start(A.round_trips, 3.0, tools=["echo"], cwd=str(work))
        flooder = sup.start(A.garbage_flood, str(work), 200_000, 10.0, cwd=str(work), grace=0.5)
        info = flooder.wait(timeout=WAIT)
        during = bystander.result(timeout=WAIT)
        after = sup.start(behaviours.calls_and_reports, "echo", "still fine", tools=["echo"], cwd=str(work))
        assert after.result(timeout=WAIT) == {"ok": True, "value": "still fine"}
        journal = sup.journal_path
    sent = int((work / "sent").read_text())
    assert info.report.revoke_source == "abuse", info.report
    assert info.report.outcome in ("stopped", "killed") and info.report.survivors == 0
    rows, refused = _refusals(journal, flooder.id)
    assert refused >= REFUSAL_BURST, "the budget is spent only by that many refusals"
    # MALFORMED, then REVOKED for what was on its way: a few rows each, and a count.
    assert rows <= 4 * (REFUSAL_ROWS + 1), f"{rows} journal rows for {refused} refusals: repeats were not collapsed"
    assert rows * 10 < min(refused, sent), f"{rows} journal rows for {sent} frames sent, {refused} refused"
    assert during["calls"] > 0 and during["errors"] == [], during
    assert _rows(journal, "SELECT count(*) FROM egress WHERE code = ?", int(ErrorCode.INTERNAL)) == [(0,)]


@pytest.mark.parametrize("isolation", ["auto", "off"])
def test_a_flood_before_the_supervisor_knows_the_run_started_still_stops_it(work, isolation, monkeypatch) -> None:
    """Abuse seen before the spawner's word that the run started: revoked at once, stopped at attach."""
    with _supervisor(work, isolation=isolation) as sup:
        channels = sup.core.broker.channels
        late_start_reply(sup, monkeypatch, bound=WAIT,
                         until=lambda: any(c.revocation is not None for c in list(channels.values())))
        flooder = sup.start(A.garbage_flood, str(work), 10_000_000, 10 * WAIT, cwd=str(work), grace=0.5)
        info = flooder.wait(timeout=WAIT)
    assert info.report.revoke_source == "abuse", info.report
    assert info.report.outcome in ("stopped", "killed") and info.report.survivors == 0, info.report
    assert marked_processes(flooder.id) == {}, "the flooder outlived its stop"


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_deep_json_is_malformed_not_internal(work, depth, caplog) -> None:
    with _supervisor(work) as sup:
        run = sup.start(A.deep_json, [depth, 10], tools=["echo"], cwd=str(work))
        replies = run.result(timeout=WAIT)
        journal = sup.journal_path
    # Id 0: no id can be read from a body that cannot be parsed. The broker still serves the run.
    assert replies == [[0, int(ErrorCode.MALFORMED)], [5, None]]
    assert _rows(journal, "SELECT code FROM egress WHERE run_id = ? AND decision = 'refused'", run.id) == [
        (int(ErrorCode.MALFORMED),)]
    assert _rows(journal, "SELECT count(*) FROM egress WHERE code = ?", int(ErrorCode.INTERNAL)) == [(0,)]
    assert not [r for r in caplog.records if r.name == "deadstop.broker" and r.levelname == "ERROR"]


def test_a_run_cannot_emit_the_supervisors_own_event_kinds(work) -> None:
    kinds = ["run.ended", "session.stopped", "run.", "fine", "running", "sessions"]
    with _supervisor(work) as sup:
        events = sup.subscribe()
        run = sup.start(A.emits_reserved, kinds, cwd=str(work))
        codes = run.result(timeout=WAIT)
        seen = []
        for event in events:
            if event.run_id == run.id:
                seen.append((event.kind, event.data))
                if event.kind == "run.ended":
                    break
        journal = sup.journal_path
    reserved = int(ErrorCode.RESERVED_KIND)
    assert codes == {"run.ended": reserved, "session.stopped": reserved, "run.": reserved,
                     "fine": 0, "running": 0, "sessions": 0}
    assert seen == [("fine", {"forged": True}), ("running", {"forged": True}), ("sessions", {"forged": True}),
                    ("run.ended", {"state": "exited"})]
    assert _rows(journal, "SELECT tool, code FROM egress WHERE run_id = ? AND decision = 'refused' ORDER BY seq",
                 run.id) == [("run.ended", reserved), ("session.stopped", reserved), ("run.", reserved)]


def _shared_channel(sup: Supervisor, work, ready: threading.Event, ping_every: float = 0.0):
    run = sup.start(A.shares_its_channel, str(work), ping_every, tools=["echo", "ready"], cwd=str(work), grace=1.0)
    assert ready.wait(WAIT)
    chan = json.loads((work / "channel.json").read_text())
    uid = _core_run(sup, run).uid
    # Speak as the run's own identity where it has one (its uid is checked), else as ourselves.
    who = {"uid": uid, "gid": uid} if uid is not None else {}
    return run, chan, who


def test_a_paused_runs_held_queue_is_capped_in_bytes_and_in_count(work) -> None:
    big = {"verb": "call", "id": 0, "tool": "echo", "args": ["x" * 1_000_000]}
    fit = MAX_HELD_BYTES // len(json.dumps(big))
    helper = Helper()
    try:
        ready = threading.Event()
        with _supervisor(work) as sup:
            sup.register_tool("ready", ready.set)
            run, chan, who = _shared_channel(sup, work, ready)
            assert run.pause()
            messages = [_request(chan, {**big, "id": i}) for i in range(1, fit + 2)]
            messages += [_request(chan, {"verb": "call", "id": i, "tool": "echo", "args": ["y"]})
                         for i in range(fit + 2, MAX_HELD + 12)]
            # Held requests get no answer while paused; only those over a cap do, at once.
            replies = helper.run("exchange", address=chan["address"], messages=messages, expect=11,
                                 wait_ms=20_000, linger_ms=300, **who)
            sup._call(_value(sup.core.journal.commit_now))
            held = _rows(sup.journal_path, "SELECT count(*) FROM egress WHERE run_id = ? AND decision = 'held'",
                         run.id)
            report = run.stop()
            journal = sup.journal_path
    finally:
        helper.close()
    full = int(ErrorCode.QUEUE_FULL)
    assert sorted(r["id"] for r in replies) == [fit + 1] + list(range(MAX_HELD + 2, MAX_HELD + 12)), replies
    assert {r["error"]["code"] for r in replies} == {full}
    assert held == [(MAX_HELD,)]
    assert report.revoke_source == "api"
    rows, refused = _refusals(journal, run.id)
    assert refused == 11 + MAX_HELD, "the 11 over a cap at once, the held ones (REVOKED) at the stop"
    assert rows <= 2 * (REFUSAL_ROWS + 1), f"{rows} rows: repeats were not collapsed"


def test_a_batch_held_while_paused_is_answered_in_order_at_resume(work) -> None:
    """ds2 under the pause: each request of a batch is held (ping excepted) and released in arrival order.

    On the shared endpoint (isolation off: no identity of its own), so that this process may speak for the run
    with its credential and keep its connection open across the pause."""
    ready = threading.Event()
    with _supervisor(work, isolation="off") as sup:
        sup.register_tool("ready", ready.set)
        run, chan, _who = _shared_channel(sup, work, ready)
        assert run.pause()
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(chan["address"])
        try:
            batch = [{"verb": "call", "id": 1, "tool": "echo", "args": ["one"]}, {"verb": "emit", "id": 2, "kind": "k"},
                     {"verb": "ping", "id": 3}, {"verb": "call", "id": 4, "tool": "echo", "args": ["four"]}]
            sock.send_multipart(_frames(["ds2", *_request(chan, b"")[1:4], json.dumps(batch)]))

            def replies(n: int, seconds: float) -> list[dict]:
                got: list[dict] = []
                deadline = time.monotonic() + seconds
                while len(got) < n and sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                    version, body = sock.recv_multipart()
                    assert version == b"ds2"
                    got += json.loads(body)
                return got

            at_once = replies(1, WAIT)
            assert [r["id"] for r in at_once] == [3], "only the ping is answered while paused"
            assert replies(1, 0.3) == [], "nothing held is answered before the resume"
            sup._call(_value(sup.core.journal.commit_now))
            held = _rows(sup.journal_path, "SELECT req_id FROM egress WHERE run_id = ? AND decision = 'held' ORDER BY seq",
                         run.id)
            assert run.resume()
            later = replies(3, WAIT)
        finally:
            sock.close(0)
            ctx.term()
        report = run.stop()
        journal = sup.journal_path
    assert held == [(1,), (2,), (4,)]
    assert sorted((r["id"], r["ok"], r.get("result")) for r in later) == [(1, True, "one"), (2, True, None), (4, True, "four")]
    decided = _rows(journal, "SELECT req_id, decision FROM egress WHERE run_id = ? AND tool IN ('echo', 'k') AND "
                    "decision != 'held' AND decision != 'completed' ORDER BY seq", run.id)
    assert decided == [(1, "dispatched"), (2, "allowed"), (4, "dispatched")], "released in arrival order"
    assert report.survivors == 0


def test_a_runs_own_endpoint_is_gone_after_the_stop(work) -> None:
    ready = threading.Event()
    with _supervisor(work) as sup:
        sup.register_tool("ready", ready.set)
        run, chan, _who = _shared_channel(sup, work, ready, ping_every=0.005)
        if chan["address"] == sup.core.broker.address:
            pytest.skip(f"runs here have no endpoint of their own: {sup.isolation}")
        path = chan["address"][len("ipc://"):]
        assert os.path.exists(path)
        report = run.stop()
        assert not os.path.exists(path), "the revoke must remove the run's socket"
        before = _rows(sup.journal_path, "SELECT count(*) FROM egress")
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(chan["address"])
        sock.send_multipart(_frames(_request(chan, {"verb": "ping", "id": 1})))
        answered = sock.poll(500)
        sock.close(0)
        ctx.term()
        sup._call(_value(sup.core.journal.commit_now))
        after = _rows(sup.journal_path, "SELECT count(*) FROM egress")
    # It pinged every 5 ms through the whole 1 s grace; once revoked, only what
    # was already on its way reached the broker: the connection was closed.
    assert report.ended_by == "sigkill" and report.refused_after_revoke <= 5, report
    assert not answered, "nothing may answer at a revoked run's address"
    assert before == after, "nothing may reach the broker through a revoked run's address"


@pytest.mark.parametrize("asynchronous", [False, True], ids=["call", "acall"])
def test_a_run_blocked_in_a_call_learns_of_its_revocation_at_once(work, asynchronous) -> None:
    entered, release = threading.Event(), threading.Event()

    def block() -> None:
        entered.set()
        release.wait(WAIT)

    with _supervisor(work) as sup:
        sup.register_tool("block", block)
        try:
            run = sup.start(A.blocked_in_call, str(work), asynchronous, tools=["block", "tick"], cwd=str(work),
                            grace=2.0)
            assert entered.wait(WAIT)
            report = run.stop()
        finally:
            release.set()
    lines = [line.split() for line in (work / "revoked.log").read_text().splitlines()]
    # The blocked call ends with its cancellation (CANCELLED, 10, quoting the
    # revocation) or the revocation notice (REVOKED, 5), whichever comes first;
    # the next call is refused in the process itself.
    assert [line[:2] for line in lines] == [["block", "Revoked"], ["tick", "Revoked"]], lines
    assert lines[0][2] in ("5", "10") and lines[1][2] == "5", lines
    # Not the handler's end (it is blocked until the test ends), but the cancellation or the notice.
    assert int(lines[0][3]) - report.revoked_at < 1e9, "the blocked call did not learn of the revoke promptly"
    assert report.refused_after_revoke == 0, "the second call must not be sent: the process knows it is revoked"


# -- kernel-attested identity (broker level) ---------------------------------------------
@pytest.fixture
def endpoints():
    """A base directory runs' identities can traverse, and per-uid endpoint directories in it."""
    base = tempfile.mkdtemp(prefix="ds-abuse-")
    os.chmod(base, 0o711)

    def make(name: str, gid: int) -> str:
        path = os.path.join(base, name)
        os.mkdir(path, 0o710)
        os.chown(path, 0, gid)
        return path

    yield make
    shutil.rmtree(base, ignore_errors=True)


def _open(sup: Supervisor, run_id: str, uid: int, endpoint_dir: str) -> dict:
    credential = framing.new_credential()
    chan = sup._call(_value(lambda: sup.core.broker.open_channel(
        run_id, credential, frozenset({"echo"}), peer_uid=uid, peer_gid=uid, endpoint_dir=endpoint_dir)))
    return {"address": chan.address, "run_id": run_id, "credential": credential.decode(), "generation": "0"}


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to a test uid needs root")
def test_a_credential_is_useless_from_another_runs_uid(work, endpoints) -> None:
    helpers = {name: Helper() for name in ("own", "stolen", "other_door", "root")}
    try:
        with _supervisor(work) as sup:
            a = _open(sup, "aaaaaaaaaaaa", UID_A, endpoints("a", UID_A))
            b = _open(sup, "bbbbbbbbbbbb", UID_B, endpoints("b", UID_B))
            as_a = {"uid": UID_A, "gid": UID_A}
            ping = {"verb": "ping", "id": 1}
            own = helpers["own"].run("exchange", address=a["address"], messages=[_request(a, ping)],
                                     expect=1, wait_ms=5000, **as_a)
            stolen = helpers["stolen"].run("exchange", address=a["address"], messages=[_request(b, ping)],
                                           expect=1, wait_ms=5000, **as_a)
            other_door = helpers["other_door"].run("exchange", address=b["address"], messages=[_request(b, ping)],
                                                   expect=1, wait_ms=500, **as_a)
            root = helpers["root"].run("exchange", address=a["address"], messages=[_request(a, ping)],
                                       expect=1, wait_ms=5000)
            sup._call(_value(sup.core.journal.commit_now))
            rows = _rows(sup.journal_path, "SELECT run_id, code, detail FROM egress WHERE decision = 'refused'")
            revoked = sup._call(_value(lambda: [c.revocation for c in sup.core.broker.channels.values()]))
    finally:
        for helper in helpers.values():
            helper.close()
    assert own == [{"id": 1, "ok": True, "result": {"state": "unknown"}}]
    unauthenticated = int(ErrorCode.UNAUTHENTICATED)
    assert [(r["id"], r["error"]["code"]) for r in stolen] == [(0, unauthenticated)]
    assert other_door == [], "a run's endpoint must be closed to other identities"
    assert [(r["id"], r["error"]["code"]) for r in root] == [(0, unauthenticated)], "the uid is checked for all"
    # The stolen credential is filed under the run whose uid used it; root's try under no run.
    assert [(r[0], r[1]) for r in rows] == [("aaaaaaaaaaaa", unauthenticated), (None, unauthenticated)]
    assert "'bbbbbbbbbbbb'" in rows[0][2]
    assert revoked == [None, None]


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to a test uid needs root")
def test_unauthenticated_garbage_from_a_runs_uid_spends_that_runs_budget(work, endpoints) -> None:
    helper = Helper()
    try:
        with _supervisor(work) as sup:
            a = _open(sup, "aaaaaaaaaaaa", UID_A, endpoints("a", UID_A))
            _open(sup, "bbbbbbbbbbbb", UID_B, endpoints("b", UID_B))  # the bystander whose budget must not pay
            sent = helper.run("flood", address=a["address"], message=["ds0", "garbage"], count=5_000,
                              seconds=2.0, uid=UID_A, gid=UID_A)
            channels = sup._call(_value(lambda: dict(sup.core.broker.channels)))
            revoked = {run_id: chan.revocation for run_id, chan in channels.items()}
            endpoint_a = channels["aaaaaaaaaaaa"].endpoint
            journal = sup.journal_path
    finally:
        helper.close()
    rows, refused = _refusals(journal, "aaaaaaaaaaaa")  # summaries are written by the journal's close at the latest
    assert revoked["aaaaaaaaaaaa"] is not None and revoked["aaaaaaaaaaaa"].source == "abuse"
    assert revoked["bbbbbbbbbbbb"] is None, "another run's budget paid for it"
    assert endpoint_a is None and not os.path.exists(a["address"][len("ipc://"):])
    assert refused >= REFUSAL_BURST and rows <= 4 * (REFUSAL_ROWS + 1), (rows, refused, sent)
    assert _refusals(journal, None)[0] == 0, "the flood was attributed, not filed under no run"
    assert _rows(journal, "SELECT source FROM revocations WHERE run_id = 'aaaaaaaaaaaa'") == [("abuse",)]
