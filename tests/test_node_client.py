"""The Node client (examples/node/) against a real `deadstop serve`: one Node process starts a session and
provides the tool its run calls, another stops the session; what the run left alive is read from /proc
(procscan), what was dispatched from the journal."""

from __future__ import annotations

import json
import os
import select
import shutil
import sqlite3
import subprocess
import time

import pytest

from daemonctl import Daemon, Ready
from procscan import marked_processes

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "node")
NODE = shutil.which("node")
WAIT = 60.0
#: Calls the provider answers before it stalls on one, like a mail server that stopped responding.
ANSWERED = 3

CONFIG = """
[defaults]
grace = 0.5

[agents.emailer]
target = "daemon_agents:emailer"
cwd = "{work}"
tools = ["send_email"]

[agents.emitter]
target = "daemon_agents:emitter"
cwd = "{work}"

[agents.sleeper]
target = "daemon_agents:sleeper"
cwd = "{work}"

[tools.send_email]
provided = true
"""


def _need_node() -> str:
    if NODE is None:
        pytest.skip("node is not installed: the Node client in examples/node is not tested")
    if not os.path.isdir(os.path.join(EXAMPLES, "node_modules", "zeromq")):
        pytest.skip("examples/node/node_modules/zeromq is missing: run `npm ci` in examples/node")
    return NODE


class Lines:
    """JSON lines of a child's stdout, read with select so that every wait has a deadline."""

    def __init__(self, proc: subprocess.Popen, stderr_path: str) -> None:
        self.proc, self.stderr_path = proc, stderr_path
        self.fd = proc.stdout.fileno()
        self.buf = b""
        self.seen: list[dict] = []
        self.eof = False

    def until(self, event: str, timeout: float = WAIT, **fields) -> dict:
        """The first line (seen before or read now) of this event with these fields."""
        deadline = time.monotonic() + timeout
        checked = 0
        while True:
            for line in self.seen[checked:]:
                if line["event"] == event and all(line.get(k) == v for k, v in fields.items()):
                    return line
            checked = len(self.seen)
            left = deadline - time.monotonic()
            if self.eof or left <= 0 or not self._read(left):
                raise AssertionError(f"no {event} {fields} within {timeout:g} s (eof: {self.eof}); "
                                     f"seen {self.seen}; stderr: {self.stderr()}")

    def rest(self, timeout: float = WAIT) -> list[dict]:
        """Everything up to EOF."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                raise AssertionError(f"no EOF within {timeout:g} s; seen {self.seen}; stderr: {self.stderr()}")
        return self.seen

    def _read(self, timeout: float) -> bool:
        if not select.select([self.fd], [], [], timeout)[0]:
            return False
        data = os.read(self.fd, 65536)
        self.eof = not data
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        self.seen += [json.loads(line) for line in lines if line.strip()]
        return True

    def stderr(self) -> str:
        with open(self.stderr_path, "rb") as f:
            return f.read().decode(errors="replace")[-4000:]


def _node(node: str, daemon: Daemon, log: str, *args: str, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    # Each finds the daemon through $DEADSTOP_DAEMON, set in daemon.env, as a client on the host would.
    with open(log, "wb") as err:
        return subprocess.Popen([node, *args], cwd=EXAMPLES, env=daemon.env, stdin=stdin,
                                stdout=subprocess.PIPE, stderr=err)


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    proc.stdout.close()
    if proc.stdin is not None:
        proc.stdin.close()


def test_a_node_provider_is_cancelled_when_another_node_client_stops_the_session(tmp_path, workspace) -> None:
    node = _need_node()
    ready = Ready(workspace)
    daemon = Daemon(tmp_path, CONFIG, workspace)
    started: list[subprocess.Popen] = []
    try:
        daemon.start()
        message = json.dumps({"ready": ready.path, "count": 1_000_000})
        provider = _node(node, daemon, str(tmp_path / "a.err"), "start_and_provide.mjs", "mail", "emailer", message,
                         "--answer", str(ANSWERED), "--delay-ms", "20", stdin=subprocess.PIPE)
        started.append(provider)
        a = Lines(provider, str(tmp_path / "a.err"))
        run_id = a.until("sent")["run_id"]
        ready.wait(1, timeout=WAIT)
        held = a.until("call", n=ANSWERED + 1)  # the answered calls went back; this one is in flight
        assert held["run_id"] == run_id

        stopper = _node(node, daemon, str(tmp_path / "b.err"), "stop_session.mjs", "mail", "--grace", "0.5")
        started.append(stopper)
        b = Lines(stopper, str(tmp_path / "b.err"))
        (reply,) = b.rest()
        assert stopper.wait(WAIT) == 0, (reply, b.stderr())
        (stopped,) = reply["reports"]
        assert stopped["run_id"] == run_id and stopped["survivors"] == 0, stopped
        assert stopped["revoke_source"] == "gateway" and "gateway 'operator'" in stopped["revoke_reason"], stopped
        assert stopped["handlers_cancelled"] == 1, stopped
        assert marked_processes(run_id) == {}, "the stop returned with a process of the run alive"

        cancel = a.until("cancel")
        assert cancel["call_id"] == held["call_id"], (cancel, held)
        provider.stdin.close()  # the provider's cue to close its client and exit
        lines = a.rest()
        assert provider.wait(WAIT) == 0, a.stderr()
        assert lines[-1]["event"] == "closed", lines
        calls = [line for line in lines if line["event"] == "call"]
        assert [c["n"] for c in calls] == list(range(1, ANSWERED + 2)), "a call reached the provider after the revoke"
        assert [line for line in lines if line["event"] == "cancel"] == [cancel]
    finally:
        for proc in started:
            _end(proc)
        ready.close()
        assert daemon.stop() == 0, daemon.output()

    # Read once the daemon has exited, so that every egress decision it made is committed.
    db = sqlite3.connect(os.path.join(daemon.state, "journal.db"))
    (source,) = db.execute("SELECT source FROM revocations WHERE run_id = ?", (run_id,)).fetchone()
    (dispatched,) = db.execute("SELECT count(*) FROM egress WHERE run_id = ? AND tool = 'send_email'"
                               " AND decision = 'dispatched'", (run_id,)).fetchone()
    (late,) = db.execute("SELECT count(*) FROM egress e JOIN revocations r USING (run_id) WHERE e.run_id = ?"
                         " AND e.decision = 'dispatched' AND e.t_ns > r.t_ns", (run_id,)).fetchone()
    db.close()
    assert source == "gateway"
    assert dispatched == len(calls), "every dispatched call reached the provider, and only those"
    assert late == 0, "a call was dispatched after the revoke"


FOLLOW = """
import { Client } from "./deadstop.mjs"
const c = new Client(undefined, { name: "follower" })
const stream = await c.events({ session: "feed" })
console.log(JSON.stringify({ subscribed: true }))
for await (const event of stream) {
  console.log(JSON.stringify(event))
  if (event.kind === "run.ended") break
}
stream.close()
await c.close()
"""


def test_node_follows_a_sessions_events_from_its_first(tmp_path, workspace) -> None:
    node = _need_node()
    script = os.path.join(EXAMPLES, f"follow-{os.getpid()}.mjs")  # beside deadstop.mjs, which it imports
    with open(script, "w") as f:
        f.write(FOLLOW)
    d = Daemon(tmp_path, CONFIG, workspace).start()
    follower = None
    try:
        err = str(tmp_path / "follower.err")
        follower = subprocess.Popen([node, script], cwd=EXAMPLES, env=d.env, stdout=subprocess.PIPE,
                                    stderr=open(err, "wb"))
        lines = Lines(follower, err)
        deadline = time.monotonic() + WAIT
        while not any(line.get("subscribed") for line in lines.seen) and not lines.eof \
                and lines._read(max(0.0, deadline - time.monotonic())):
            pass
        assert any(line.get("subscribed") for line in lines.seen), f"the Node subscriber never came up: {lines.stderr()}"
        with d.client() as c:
            c.send("feed", {"count": 20}, agent="emitter")
        while not any(line.get("kind") == "run.ended" for line in lines.seen) and not lines.eof \
                and lines._read(max(0.0, deadline - time.monotonic())):
            pass
        kinds = [line["kind"] for line in lines.seen if "kind" in line]
        assert kinds == ["session.message", "run.started"] + ["progress"] * 20 + ["run.ended"], kinds
        assert [line["seq"] for line in lines.seen if "kind" in line] == list(range(1, 24))
        assert follower.wait(WAIT) == 0
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
            follower.wait()
        os.unlink(script)
        assert d.stop() == 0, d.output()


STOP_ALL = """
import { Client } from "./deadstop.mjs"
const c = new Client(undefined, { name: "operator" })
console.log(JSON.stringify(await c.stopAll({ grace: 0.5 })))
await c.close()
"""


def test_node_stops_every_session_in_one_step(tmp_path, workspace, ready) -> None:
    node = _need_node()
    script = os.path.join(EXAMPLES, f"stop-all-{os.getpid()}.mjs")
    with open(script, "w") as f:
        f.write(STOP_ALL)
    d = Daemon(tmp_path, CONFIG, workspace).start()
    try:
        keys = [f"node-all-{i}" for i in range(3)]
        with d.client() as c:
            for key in keys:
                c.send(key, {"ready": ready.path}, agent="sleeper")
            ready.wait(len(keys))
            runs = [c.session(k).active_run for k in keys]
        assert all(marked_processes(r) for r in runs)
        out = subprocess.run([node, script], cwd=EXAMPLES, env=d.env, capture_output=True, text=True, timeout=WAIT)
        assert out.returncode == 0, out.stderr
        reply = json.loads(out.stdout)
        assert sorted(reply["sessions"]) == keys and sorted(reply["revoked"]) == sorted(runs)
        assert all(r["survivors"] == 0 for r in reply["reports"]) and len(reply["reports"]) == 3
        assert max(r["revoked_at"] for r in reply["reports"]) < min(r["term_sent_at"] for r in reply["reports"])
        assert {r: marked_processes(r) for r in runs} == {r: {} for r in runs}
    finally:
        os.unlink(script)
        assert d.stop() == 0, d.output()
