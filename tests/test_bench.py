"""`deadstop bench` measuring a user's own agent, run as a user runs it: the command in a subprocess,
against agent modules written here, from the agent's directory. The JSON it writes is checked
against evidence the agents leave themselves (one file per process they start, in a shared
working directory), not only against what the bench says of itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import psutil
import pytest

AGENTS = textwrap.dedent('''
    import os, signal, time

    def _mark(tag):
        with open(f"{tag}-{os.getpid()}", "w") as f:
            f.write(str(os.getpid()))

    def stubborn():
        """Ignores SIGTERM and forks three children that ignore it too: only SIGKILL of all of them ends it."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _mark("leader")
        for _ in range(3):
            if os.fork() == 0:
                _mark("child")
                while True:
                    time.sleep(0.05)
        while True:
            time.sleep(0.05)

    def caller():
        """Calls the `ping` tool in a loop, and keeps trying once it is refused."""
        from deadstop.worker import egress
        _mark("leader")
        while True:
            try:
                egress.call("ping", n=1)
            except Exception:
                time.sleep(0.001)

    async def handler(n):
        """Async, so the revoke cancels it at its next await: no effect can start after the revoke."""
        return n + 1

    NOT_CALLABLE = 42
''')

TRIALS = 3
WARMUPS = 2  # one stop and one kill that the bench leaves out of its figures


@pytest.fixture
def agent_dir(tmp_path, workspace):
    (tmp_path / "bench_agents.py").write_text(AGENTS)
    return tmp_path


def bench(cwd, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-m", "deadstop.supervisor", "bench", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def marks(workspace, tag: str) -> dict[int, float]:
    """pid -> when it wrote its mark, for each process of the agent that wrote one."""
    return {int(p.name.split("-")[1]): p.stat().st_mtime for p in workspace.iterdir() if p.name.startswith(tag + "-")}


def still_alive(pid: int, marked_at: float) -> bool:
    """The process that wrote the mark is alive (not a zombie, and not a later process given the same pid)."""
    try:
        proc = psutil.Process(pid)
        return proc.create_time() <= marked_at and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def check_common(doc: dict, trials: int) -> None:
    assert doc["trials"] == trials
    verbs = [r["verb"] for r in doc["runs"]]
    assert verbs.count("stop") == trials and verbs.count("kill") == trials, verbs
    assert doc["survivors"] == {"reported": 0, "counted": 0}
    assert all(r["survivors_reported"] == 0 and r["survivors_counted"] == 0 for r in doc["runs"])
    stop = doc["summary"]["stop"]
    assert stop["n"] == trials and 0 < stop["p50"] <= stop["max"], stop
    assert doc["summary"]["kill"]["n"] == trials
    assert set(doc["after_revoke"]) >= {"refused_after_revoke", "handlers_cancelled", "handlers_outlived_revoke",
                                        "late_effects", "tool_calls"}
    names = {r["name"] for r in doc["rows"]}
    assert {"stop() -> reaped_at", "kill() -> reaped_at", "kill(SIGTERM)+waitpid, 1 idle forked child",
            "killpg(SIGKILL)+reap all, 40-tree"} <= names, names


def test_a_stubborn_forking_agent_is_measured_and_nothing_of_it_survives(agent_dir, workspace) -> None:
    out = agent_dir / "out.json"
    done = bench(agent_dir, "--quick", "--target", "bench_agents:stubborn", "--trials", str(TRIALS),
                 "--grace", "0.2", "--cwd", str(workspace), "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out.read_text())
    check_common(doc, TRIALS)
    # The agents' own evidence: every run the bench started (measured or warm-up) left a leader mark,
    # and each leader three children; none of those processes is alive now.
    leaders, children = marks(workspace, "leader"), marks(workspace, "child")
    assert len(leaders) == 2 * TRIALS + WARMUPS, leaders
    assert len(children) == 3 * len(leaders), children
    alive = [pid for pid, at in {**leaders, **children}.items() if still_alive(pid, at)]
    assert alive == [], alive
    for run in doc["runs"]:
        assert run["processes"] == 4, run
        assert not run["ended_before_stop"]
    stops = [r for r in doc["runs"] if r["verb"] == "stop"]
    assert all(r["ended_by"] == "sigkill" for r in stops), stops  # SIGTERM was ignored for the whole grace
    assert all(r["end"] >= 0.2e9 for r in stops)
    assert "stop() minus grace 0.2s, runs SIGKILLed after it" in done.stdout
    assert "survivors: 0 by the stop reports, 0 counted independently" in done.stdout


def test_a_tool_calling_agent_is_refused_after_its_revoke(agent_dir, workspace) -> None:
    out = agent_dir / "out.json"
    done = bench(agent_dir, "--quick", "--target", "bench_agents:caller", "--tool", "ping=bench_agents:handler",
                 "--trials", str(TRIALS), "--cwd", str(workspace), "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out.read_text())
    check_common(doc, TRIALS)
    after = doc["after_revoke"]
    assert after["tool_calls"] > 0 and after["late_effects"] == 0, after
    assert all(r["tool_calls"] > 0 for r in doc["runs"]), doc["runs"]
    assert doc["summary"]["start"]["n"] == 2 * TRIALS  # the agent's first line, timed in the run
    assert len(marks(workspace, "leader")) == 2 * TRIALS + WARMUPS


def test_a_command_that_ignores_sigterm(tmp_path) -> None:
    out = tmp_path / "out.json"
    done = bench(tmp_path, "--quick", "--trials", "2", "--grace", "0.2", "--json", str(out),
                 "--argv", "sh", "-c", 'trap "" TERM; sleep 100')
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out.read_text())
    check_common(doc, 2)
    assert doc["kind"] == "argv" and doc["target"] == 'sh -c trap "" TERM; sleep 100'
    assert all(r["ended_by"] == "sigkill" for r in doc["runs"])
    assert "start" not in doc["summary"]  # a command has no first line to time; start() returning is timed
    assert doc["summary"]["start_returned"]["n"] == 4


def test_plot_writes_a_png(agent_dir) -> None:
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the `plot` extra, in `test` too)")
    png = agent_dir / "cdf.png"
    done = bench(agent_dir, "--quick", "--trials", "2", "--plot", str(png), "--argv", "sleep", "100")
    assert done.returncode == 0, done.stderr[-3000:]
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("spec, says", [
    ("no_such_module_here:fn", "no module named 'no_such_module_here'"),
    ("bench_agents:missing", "has no attribute 'missing'"),
    ("bench_agents:NOT_CALLABLE", "is not callable"),
    ("bench_agents", "expected MODULE:ATTR"),
])
def test_a_bad_target_is_a_usage_error(agent_dir, spec: str, says: str) -> None:
    done = bench(agent_dir, "--quick", "--target", spec, timeout=60)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert says in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.stdout == ""


def test_a_missing_command_is_a_usage_error(tmp_path) -> None:
    done = bench(tmp_path, "--argv", "no-such-command-here", timeout=60)
    assert done.returncode == 2 and "not found" in done.stderr, done.stderr
