"""The daemon's cost: a stop through the RPC beside the same stop through the library, in the same run.

    python benchmarks/daemon_latency.py            # 30 trials per figure, about a minute
    python benchmarks/daemon_latency.py --quick    # 10 trials, smoke run
    python benchmarks/daemon_latency.py --json out.json

Figures (p50/p99 over independent trials, each beside its floor; the table
and helpers are kill_latency's):

rpc stop     A real `deadstop serve` process; a session whose run idles.
             t0 = the client's clock before Client.stop(key); end = the reply
             with the report in hand. Floor: the same stop of an equal
             session through the library (Supervisor, in this process), t0 ->
             stop() returned. Target: floor + 0.5 ms.
cli stop     `deadstop sessions stop KEY` as a subprocess, wall time to its
             exit, against the same stop through the RPC client. No target:
             it is an interpreter start plus the RPC.
cli list     `deadstop sessions list` with 100 sessions, wall time, beside a
             bare `python -c "import argparse"`. Target: <= 150 ms.
events       A run emits 20,000 events back to back (pipelined aemit); a
             subscriber counts them. Rate from the first to the last one
             received. Target: >= 10,000 events/s.
rpc+console  The rpc stop figure again, on a daemon serving its console with
             a page following its feed. Floor: rpc stop. Target: + 0.5 ms.
console stop The web console's button path: POST /api/call/sessions.stop on a
             kept-alive HTTP connection with the session cookie and CSRF
             token, t0 -> the reply with the report. Floor: rpc+console.
             Target: + 2 ms.
console shows A stop through the RPC, t0 before the call -> the console's
             live feed (server-sent events, read by this process) delivers
             the row with the session idle. Floor: rpc+console.
             Target: + 150 ms (the feed coalesces a burst for 50 ms,
             then reads the row with sessions.show).
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._procs import ReadyChannel
from benchmarks._stats import Dist, Row, latency_row
from benchmarks.kill_latency import MS, arg_parser, log, run, trial_count

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RPC_MARGIN_NS = 0.5 * MS
CONSOLE_MARGIN_NS = 2 * MS
SHOWN_MARGIN_NS = 150 * MS
LIST_SESSIONS = 100
EVENTS = 20_000

CONFIG = """
[defaults]
grace = 1.0

[agents.sleeper]
target = "benchmarks._daemon_targets:sleeper"
cwd = "{work}"

[agents.echo]
target = "benchmarks._daemon_targets:echo"
cwd = "{work}"

[agents.emitter]
target = "benchmarks._daemon_targets:emitter"
cwd = "{work}"
"""


@dataclasses.dataclass
class Config:
    trials: int
    cli_trials: int
    settle: float


def _workdir() -> str:
    work = tempfile.mkdtemp(prefix="ds-bench-work-")
    os.chmod(work, 0o777)  # the runs' own uids work in it
    return work


def library_stops(cfg: Config, chan: ReadyChannel, work: str) -> list[int]:
    from benchmarks._daemon_targets import sleeper
    from deadstop.supervisor import Supervisor

    out = []
    with Supervisor() as sup:
        sup.register_agent("sleeper", sleeper, cwd=work)
        for i in range(cfg.trials):
            s = sup.session(f"lib-{i}", "sleeper")
            s.send({"ready": chan.path, "tag": f"lib-{i}"})
            chan.wait(1)
            time.sleep(cfg.settle)
            t0 = time.monotonic_ns()
            reports = s.stop()
            out.append(time.monotonic_ns() - t0)
            assert reports and reports[0].survivors == 0, reports
    return out


class DaemonProcess:
    def __init__(self, work: str, console: bool = False):
        self.dir = tempfile.mkdtemp(prefix="ds-bench-daemon-")
        self.runtime = os.path.join(self.dir, "run")
        config = os.path.join(self.dir, "deadstop.toml")
        with open(config, "w") as f:
            f.write(CONFIG.replace("{work}", work))
        self.env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    "DEADSTOP_DAEMON": self.runtime}
        self.proc = subprocess.Popen([sys.executable, "-m", "deadstop.supervisor", "serve", "--config", config,
                                      "--state-dir", os.path.join(self.dir, "state"), "--runtime-dir", self.runtime,
                                      *(["--console", "127.0.0.1:0"] if console else ["--no-console"])],
                                     env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        path = os.path.join(self.runtime, "daemon.json")
        while time.monotonic() < deadline:
            try:
                with open(path) as f:
                    if json.load(f)["pid"] == self.proc.pid:
                        return
            except (OSError, ValueError, KeyError):
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.proc.returncode}")
            time.sleep(0.02)
        raise RuntimeError("the daemon did not start within 60 s")

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(60)


def timed_stops(cfg: Config, chan: ReadyChannel, client: Any, prefix: str,
                stop: Callable[[str], list[dict[str, Any]]]) -> list[int]:
    """cfg.trials sessions started through the RPC, each ended by `stop(key)` (-> its reports), timed."""
    out = []
    for i in range(cfg.trials):
        key = f"{prefix}-{i}"
        client.send(key, {"ready": chan.path, "tag": key}, agent="sleeper")
        chan.wait(1)
        time.sleep(cfg.settle)
        t0 = time.monotonic_ns()
        reports = stop(key)
        out.append(time.monotonic_ns() - t0)
        assert reports and reports[0]["survivors"] == 0, reports
    return out


def rpc_stops(cfg: Config, chan: ReadyChannel, client: Any) -> list[int]:
    return timed_stops(cfg, chan, client, "rpc", lambda key: client.stop(key).reports)


def cli_stops(cfg: Config, chan: ReadyChannel, client: Any, env: dict[str, str]) -> list[int]:
    out = []
    for i in range(cfg.cli_trials):
        client.send(f"cli-{i}", {"ready": chan.path, "tag": f"cli-{i}"}, agent="sleeper")
        chan.wait(1)
        t0 = time.monotonic_ns()
        done = subprocess.run([sys.executable, "-m", "deadstop.supervisor", "sessions", "stop", f"cli-{i}"], env=env,
                              capture_output=True, timeout=60)
        out.append(time.monotonic_ns() - t0)
        assert done.returncode == 0, done.stderr
    return out


class ConsoleSession:
    """A logged-in console session over plain HTTP: a kept-alive connection for POSTs, one for the feed."""

    def __init__(self, runtime: str):
        with open(os.path.join(runtime, "daemon.json")) as f:
            info = json.load(f)
        url = urllib.parse.urlsplit(info["console"])
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        conn.request("GET", urllib.parse.urlsplit(info["console_login"]).path + "?" +
                     urllib.parse.urlsplit(info["console_login"]).query)
        response = conn.getresponse()
        response.read()
        self.cookie = response.getheader("Set-Cookie", "").split(";", 1)[0]
        conn.request("GET", "/", headers={"Cookie": self.cookie})
        page = conn.getresponse().read().decode()
        match = re.search(r'name="csrf-token" content="([^"]+)"', page)
        assert match, "no CSRF token on the sessions page"
        self.csrf = match.group(1)
        self.conn = conn
        self.rows: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
        self._feed = http.client.HTTPConnection(self.host, self.port, timeout=120)
        self._feed.request("GET", "/api/events", headers={"Cookie": self.cookie})
        self._stream = self._feed.getresponse()
        threading.Thread(target=self._read_feed, daemon=True).start()

    def _read_feed(self) -> None:
        kind = ""
        try:
            for raw in self._stream:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: ") and kind == "row":
                    self.rows.put((time.monotonic_ns(), json.loads(line[6:])))
        except Exception:  # closed under us at the end of the run
            return

    def stop(self, key: str) -> dict[str, Any]:
        self.conn.request("POST", "/api/call/sessions.stop", body=json.dumps({"key": key}),
                          headers={"Cookie": self.cookie, "X-CSRF-Token": self.csrf, "Content-Type": "application/json"})
        return json.loads(self.conn.getresponse().read())

    def close(self) -> None:
        self.conn.close()
        self._feed.close()


def console_stops(cfg: Config, chan: ReadyChannel, client: Any, console: ConsoleSession) -> list[int]:
    def stop(key: str) -> list[dict[str, Any]]:
        reply = console.stop(key)
        assert reply["ok"], reply
        return reply["result"]["reports"]

    return timed_stops(cfg, chan, client, "web", stop)


def console_shows(cfg: Config, chan: ReadyChannel, client: Any, console: ConsoleSession) -> list[int]:
    """RPC stop, then the feed's row saying the session is idle: from before the call to that row."""
    out = []
    for i in range(cfg.trials):
        key = f"shown-{i}"
        client.send(key, {"ready": chan.path, "tag": key}, agent="sleeper")
        chan.wait(1)
        time.sleep(cfg.settle)
        while not console.rows.empty():
            console.rows.get_nowait()
        t0 = time.monotonic_ns()
        client.stop(key)
        while True:
            at, row = console.rows.get(timeout=30)
            if row["key"] == key and row["state"] == "idle":
                out.append(at - t0)
                break
    return out


def timed(argv: list[str], env: dict[str, str], trials: int) -> list[int]:
    out = []
    for _ in range(trials):
        t0 = time.monotonic_ns()
        done = subprocess.run(argv, env=env, capture_output=True, timeout=60)
        out.append(time.monotonic_ns() - t0)
        assert done.returncode == 0, done.stderr
    return out


def event_rate(client: Any) -> tuple[float, int]:
    """Events/s from the first to the last event received, and how many arrived."""
    with client.events(idle_timeout=10) as stream:
        client.send("emitter", {"count": EVENTS}, agent="emitter")
        first = last = 0
        got = 0
        for event in stream:
            if event.kind != "tick":
                if event.kind == "run.ended":
                    break
                continue
            last = time.monotonic_ns()
            first = first or last
            got += 1
            if got == EVENTS:
                break
    return (got - 1) * 1e9 / max(1, last - first), got


def measure(cfg: Config, chan: ReadyChannel) -> list[Row]:
    from deadstop.supervisor.client import Client

    work = _workdir()
    log(f"library: {cfg.trials} session stops through Supervisor")
    lib = Dist(library_stops(cfg, chan, work))
    log("daemon: starting `deadstop serve`")
    daemon = DaemonProcess(work)
    try:
        with Client(daemon.runtime, name="bench") as client:
            log(f"daemon: {cfg.trials} session stops through the RPC")
            rpc = Dist(rpc_stops(cfg, chan, client))
            log(f"daemon: {cfg.cli_trials} `deadstop sessions stop` runs")
            cli = Dist(cli_stops(cfg, chan, client, daemon.env))
            log(f"daemon: {LIST_SESSIONS} sessions, then `deadstop sessions list`")
            for i in range(LIST_SESSIONS):
                client.send(f"list-{i}", i, agent="echo")
            listing = Dist(timed([sys.executable, "-m", "deadstop.supervisor", "sessions", "list"], daemon.env,
                                 cfg.cli_trials))
            floor = Dist(timed([sys.executable, "-c", "import argparse"], daemon.env, cfg.cli_trials))
            log(f"daemon: {EVENTS:,} events through the stream")
            rate, got = event_rate(client)
    finally:
        status = daemon.stop()
    log("daemon with its web console: starting `deadstop serve --console`")
    daemon = DaemonProcess(work, console=True)
    try:
        with Client(daemon.runtime, name="bench") as client:
            console = ConsoleSession(daemon.runtime)
            try:
                log(f"console: {cfg.trials} RPC stops with a console logged in and following")
                beside = Dist(rpc_stops(cfg, chan, client))
                log(f"console: {cfg.trials} stops through its HTTP button path, {cfg.trials} stops seen on its feed")
                web = Dist(console_stops(cfg, chan, client, console))
                shown = Dist(console_shows(cfg, chan, client, console))
            finally:
                console.close()
    finally:
        daemon.stop()
    section = "deadstop serve (a real daemon process, ipc://)"
    rows = [
        latency_row("floors, measured in this run", "session stop through the library (Supervisor)", lib),
        latency_row("floors, measured in this run", "python -c 'import argparse'", floor),
        latency_row(section, "session stop through the RPC (client call -> report)", rpc, lib, "library",
                    "<= library + 0.5 ms", lib.p(50) + RPC_MARGIN_NS),
        latency_row(section, "`deadstop sessions stop KEY` (wall)", cli, rpc, "RPC"),
        latency_row(section, f"`deadstop sessions list`, {LIST_SESSIONS} sessions (wall)", listing, floor,
                    "python + argparse", "<= 150 ms", 150 * MS),
        Row(section, f"event stream, {EVENTS:,} events back to back", "calls/s", rate, rate, 1, target=">= 10,000/s",
            limit=10_000, higher_is_better=True, note=f"{got:,} received; daemon exit status {status}"),
    ]
    section = "deadstop serve --console (its web console on its own thread, a page following)"
    rows += [
        latency_row(section, "session stop through the RPC, console attached", beside, rpc, "RPC, no console",
                    "<= RPC + 0.5 ms", rpc.p(50) + RPC_MARGIN_NS),
        latency_row(section, "console Stop (HTTP POST -> the daemon's report)", web, beside, "RPC", "<= RPC + 2 ms",
                    beside.p(50) + CONSOLE_MARGIN_NS),
        latency_row(section, "a stop shown by the console's live feed (RPC stop -> SSE row idle)", shown, beside, "RPC",
                    "<= RPC + 150 ms", beside.p(50) + SHOWN_MARGIN_NS),
    ]
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return arg_parser(__doc__, 30).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    trials = trial_count(args)
    cfg = Config(trials=trials, cli_trials=max(5, trials // 3), settle=0.02)

    def measure_all(chan: ReadyChannel) -> tuple[list[Row], str]:
        return measure(cfg, chan), ""

    return run(cfg, args.json, measure_all)


if __name__ == "__main__":
    sys.exit(main())
