"""A real `deadstop serve` process for the daemon tests, the CLI through subprocess, and readiness FIFOs."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
START_WAIT = 60.0
#: The smallest daemon config the tests use: a short grace and one agent that sleeps until stopped.
#: Tests that need more agents add their sections after it.
SLEEPER_CONFIG = """
[defaults]
grace = 0.5

[agents.sleeper]
target = "daemon_agents:sleeper"
cwd = "{work}"
"""


class Ready:
    """A FIFO agents write a JSON line to when they are up (see daemon_agents._ready)."""

    def __init__(self, directory) -> None:
        self.path = os.path.join(str(directory), f"ready-{os.getpid()}-{time.monotonic_ns()}")
        os.mkfifo(self.path, 0o666)
        os.chmod(self.path, 0o666)  # a run with its own uid writes it
        self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self._keep = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)  # no EOF between writers
        self._buf = b""

    def wait(self, n: int = 1, timeout: float = 60.0) -> list[dict]:
        """The next n lines, waited for on the FIFO (select), at most `timeout` seconds in all."""
        out: list[dict] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            while b"\n" in self._buf and len(out) < n:
                line, self._buf = self._buf.split(b"\n", 1)
                out.append(json.loads(line))
            if len(out) >= n:
                break
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._fd], [], [], left)[0]:
                raise AssertionError(f"only {len(out)} of {n} agents said they were up within {timeout:g} s")
            self._buf += os.read(self._fd, 65536)
        return out

    def close(self) -> None:
        os.close(self._fd)
        os.close(self._keep)


class Daemon:
    """`deadstop serve` in its own process, on its own runtime and state directories."""

    def __init__(self, tmp_path, config: str, workspace=None) -> None:
        self.dir = tmp_path
        self.runtime = str(tmp_path / "run")
        self.state = str(tmp_path / "state")
        self.config = str(tmp_path / "deadstop.toml")
        text = textwrap.dedent(config).replace("{work}", str(workspace or tmp_path))
        with open(self.config, "w") as f:
            f.write(text)
        self.env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    "DEADSTOP_DAEMON": self.runtime}
        self.proc: subprocess.Popen | None = None

    def start(self, *extra: str, default_layout: bool = False) -> "Daemon":
        """default_layout: no --runtime-dir; $XDG_RUNTIME_DIR (a directory of the test's) decides,
        and clients find the daemon at the well-known path, with no $DEADSTOP_DAEMON.
        No web console unless `extra` asks for one (--console ...)."""
        where = ["--runtime-dir", self.runtime]
        if not any(arg.startswith("--console") for arg in extra):
            extra = (*extra, "--no-console")
        if default_layout:
            xdg = self.dir / "xdg"
            xdg.mkdir(exist_ok=True)
            self.env = {**self.env, "XDG_RUNTIME_DIR": str(xdg)}
            self.env.pop("DEADSTOP_DAEMON", None)
            self.runtime, where = str(xdg / "deadstop" / "daemon"), []
        self.log = open(self.dir / f"daemon-{time.monotonic_ns()}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "deadstop.supervisor", "serve", "--config", self.config,
                                      "--state-dir", self.state, *where, *extra],
                                     env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        path = os.path.join(self.runtime, "daemon.json")
        deadline = time.monotonic() + START_WAIT
        while time.monotonic() < deadline:  # bounded: the daemon announces itself by this file
            if self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited with {self.proc.returncode}: {self.output()}")
            try:
                with open(path) as f:
                    if json.load(f)["pid"] == self.proc.pid:
                        return self
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.02)
        raise AssertionError(f"the daemon did not announce itself within {START_WAIT:g} s: {self.output()}")

    def connection(self) -> dict:
        with open(os.path.join(self.runtime, "daemon.json")) as f:
            return json.load(f)

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name, "rb") as f:
            return f.read().decode(errors="replace")[-4000:]

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "deadstop.supervisor", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def cli_json(self, *args: str) -> object:
        out = self.cli(*args, "--json")
        assert out.returncode == 0, (args, out.returncode, out.stdout, out.stderr)
        return json.loads(out.stdout)

    def client(self, **options):
        from deadstop.supervisor.client import Client

        return Client(self.runtime, **options)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, and its exit status (it stops every run first)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
