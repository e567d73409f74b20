"""`deadstop serve` as users meet it: a real daemon process, the CLI through subprocess, clients over
real sockets. What a stop leaves alive is read from /proc (procscan), never from the daemon."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time

import msgspec
import pytest
import zmq
import zmq.asyncio
import zmq.auth

from daemonctl import SLEEPER_CONFIG, Daemon, Ready
from procscan import cpu_seconds, marked_processes

CONFIG = SLEEPER_CONFIG + """
[agents.ignorer]
target = "daemon_agents:ignorer"
cwd = "{work}"

[agents.busy]
target = "daemon_agents:busy_tree"
cwd = "{work}"

[agents.spender]
target = "daemon_agents:spender"
cwd = "{work}"
tools = ["llm"]

[agents.level]
target = "daemon_agents:level"
cwd = "{work}"
tools = ["sessions.spawn"]

[agents.emailer]
target = "daemon_agents:emailer"
cwd = "{work}"
tools = ["send_email"]

[agents.echo]
target = "daemon_agents:echo"
cwd = "{work}"

[agents.emitter]
target = "daemon_agents:emitter"
cwd = "{work}"

[tools.llm]
target = "daemon_agents:llm"

[tools.send_email]
provided = true
"""


@pytest.fixture
def daemon(tmp_path, workspace):
    d = Daemon(tmp_path, CONFIG, workspace).start()
    yield d
    assert d.stop() == 0, d.output()


def _msg(ready: Ready, **extra) -> str:
    return json.dumps({"ready": ready.path, **extra})


def test_seed_004_an_operator_runs_every_session_verb_from_the_terminal(daemon, ready) -> None:
    out = daemon.cli("sessions", "send", "chat", _msg(ready), "--agent", "sleeper")
    assert out.returncode == 0 and "started" in out.stdout, out
    daemon.cli("sessions", "send", "big", _msg(ready, tokens=500), "--agent", "spender")
    daemon.cli("sessions", "send", "work", _msg(ready), "--agent", "busy")
    daemon.cli("sessions", "send", "stubborn", _msg(ready), "--agent", "ignorer")
    up = {line["session"]: line["pid"] for line in ready.wait(4)}

    active = {s["key"] for s in daemon.cli_json("sessions", "list", "--active")}
    assert active == {"chat", "big", "work", "stubborn"}
    assert [s["key"] for s in daemon.cli_json("sessions", "list", "--tokens", "100")] == ["big"]
    assert [s["key"] for s in daemon.cli_json("sessions", "list", "--agent", "busy")] == ["work"]
    table = daemon.cli("sessions", "list")
    assert table.returncode == 0 and "STATE" in table.stdout.splitlines()[0] and "spender" in table.stdout

    work_run = daemon.cli_json("sessions", "show", "work")["active_run"]
    pids = list(marked_processes(work_run))
    assert len(pids) == 21 and up["work"] in pids
    assert daemon.cli("sessions", "pause", "work").returncode == 0
    frozen = cpu_seconds(pids)
    time.sleep(0.3)  # the thing measured: no CPU time may accrue while paused
    assert cpu_seconds(pids) == frozen, "a process of the paused tree ran"
    assert daemon.cli_json("sessions", "show", "work")["state"] == "paused"
    assert daemon.cli("sessions", "resume", "work").returncode == 0
    time.sleep(0.3)
    assert cpu_seconds(pids) > frozen, "resume must thaw the tree"

    chat_run = daemon.cli_json("sessions", "show", "chat")["active_run"]
    stopped = daemon.cli_json("sessions", "stop", "chat")
    (report,) = stopped["reports"]
    assert report["run_id"] == chat_run and report["survivors"] == 0 and report["revoke_source"] == "cli"
    assert marked_processes(chat_run) == {}, "the stop returned with a process of the run alive"
    again = daemon.cli_json("sessions", "stop", "chat")
    assert again["already_ended"] is True and again["reports"] == []
    text = daemon.cli("sessions", "stop", "chat")
    assert text.returncode == 0 and "already ended" in text.stdout

    stubborn_run = daemon.cli_json("sessions", "show", "stubborn")["active_run"]
    killed = daemon.cli_json("sessions", "kill", "stubborn")
    assert [r["outcome"] for r in killed["reports"]] == ["killed"]
    assert marked_processes(stubborn_run) == {}

    dry = daemon.cli_json("sessions", "cleanup", "--age", "0", "--dry-run")
    assert sorted(dry) == ["chat", "stubborn"], "only ended sessions may be cleaned up"
    assert sorted(daemon.cli_json("sessions", "cleanup", "--age", "0")) == ["chat", "stubborn"]
    assert {s["key"] for s in daemon.cli_json("sessions", "list")} == {"big", "work"}
    for key in ("big", "work"):
        daemon.cli("sessions", "kill", key)


def test_usage_missing_unreachable_and_timeout_have_their_exit_codes(daemon, ready, tmp_path) -> None:
    assert daemon.cli("sessions", "show", "nobody").returncode == 3
    assert daemon.cli("sessions", "send", "x", "hi", "--agent", "ghost").returncode == 3
    assert daemon.cli("sessions", "stop", "nobody").returncode == 3
    bad = daemon.cli("sessions", "stop", "x", "--grace", "-1")
    assert bad.returncode == 2 and "must be >= 0" in bad.stderr
    assert daemon.cli("sessions", "frobnicate").returncode == 2
    nowhere = daemon.cli("sessions", "list", "--daemon", str(tmp_path / "nowhere"))
    assert nowhere.returncode == 5 and str(tmp_path / "nowhere") in nowhere.stderr, nowhere.stderr

    daemon.cli("sessions", "send", "stubborn", _msg(ready), "--agent", "ignorer")
    ready.wait(1)
    run_id = daemon.cli_json("sessions", "show", "stubborn")["active_run"]
    late = daemon.cli("sessions", "stop", "stubborn", "--grace", "30", "--timeout", "0.5")
    assert late.returncode == 124, (late.returncode, late.stderr)
    info = daemon.cli_json("sessions", "show", "stubborn")
    assert info["state"] == "stopping", "the stop goes on after the CLI gave up waiting"
    killed = daemon.cli_json("sessions", "kill", "stubborn")  # escalates the stop in progress
    assert [r["outcome"] for r in killed["reports"]] == ["killed"]
    assert marked_processes(run_id) == {}


def test_seed_002_a_session_started_by_one_client_is_stopped_by_another_and_by_the_cli(daemon, ready) -> None:
    with daemon.client(name="gateway-a") as a, daemon.client(name="gateway-b") as b:
        sent = a.send("chat", {"ready": ready.path}, agent="sleeper")
        ready.wait(1)
        reply = b.stop("chat")
        (report,) = reply.reports
        assert report["run_id"] == sent.run_id and report["outcome"] == "stopped" and report["survivors"] == 0
        assert report["revoke_source"] == "gateway" and "gateway 'gateway-b'" in report["revoke_reason"]
        assert marked_processes(sent.run_id) == {}

        a.send("top", {"ready": ready.path, "depth": 3}, agent="level")
        levels = ready.wait(3)
        assert sorted(line["depth"] for line in levels) == [1, 2, 3]
        runs = [a.session(k).active_run for k in ("top", "top/level2-1", "top/level2-1/level1-1")]
        assert all(runs) and all(len(marked_processes(r)) == 9 for r in runs)
    out = daemon.cli("sessions", "stop", "top", "--json")
    assert out.returncode == 0, out.stderr
    reports = json.loads(out.stdout)["reports"]
    assert sorted(r["run_id"] for r in reports) == sorted(runs)
    assert all(r["survivors"] == 0 for r in reports)
    assert max(r["revoked_at"] for r in reports) < min(r["term_sent_at"] for r in reports)
    for run_id in runs:
        assert marked_processes(run_id) == {}, "a sub-agent outlived its stopped ancestor"


def test_a_gateway_provided_tool_is_cancelled_at_revoke_and_its_late_result_refused(daemon, ready) -> None:
    from deadstop.supervisor.client import AsyncClient

    async def main() -> None:
        calls: list[tuple[str, int]] = []
        entered, release = asyncio.Event(), asyncio.Event()
        cancelled: list[str] = []

        async def send_email(to: str, body: str) -> str:
            calls.append((to, time.monotonic_ns()))
            entered.set()
            try:
                await release.wait()  # the gateway's slow SMTP server
            except asyncio.CancelledError:
                cancelled.append(to)
                raise
            return f"sent to {to}"

        async with AsyncClient(daemon.runtime, name="mailer") as provider, \
                AsyncClient(daemon.runtime, name="operator") as op:
            assert await provider.provide({"send_email": send_email}) == ["send_email"]
            sent = await op.send("mail", {"ready": ready.path}, agent="emailer")
            await asyncio.get_running_loop().run_in_executor(None, ready.wait, 1)
            await asyncio.wait_for(entered.wait(), 30)
            reply = await op.stop("mail", 0.5)
            (report,) = reply.reports
            assert report["survivors"] == 0 and report["handlers_cancelled"] == 1, report
            for _ in range(200):  # the cancel push travels on the provider's socket
                if cancelled:
                    break
                await asyncio.sleep(0.01)
            assert cancelled == ["user0@example.test"], "the provider got no cancel for its in-flight call"
            assert len(calls) == 1, "a call reached the provider after the revoke"
            assert marked_processes(sent.run_id) == {}
            info = await op.run(sent.run_id)
            assert info.state == "stopped"

    asyncio.run(main())


def test_a_provider_that_disconnects_fails_its_calls_cleanly(daemon, ready) -> None:
    from deadstop.supervisor.client import AsyncClient

    async def main() -> None:
        entered = asyncio.Event()

        async def send_email(to: str, body: str) -> str:
            entered.set()
            await asyncio.Event().wait()  # never answers: its client goes away instead
            return "unreachable"

        provider = await AsyncClient(daemon.runtime, name="flaky").open()
        await provider.provide({"send_email": send_email})
        async with AsyncClient(daemon.runtime, name="operator") as op:
            sent = await op.send("mail", {"ready": ready.path, "count": 1}, agent="emailer")
            await asyncio.wait_for(entered.wait(), 30)
            await provider.close()  # disconnects with the call in flight
            for _ in range(600):  # the run returns once its call failed
                info = await op.run(sent.run_id)
                if info.state in ("exited", "failed", "stopped", "killed"):  # ended, its report stored
                    break
                await asyncio.sleep(0.05)
            assert info.state == "exited", info
            session = await op.session("mail")
            assert session.last_outcome == "exited"
        return sent.run_id

    run_id = asyncio.run(main())
    db = sqlite3.connect(os.path.join(daemon.state, "journal.db"))
    rows = db.execute("SELECT decision, code, detail FROM egress WHERE run_id = ? AND tool = 'send_email'"
                      " ORDER BY seq", (run_id,)).fetchall()
    db.close()
    assert ("failed", 9) in [(d, c) for d, c, _ in rows], rows
    assert any("disconnected" in (detail or "") for _, _, detail in rows), rows


def test_hostile_requests_get_their_codes_and_break_nothing(daemon, ready) -> None:
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(f"ipc://{daemon.runtime}/control")
    try:
        def ask(*frames: bytes) -> dict:
            raw.send_multipart(list(frames))
            assert raw.poll(30_000), "no reply"
            reply = raw.recv_multipart()
            return json.loads(reply[-1])

        assert ask(b"dsg1", b"1", b"{not json")["fault"] == 2
        assert ask(b"dsg1", b"2", b'{"verb": "sessions.explode"}')["fault"] == 1
        assert ask(b"dsg1", b"3", b'{"verb": "sessions.show"}')["fault"] == 2
        assert ask(b"dsg1", b"4", b'{"verb": "sessions.show", "key": "x", "extra": 1}')["fault"] == 2
        assert ask(b"dsg1", b"5", b"x" * (2 << 20))["fault"] == 2  # oversized
        assert ask(b"dsg9", b"6", b'{"verb": "health"}')["fault"] == 3
        assert ask(b"dsg1", b"only two frames")["fault"] == 2
        assert ask(b"dsg1", b"8", b'{"verb": "tools.result", "call_id": "nope", "ok": true}')["fault"] == 30

        with daemon.client(name="other") as other:  # and the daemon still serves everyone else
            sent = other.send("chat", {"ready": ready.path}, agent="sleeper")
            ready.wait(1)
            raw.send_multipart([b"dsg1", b"9", b"\xff" * 1000])  # garbage in flight during the stop
            (report,) = other.stop("chat").reports
            assert report["survivors"] == 0 and marked_processes(sent.run_id) == {}
            assert raw.poll(30_000) and json.loads(raw.recv_multipart()[-1])["fault"] == 2  # the garbage's answer
            assert ask(b"dsg1", b"10", b'{"verb": "health"}')["ok"] is True
    finally:
        raw.close()
        ctx.term()


def test_idempotent_send_starts_one_run(daemon, ready) -> None:
    with daemon.client() as c:
        first = c.send("chat", {"ready": ready.path}, agent="sleeper", idempotency_key="msg-1")
        again = c.send("chat", {"ready": ready.path}, agent="sleeper", idempotency_key="msg-1")
        assert again.run_id == first.run_id and again.generation == first.generation == 1
        ready.wait(1)
        assert c.session("chat").runs == [first.run_id], "a retried send must not take over its own run"
        c.kill("chat")


def test_sigterm_stops_every_run_and_exits_0(tmp_path, workspace, ready) -> None:
    d = Daemon(tmp_path, CONFIG, workspace).start()
    with d.client() as c:
        sent = [c.send(f"s{i}", {"ready": ready.path}, agent="ignorer").run_id for i in range(3)]
    ready.wait(3)
    assert all(marked_processes(r) for r in sent)
    assert d.stop() == 0, d.output()
    assert all(marked_processes(r) == {} for r in sent)
    db = sqlite3.connect(os.path.join(d.state, "journal.db"))
    states = dict(db.execute("SELECT id, state FROM runs").fetchall())
    db.close()
    assert {states[r] for r in sent} == {"killed"}, states
    assert not os.path.exists(os.path.join(d.runtime, "daemon.json"))


def test_sigkill_leaves_no_run_alive_and_a_restart_recovers(tmp_path, workspace, ready) -> None:
    d = Daemon(tmp_path, CONFIG, workspace).start()
    with d.client() as c:
        run_id = c.send("chat", {"ready": ready.path}, agent="busy").run_id
    ready.wait(1)
    assert len(marked_processes(run_id)) == 21
    d.signal(signal.SIGKILL)
    d.proc.wait(30)
    deadline = time.monotonic() + 30
    while marked_processes(run_id) and time.monotonic() < deadline:  # the spawner's watchdog kills them
        time.sleep(0.05)
    assert marked_processes(run_id) == {}, "a run outlived its SIGKILLed daemon"

    d2 = Daemon(tmp_path, CONFIG, workspace).start()  # the stale daemon.json of the dead one is replaced
    try:
        with d2.client() as c:
            info = c.session("chat")
            assert info.state == "idle" and info.last_outcome == "ended by recovery", info
            assert c.run(run_id).report["ended_by"] == "recovered"
    finally:
        assert d2.stop() == 0, d2.output()


def test_a_second_daemon_on_the_same_state_directory_refuses(daemon, tmp_path) -> None:
    os.makedirs(tmp_path / "second")
    other = Daemon(tmp_path / "second", CONFIG)
    other.state = daemon.state  # the live daemon's
    with pytest.raises(AssertionError) as failed:
        other.start()
    assert "pid" in str(failed.value) and str(daemon.proc.pid) in str(failed.value), str(failed.value)


def test_a_bad_configuration_names_the_file_and_the_key(tmp_path) -> None:
    d = Daemon(tmp_path, """
    [agents.broken]
    target = "daemon_agents:sleeper"
    tools = "llm"
    """)
    out = d.cli("serve", "--check", "--config", d.config)
    assert out.returncode == 1 and d.config in out.stderr and "agents.broken.tools" in out.stderr, out.stderr
    os.makedirs(tmp_path / "ok")
    good = Daemon(tmp_path / "ok", CONFIG)
    out = good.cli("serve", "--check", "--config", good.config)
    assert out.returncode == 0 and "8 agent(s)" in out.stdout, out


def _free_port_pair() -> int:
    """A port p with p and p + 1 free on 127.0.0.1 (control and events)."""
    import socket

    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise AssertionError("no free pair of ports")


def test_tcp_admits_only_curve_keys_and_each_key_has_its_scopes(tmp_path, workspace, ready) -> None:
    from deadstop.supervisor import ControlFault, Fault
    from deadstop.supervisor.client import Client

    d = Daemon(tmp_path, CONFIG, workspace)
    made = {name: d.cli("keys", "generate", name, "--scopes", scopes, "--state-dir", d.state)
            for name, scopes in (("reader", "read"), ("writer", "read,write"))}
    assert all(out.returncode == 0 for out in made.values()), made
    reader_key = os.path.join(d.state, "keys", "clients", "reader.key_secret")
    writer_key = os.path.join(d.state, "keys", "clients", "writer.key_secret")
    port = _free_port_pair()
    d.start("--bind", f"tcp://127.0.0.1:{port}")
    try:
        with d.client() as local:  # the owner's ipc endpoint
            sent = local.send("chat", {"ready": ready.path}, agent="sleeper")
        ready.wait(1)

        ctx = zmq.Context()
        try:
            plain = ctx.socket(zmq.DEALER)  # no CURVE at all
            plain.setsockopt(zmq.LINGER, 0)
            plain.connect(f"tcp://127.0.0.1:{port}")
            plain.send_multipart([b"dsg1", b"1", b'{"verb": "sessions.stop", "key": "chat"}'])
            assert not plain.poll(2000), "an unauthenticated tcp client got an answer"
            plain.close()
        finally:
            ctx.term()
        stranger_dir = tmp_path / "stranger"
        os.makedirs(stranger_dir)
        _pub, stranger_key = zmq.auth.create_certificates(str(stranger_dir), "stranger")
        with Client(d.runtime, key=stranger_key, timeout=2) as stranger:  # a key the daemon never authorized
            with pytest.raises(ControlFault) as caught:
                stranger.stop("chat")
            assert caught.value.fault is Fault.TIMED_OUT

        with Client(d.runtime, key=reader_key) as reader:
            assert [s.key for s in reader.sessions()] == ["chat"]
            with pytest.raises(ControlFault) as caught:
                reader.stop("chat")
            assert caught.value.fault is Fault.FORBIDDEN
        denied = d.cli("sessions", "kill", "chat", "--key", reader_key)
        assert denied.returncode == 4, (denied.returncode, denied.stderr)
        assert marked_processes(sent.run_id), "a refused stop touched the run"

        with Client(d.runtime, key=writer_key, name="web") as writer:
            (report,) = writer.stop("chat").reports
        assert report["survivors"] == 0 and report["revoke_source"] == "gateway"
        assert "gateway 'writer'" in report["revoke_reason"], report["revoke_reason"]
        assert marked_processes(sent.run_id) == {}
    finally:
        assert d.stop() == 0, d.output()


def test_the_event_stream_numbers_each_sessions_events(daemon) -> None:
    with daemon.client() as c, c.events(idle_timeout=30) as everything, c.events("b", idle_timeout=30) as only_b:
        runs = {key: c.send(key, {"count": 50}, agent="emitter").run_id for key in ("a", "b")}
        seen: dict[str, list[tuple[int, str]]] = {"a": [], "b": []}
        ended = set()
        for event in everything:
            seen[event.session].append((event.seq, event.kind))
            if event.kind == "run.ended":
                ended.add(event.session)
                if ended == {"a", "b"}:
                    break
        b_only = []
        for event in only_b:
            b_only.append((event.session, event.seq, event.kind))
            if event.kind == "run.ended":
                break
    for key in ("a", "b"):
        kinds = [kind for _, kind in seen[key]]
        assert [seq for seq, _ in seen[key]] == list(range(1, len(kinds) + 1)), f"session {key}: seq counts 1, 2, ..."
        # run.sample (live usage, once a second) may fall anywhere while the run is up
        assert [k for k in kinds if k != "run.sample"] == ["session.message", "run.started"] + ["progress"] * 50 + \
            ["run.ended"], kinds
    b_kinds = [k for _, _, k in b_only if k != "run.sample"]
    assert {s for s, _, _ in b_only} == {"b"} and len(b_kinds) == 53, "a session's subscriber gets its events only"
    assert runs["a"] != runs["b"]


def test_the_event_stream_tells_tool_calls_usage_and_stops(daemon, ready) -> None:
    with daemon.client() as c, c.events("big", idle_timeout=30) as stream:
        c.send("big", {"ready": ready.path, "tokens": 42}, agent="spender")
        ready.wait(1)
        c.stop("big")
        kinds, data = [], {}
        for event in stream:
            kinds.append(event.kind)
            data.setdefault(event.kind, event.data)
            if event.kind == "run.ended":
                break
    assert kinds == ["session.message", "run.started", "run.tool_call", "run.usage", "session.stopped", "run.ended"], kinds
    assert data["run.tool_call"]["tool"] == "llm" and data["run.usage"]["usage"] == {"prompt_tokens": 42}
    assert data["session.stopped"] == {"mode": "stop", "source": "gateway", "runs": 1}


def test_reload_rereads_agents_and_leaves_live_runs_alone(daemon, ready) -> None:
    sent = daemon.cli_json("sessions", "send", "chat", _msg(ready), "--agent", "sleeper")
    ready.wait(1)
    with open(daemon.config, "a") as f:
        f.write('\n[agents.newcomer]\ntarget = "daemon_agents:echo"\ncwd = "{}"\n'.format(daemon.dir / "work"))
    assert "newcomer" in daemon.cli_json("daemon", "reload")["agents"]
    assert "newcomer" in [a["name"] for a in daemon.cli_json("agents", "list")]
    with open(daemon.config, "a") as f:
        f.write("\n[agents.broken]\ntools = 3\n")
    bad = daemon.cli("daemon", "reload")
    assert bad.returncode == 2 and "configuration unchanged" in bad.stderr and "agents.broken" in bad.stderr, bad
    daemon.signal(signal.SIGHUP)  # the same re-read by signal: logged, and nothing changes
    assert daemon.cli_json("sessions", "show", "chat")["active_run"] == sent["run_id"]
    assert marked_processes(sent["run_id"]), "a reload touched a live run"
    daemon.cli("sessions", "kill", "chat")


def test_the_default_layout_keeps_the_shared_base_traversable(tmp_path, workspace, ready) -> None:
    """The daemon's own directory is owner-only; the base above it is shared with every
    supervisor's per-run endpoint directories, which runs with their own uids must reach."""
    d = Daemon(tmp_path, CONFIG, workspace).start(default_layout=True)
    try:
        base = tmp_path / "xdg" / "deadstop"
        assert (base / "daemon.json").is_symlink()
        assert os.stat(base).st_mode & 0o777 == 0o711
        assert os.stat(base / "daemon").st_mode & 0o777 == 0o700
        listed = d.cli("sessions", "list")  # no --daemon, no $DEADSTOP_DAEMON: the well-known path
        assert listed.returncode == 0, listed.stderr
        out = d.cli("sessions", "send", "big", _msg(ready, tokens=10), "--agent", "spender")
        assert out.returncode == 0, out.stderr
        ready.wait(1)  # the run reached its endpoint below the base: its llm call went through
        assert [s["key"] for s in d.cli_json("sessions", "list", "--tokens", "10")] == ["big"]
        d.cli("sessions", "kill", "big")
    finally:
        assert d.stop() == 0, d.output()
    assert not (tmp_path / "xdg" / "deadstop" / "daemon.json").exists()


def test_a_client_that_disconnects_mid_call_wedges_nothing(daemon, ready) -> None:
    daemon.cli("sessions", "send", "stubborn", _msg(ready), "--agent", "ignorer")
    ready.wait(1)
    run_id = daemon.cli_json("sessions", "show", "stubborn")["active_run"]
    ctx = zmq.Context()
    try:
        gone = ctx.socket(zmq.DEALER)
        gone.setsockopt(zmq.LINGER, 1000)
        gone.connect(f"ipc://{daemon.runtime}/control")
        gone.send_multipart([b"dsg1", b"1", b'{"verb": "sessions.stop", "key": "stubborn", "grace": 1.0}'])
        gone.close()  # before the reply: the stop goes on, its answer has nowhere to go
    finally:
        ctx.term()
    with daemon.client() as c:
        deadline = time.monotonic() + 30
        while c.run(run_id).state != "stopped" and time.monotonic() < deadline:  # the grace runs out, then SIGKILL
            time.sleep(0.05)
        info = c.run(run_id)
        assert info.state == "stopped" and info.report["ended_by"] == "sigkill", info
        assert c.health().live_runs == 0
    assert marked_processes(run_id) == {}


def test_an_async_client_survives_a_reply_it_cannot_read(tmp_path) -> None:
    """A reply that does not fit its verb fails that call only: the client's reader lives on, and the
    next call is answered (a dead reader left every later call waiting for ever: the console's client
    waits with no bound). The daemon here is a stand-in ROUTER socket, so the reply can be wrong."""
    from deadstop.ipc import gateway
    from deadstop.supervisor.client.aio import AsyncClient

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        endpoint = f"ipc://{tmp_path}/control"
        router.bind(endpoint)
        where = gateway.ConnectionFile(control=[endpoint], events=[f"ipc://{tmp_path}/events"], pid=os.getpid(),
                                       started=time.time(), state_dir=str(tmp_path), supervisor_id="stand-in")

        async def answer(result: object) -> None:
            ident, version, req_id, body = await router.recv_multipart()
            assert json.loads(body)["verb"] == "sessions.show"
            await router.send_multipart([ident, version, req_id, json.dumps({"ok": True, "result": result}).encode()])

        try:
            async with AsyncClient(where, timeout=None) as client:
                first = asyncio.ensure_future(client.session("chat"))
                await asyncio.wait_for(answer({"key": ["not", "a", "key"]}), 30)
                with pytest.raises(msgspec.ValidationError):  # not a TimeoutError: the call was answered
                    await asyncio.wait_for(first, 30)
                second = asyncio.ensure_future(client.session("chat"))
                info = {"key": "chat", "agent": "sleeper", "state": "idle", "generation": 1}
                real = await asyncio.wait_for(asyncio.gather(answer(info), second), 30)
                assert real[1].key == "chat"
        finally:
            router.close()
            ctx.term()

    asyncio.run(main())
