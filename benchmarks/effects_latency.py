"""What the gate costs: MCP tools, the network proxy and isolated tools, each beside its direct floor.

    python benchmarks/effects_latency.py            # 30 trials per figure, about half a minute
    python benchmarks/effects_latency.py --quick    # 10 trials, smoke run
    python benchmarks/effects_latency.py --json out.json

Figures (p50/p99 over trials; every floor measured in the same run, on the
same servers, which run in processes of their own):

mcp call     A run calls `faults.echo` of the tests' MCP server through
             deadstop, timed in the run (send -> reply). Floor: the same call
             by an MCP client session (the official SDK) of this process,
             straight to a second instance of the same server. Target: floor
             + 2 ms.
proxied GET  A proxied run GETs a small file from a 127.0.0.1 http.server,
             a new connection each time, timed in the run. Floor: the same GET
             straight from this process. Target: floor + 3 ms.
proxied MB/s A proxied run downloads a 64 MiB file through the proxy. Floor:
             this process downloading it straight. Target: >= 0.5x floor.
cut          A proxied run holds 20 CONNECT tunnels to a TCP sink; t0 before
             stop(), end = the sink seeing the last of them closed. Floor:
             the same stop() returning. Target: every tunnel closed before
             stop() returns (<= floor).
isolated     A run calls a no-op tool registered isolated=True (a helper run
             per call). Floor: the same no-op as an in-process sync tool.
             No target: it is a run start per call, reported so users can
             choose.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import http.client
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._procs import ReadyChannel
from benchmarks._stats import Dist, Row, latency_row
from benchmarks.kill_latency import MS, arg_parser, log, run, trial_count

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULTS = [sys.executable, os.path.join(REPO, "tests", "mcp_servers", "faults.py")]
DOWNLOAD_BYTES = 64 << 20
TUNNELS = 20


@dataclasses.dataclass
class Config:
    trials: int


class Process:
    """A helper server in a process of its own; `first` is its first line of output."""

    def __init__(self, argv: list[str], cwd: str | None = None):
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.first = self.proc.stdout.readline().strip() if self.proc.stdout else ""

    def lines(self) -> Any:
        assert self.proc.stdout is not None
        return self.proc.stdout

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _http_server(directory: str) -> tuple[Process, int]:
    import socket

    with socket.socket() as s:  # a free port, then handed to http.server
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Process([sys.executable, "-u", "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                      directory])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/hello.txt")
            conn.getresponse().read()
            return server, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("http.server did not come up")


def direct_gets(port: int, n: int) -> list[int]:
    out = []
    for _ in range(n):
        t0 = time.monotonic_ns()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/hello.txt")
        conn.getresponse().read()
        conn.close()
        out.append(time.monotonic_ns() - t0)
    return out


def direct_download(port: int) -> tuple[int, int]:
    from benchmarks._effect_targets import download

    size, ns = download("127.0.0.1", port, "/big.bin")
    return size, ns


def direct_mcp(n: int) -> list[int]:
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    async def main() -> list[int]:
        out = []
        params = StdioServerParameters(command=FAULTS[0], args=FAULTS[1:])
        with open(os.devnull, "w") as quiet:
            async with stdio_client(params, errlog=quiet) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    await session.call_tool("echo", {"text": "x"})  # warm, as the run's first call is below
                    for _ in range(n):
                        t0 = time.monotonic_ns()
                        await session.call_tool("echo", {"text": "x"})
                        out.append(time.monotonic_ns() - t0)
        return out

    return asyncio.run(main())


def cut_trials(sup: Any, chan: ReadyChannel, trials: int) -> tuple[list[int], list[int]]:
    """(t0 -> last tunnel closed at the sink, t0 -> stop() returned), per trial."""
    from benchmarks import _effect_targets as targets
    from deadstop.supervisor import Proxy

    sink = Process([sys.executable, "-u", os.path.join(REPO, "benchmarks", "_sink.py")])
    port = int(sink.first.split()[1])
    closed, stops = [], []
    try:
        lines = sink.lines()
        for _ in range(trials):
            r = sup.start(targets.holds_tunnels, "127.0.0.1", port, TUNNELS, chan.path,
                          network=Proxy(allow=[f"127.0.0.1:{port}"]), grace=0.2)
            chan.wait(1)
            opened = 0
            while opened < TUNNELS:  # the sink has them all
                opened += lines.readline().startswith("open")
            t0 = time.monotonic_ns()
            report = r.stop()
            stops.append(time.monotonic_ns() - t0)
            assert report.survivors == 0
            last, seen = 0, 0
            while seen < TUNNELS:
                word, _peer, at = lines.readline().split()
                if word == "closed":
                    seen += 1
                    last = max(last, int(at))
            closed.append(last - t0)
    finally:
        sink.stop()
    return closed, stops


def noop() -> None:
    return None


def measure(cfg: Config, chan: ReadyChannel) -> list[Row]:
    from benchmarks import _effect_targets as targets
    from deadstop.supervisor import Proxy, Supervisor

    n = cfg.trials
    web = tempfile.mkdtemp(prefix="ds-bench-web-")
    with open(os.path.join(web, "hello.txt"), "w") as f:
        f.write("hello")
    with open(os.path.join(web, "big.bin"), "wb") as f:
        f.write(os.urandom(1 << 20) * (DOWNLOAD_BYTES >> 20))
    server, port = _http_server(web)
    rows: list[Row] = []
    try:
        log(f"floors: {n} direct MCP calls, {n} direct GETs, a direct {DOWNLOAD_BYTES >> 20} MiB download")
        mcp_floor = Dist(direct_mcp(n))
        get_floor = Dist(direct_gets(port, n))
        size, ns = direct_download(port)
        direct_rate = size / ns * 1e9 / (1 << 20)
        with Supervisor() as sup:
            sup.register_mcp_server("faults", FAULTS)
            sup.register_tool("noop", noop)
            sup.register_tool("noop_isolated", noop, isolated=True)
            log(f"deadstop: {n} MCP calls from a run")
            mcp = Dist(sup.start(targets.timed_calls, "faults.echo", n + 1, {"text": "x"},
                                 tools=["faults.echo"]).result(120)[1:])
            proxy = Proxy(allow=[f"127.0.0.1:{port}"])
            log(f"deadstop: {n} proxied GETs, a proxied {DOWNLOAD_BYTES >> 20} MiB download")
            gets = Dist(sup.start(targets.proxied_gets, f"http://127.0.0.1:{port}/hello.txt", n + 1,
                                  network=proxy).result(120)[1:])
            got, took = sup.start(targets.proxied_download, f"http://127.0.0.1:{port}/big.bin", network=proxy).result(300)
            assert got == size, (got, size)
            proxied_rate = got / took * 1e9 / (1 << 20)
            log(f"deadstop: {n} stops of a run holding {TUNNELS} tunnels")
            closed, stops = cut_trials(sup, chan, n)
            log(f"deadstop: {n} isolated and {n} in-process no-op tool calls")
            inproc = Dist(sup.start(targets.timed_calls, "noop", n + 1, {}, tools=["noop"]).result(120)[1:])
            isolated = Dist(sup.start(targets.timed_calls, "noop_isolated", n + 1, {},
                                      tools=["noop_isolated"]).result(300)[1:])
    finally:
        server.stop()
    section = "through the gate (a run's call or request, timed in the run)"
    stop = Dist(stops)
    rows += [
        latency_row("floors, measured in this run", "MCP call straight to the server (SDK client session)", mcp_floor),
        latency_row("floors, measured in this run", "GET straight to 127.0.0.1 (a new connection)", get_floor),
        Row("floors, measured in this run", f"{DOWNLOAD_BYTES >> 20} MiB download straight", "MiB/s", direct_rate,
            direct_rate, 1, higher_is_better=True),
        latency_row(section, "MCP tool call (faults.echo) through deadstop", mcp, mcp_floor, "direct MCP",
                    "<= direct + 2 ms", mcp_floor.p(50) + 2 * MS),
        latency_row(section, "GET through the run's proxy", gets, get_floor, "direct GET", "<= direct + 3 ms",
                    get_floor.p(50) + 3 * MS),
        Row(section, f"{DOWNLOAD_BYTES >> 20} MiB download through the run's proxy", "MiB/s", proxied_rate,
            proxied_rate, 1, "direct", direct_rate, ">= 0.5x direct", direct_rate * 0.5, True),
        latency_row(section, f"stop() -> the last of {TUNNELS} proxied tunnels closed at the sink", Dist(closed), stop,
                    "stop() returned", "<= stop() returned", stop.p(50)),
        latency_row(section, "isolated tool call (a helper run per call), no-op", isolated, inproc,
                    "in-process sync tool"),
        latency_row(section, "in-process sync tool call, no-op", inproc),
    ]
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return arg_parser(__doc__, 30).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = Config(trials=trial_count(args))

    def measure_all(chan: ReadyChannel) -> tuple[list[Row], str]:
        return measure(cfg, chan), ""

    return run(cfg, args.json, measure_all)


if __name__ == "__main__":
    sys.exit(main())
