"""A proxied run's network: allowed and refused destinations through urllib, requests and curl to a
127.0.0.1 server of the test's own, no way around the proxy, and an upload cut at the revoke.

What reached the destination is counted by the destination (the test's server), never by deadstop.
"""

from __future__ import annotations

import fcntl
import http.server
import os
import socket
import sqlite3
import struct
import termios
import threading
import time

import pytest

import behaviours
from deadstop.supervisor import Proxy, Supervisor

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a proxied run needs a root spawner (its own netns)")


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = b"hello from 127.0.0.1"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hello():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(10)


def _rows(sup, run_id: str) -> list[tuple]:
    db = sqlite3.connect(sup.journal_path)
    try:
        return db.execute("SELECT t_ns, tool, decision, COALESCE(detail, '') FROM egress WHERE run_id=? AND verb='connect'"
                          " ORDER BY seq", (run_id,)).fetchall()
    finally:
        db.close()


def test_a_proxied_run_reaches_what_is_allowed_and_nothing_else(tmp_path, hello) -> None:
    url = f"http://127.0.0.1:{hello}/greeting"
    with Supervisor(state_dir=str(tmp_path / "state")) as sup:
        run = sup.start(behaviours.fetch_all, url, "http://10.9.8.7:8080/secret", ("127.0.0.1", hello),
                        network=Proxy(allow=[f"127.0.0.1:{hello}"]))
        out = run.result(60)
        assert out["urllib"] == out["requests"] == out["curl"] == "hello from 127.0.0.1", out
        assert out["refused"].startswith("403 10.9.8.7:8080 is not on this run's network allow-list"), out
        assert out["direct"].startswith(("ConnectionRefusedError", "OSError")), "no way around the proxy: " + out["direct"]
        rows = _rows(sup, run.id)
    allowed = [r for r in rows if r[2] == "dispatched"]
    assert len(allowed) == 3 and {r[1] for r in allowed} == {f"127.0.0.1:{hello}"}
    assert [r[1] for r in rows if r[2] == "refused"] == ["10.9.8.7:8080"]
    done = [r for r in rows if r[2] == "completed"]
    assert len(done) == 3 and all("received" in r[3] for r in done)


def test_a_run_revoked_while_it_starts_never_gets_its_network(tmp_path, monkeypatch) -> None:
    """stop_all while a proxied run is still starting: the request it already queued at its proxy never
    reaches the destination, and stop_all's reports include the run (stopped once attached)."""
    from waiting import Countdown, late_start_reply

    requests: list[str] = []

    class _Counting(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        with Supervisor(state_dir=str(tmp_path / "state")) as sup:
            ready = Countdown(1)
            sup.register_tool("ready", ready)
            channels = sup.core.broker.channels
            late_start_reply(sup, monkeypatch, bound=60,
                             until=lambda: any(c.revocation is not None for c in list(channels.values())))
            started: dict = {}
            starter = threading.Thread(target=lambda: started.setdefault("run", sup.start(
                behaviours.requests_through_the_proxy_then_sleeps, f"http://127.0.0.1:{port}/after-revoke",
                tools=["ready"], network=Proxy(allow=[f"127.0.0.1:{port}"]))))
            starter.start()
            assert ready.wait(60), "the run never sent its request"
            reports = sup.stop_all()
            starter.join(60)
            run = started["run"]
            assert [r.run_id for r in reports] == [run.id], reports
            assert reports[0].outcome == "stopped" and reports[0].survivors == 0, reports[0]
            assert reports[0].revoke_source == "api", reports[0]
            assert [r[2] for r in _rows(sup, run.id)] == [], "a connection of a revoked run was let through"
        time.sleep(0.5)  # anything let through would have reached the server by now
        assert requests == [], f"{requests} reached the destination after the run was revoked"
    finally:
        server.shutdown()
        server.server_close()


def test_a_proxy_needs_a_namespace_of_the_runs_own(tmp_path) -> None:
    from deadstop.supervisor.errors import InvalidTarget

    with Supervisor(state_dir=str(tmp_path / "state"), isolation="off") as sup:
        with pytest.raises(InvalidTarget, match="not isolated"):
            sup.start(behaviours.returns, 1, network=Proxy(allow=["example.org:443"]))
    with pytest.raises(ValueError, match="HOST"):
        Proxy(allow=["two words"])


def test_an_upload_is_cut_at_the_revoke_and_nothing_queued_arrives_after_it(tmp_path, workspace) -> None:
    sink = socket.create_server(("127.0.0.1", 0))
    port = sink.getsockname()[1]
    accepted: list[socket.socket] = []
    got = threading.Event()

    def accept() -> None:
        conn, _ = sink.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        accepted.append(conn)
        got.set()

    threading.Thread(target=accept, daemon=True).start()
    try:
        with Supervisor(state_dir=str(tmp_path / "state")) as sup:
            run = sup.start(behaviours.uploads_for_ever, f"http://127.0.0.1:{port}/upload", str(workspace),
                            network=Proxy(allow=[f"127.0.0.1:{port}"]), grace=0.5, cwd=str(workspace))
            assert got.wait(60)
            conn = accepted[0]
            # The destination reads nothing: the windows fill, and the proxy holds what the run queued.
            queued = _settled_backlog(conn)
            assert queued > 0
            report = run.stop()
            rows = _rows(sup, run.id)
        received = _drain(conn)
        sent_by_run = int(open(os.path.join(str(workspace), "sent")).read())
    finally:
        sink.close()
        for c in accepted:
            c.close()
    (cut,) = [r for r in rows if r[2] == "cut"]
    forwarded = int(cut[3].split("sent ", 1)[1].split(" bytes")[0])
    # Only what sat in the destination's own receive queue before the revoke was ever read there:
    # nothing the proxy or the kernel still held for it was delivered after.
    assert received <= queued, (received, queued)
    assert forwarded > received and sent_by_run > received, (forwarded, sent_by_run, received)
    assert cut[0] <= report.term_sent_at, "the connection was cut in the revoke's step, before SIGTERM"
    assert report.survivors == 0


def _backlog(conn: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(conn.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def _settled_backlog(conn: socket.socket, timeout: float = 30.0) -> int:
    """The destination's receive queue once it stops growing (the windows are full)."""
    deadline = time.monotonic() + timeout
    last, same = -1, 0
    while time.monotonic() < deadline and same < 5:
        now = _backlog(conn)
        same = same + 1 if now == last and now > 0 else 0
        last = now
        time.sleep(0.02)
    return last


def _drain(conn: socket.socket) -> int:
    conn.settimeout(10)
    total = 0
    try:
        while True:
            data = conn.recv(1 << 20)
            if not data:
                break
            total += len(data)
    except (ConnectionResetError, socket.timeout):
        pass
    return total


def test_the_daemon_proxies_an_agent_configured_so(tmp_path, workspace, hello, ready) -> None:
    import json

    from daemonctl import Daemon

    config = f"""
[agents.web]
target = "daemon_agents:fetcher"
cwd = "{{work}}"
network = {{ proxy = ["127.0.0.1:{hello}"] }}
"""
    d = Daemon(tmp_path, config, workspace).start()
    try:
        for key, url in (("ok", f"http://127.0.0.1:{hello}/x"), ("no", "http://10.9.8.7/")):
            assert d.cli("sessions", "send", key, json.dumps({"ready": ready.path, "url": url}),
                         "--agent", "web").returncode == 0
        lines = {line["session"]: line for line in ready.wait(2)}
        assert lines["ok"]["ok"] and lines["ok"]["body"] == "hello from 127.0.0.1"
        assert lines["no"] == {**lines["no"], "ok": False, "status": 403}
    finally:
        assert d.stop() == 0
