"""The hostile matrix: runs that fight the stop, on real processes.

Each attack is a run target in tests/hostile_agents.py that records what its
attempts got and then keeps writing timestamped lines from every process it
made. Each test asserts the promise, checked independently of deadstop where
it can be:

* no line was written after stop() returned, and the file stops growing;
* no process with the run's uid is alive (a /proc scan of our own);
* the report is true (0 survivors only when the scan agrees);
* bystander runs are untouched;
* the attempts were refused by the kernel.

These need root (per-run identities); without it they are skipped, and
test_non_root shows what a non-root supervisor names instead.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import sqlite3
import threading
import time

import pytest

import hostile_agents as H
from deadstop.supervisor import Supervisor
from deadstop.supervisor.mechanisms.cgroups import find_cgroup2_mount


async def _value(fn):
    """Run `fn` on the supervisor's loop thread (where the journal lives)."""
    return fn()

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="per-run identities need root")

DENIED = {"EPERM", "EACCES", "ESRCH", "ENOENT", "EBUSY", "EROFS", "ENXIO"}


def _uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Uid:"))


def _pids_of_uid(uid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in lines if ":" in line)
        if int(fields["Uid"].split()[0]) == uid and fields["State"].split()[0] not in ("Z", "X"):
            out.append(int(entry))
    return out


def _attempts(cwd) -> dict:
    return json.loads((cwd / "attempts.json").read_text())


def _assert_silent_after(cwd, returned_at: int) -> None:
    """No line written after stop() returned, and none appears later."""
    log = cwd / "alive.log"
    if not log.exists():
        return
    stamps = [int(line.split()[1]) for line in log.read_text().splitlines() if len(line.split()) == 2]
    assert all(t < returned_at for t in stamps), "a process of the run wrote after stop() returned"
    size = log.stat().st_size
    time.sleep(0.3)  # anything alive writes every 5 ms
    assert log.stat().st_size == size, "the run's log kept growing after stop() returned"


def _wait_writers(cwd, tags: set[str], timeout: float = 20.0) -> None:
    """Until every process named in `tags` has proven it is alive in alive.log (bounded)."""
    log = cwd / "alive.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and tags <= {line.split()[0] for line in log.read_text().splitlines() if line.strip()}:
            return
        time.sleep(0.01)
    raise AssertionError(f"not every attacker process wrote to {log}: wanted {tags}")


def _stop_and_check(sup: Supervisor, run, cwd, verb: str = "stop"):
    uid = _uid_of(run.pid)
    assert uid != 0 and uid != os.getuid(), "the run must have its own identity"
    report = getattr(run, verb)()
    returned_at = time.monotonic_ns()
    alive = _pids_of_uid(uid)
    assert alive == [], f"processes of the run outlived stop(): {alive}"
    assert report.survivors == 0
    _assert_silent_after(cwd, returned_at)
    return report


@pytest.fixture
def ready_sup(tmp_path):
    """A supervisor with a `ready` tool, its state kept apart from the runs' workspace."""
    state = tmp_path / "state"
    work = tmp_path / "work"
    state.mkdir()
    work.mkdir()
    os.chmod(work, 0o777)

    def make(**options):
        ready = threading.Event()
        sup = Supervisor(state_dir=str(state), **options)
        sup.register_tool("ready", ready.set)
        return sup, ready, work
    return make


def _cgroup_targets(sup: Supervisor) -> list[str]:
    mount = find_cgroup2_mount()
    targets = []
    if mount:
        targets.append(os.path.join(mount[0], "cgroup.procs"))
    if sup.core.cgroups is not None:
        root = sup.core.cgroups.root.path
        targets += [os.path.join(os.path.dirname(root), "cgroup.procs"), os.path.join(root, "spawner", "cgroup.procs")]
    for v1 in ("memory", "pids"):
        path = f"/sys/fs/cgroup/{v1}/cgroup.procs"
        if os.path.exists(path):
            targets.append(path)
    return targets


@pytest.mark.parametrize("verb", ["stop", "kill"])
def test_cgroup_escape_is_refused_and_the_run_ends(ready_sup, layer, verb) -> None:
    sup, ready, work = ready_sup(containment=layer)
    with sup:
        targets = _cgroup_targets(sup)
        assert targets
        run = sup.start(H.cgroup_escaper, targets, tools=["ready"], cwd=str(work), grace=0.3)
        assert ready.wait(30)
        attempts = _attempts(work)
        assert all(v in DENIED for v in attempts.values()), attempts
        _wait_writers(work, {"leader", "child"})
        report = _stop_and_check(sup, run, work, verb)
        assert report.escaped == 0


@pytest.mark.parametrize("verb", ["stop", "kill"])
def test_group_and_marker_escapes_do_not_outlive_stop(ready_sup, layer, verb) -> None:
    sup, ready, work = ready_sup(containment=layer)
    with sup:
        run = sup.start(H.group_escaper, tools=["ready"], cwd=str(work), grace=0.3)
        assert ready.wait(30)
        _wait_writers(work, {"leader", "rewritten", "subreaper", "grandchild"})
        _stop_and_check(sup, run, work, verb)


class _Listener:
    """A TCP server on the host's 127.0.0.1 that counts the bytes it receives."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.received: list[tuple[int, int]] = []  # (monotonic_ns, bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conns = []
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
                conn.setblocking(False)
                conns.append(conn)
            except OSError:
                pass
            for conn in conns:
                try:
                    data = conn.recv(65536)
                    if data:
                        self.received.append((time.monotonic_ns(), len(data)))
                except BlockingIOError:
                    pass
                except OSError:
                    pass
        for conn in conns:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_no_network_of_its_own_by_default(ready_sup) -> None:
    server = _Listener()
    sup, ready, work = ready_sup()
    try:
        with sup:
            run = sup.start(H.network_prober, server.port, tools=["ready"], cwd=str(work), grace=0.3)
            assert ready.wait(30)
            attempts = _attempts(work)
            assert attempts["host_loopback"] == "ECONNREFUSED", "the host's 127.0.0.1 must be out of reach"
            assert attempts["own_loopback"] == "ok", "the run keeps a loopback of its own"
            assert json.loads(attempts["interfaces"]) == ["lo"], "the run's namespace has its loopback only"
            report = _stop_and_check(sup, run, work)
            assert "namespace:network" in report.isolation["active"]
    finally:
        server.close()
    assert server.received == [], "bytes from the run reached a host-side server"


def test_host_network_is_opt_in_and_named_unconfined(ready_sup) -> None:
    server = _Listener()
    sup, ready, work = ready_sup()
    try:
        with sup:
            run = sup.start(H.network_prober, server.port, tools=["ready"], cwd=str(work), grace=0.3,
                            network="host")
            assert ready.wait(30)
            assert _attempts(work)["host_loopback"] == "ok"
            report = _stop_and_check(sup, run, work)
            returned_at = time.monotonic_ns()
            assert report.isolation["network"] == "host"
            assert "unconfined" in report.isolation["missing"]["namespace:network"]
    finally:
        server.close()
    assert server.received, "with network='host' the run does reach the host"
    # The kernel may still flush what the run had queued before it died: the
    # per-run proxy that cuts that at revoke is a later layer. Nothing is sent
    # by a process of the run after stop() returned: the run is dead.
    assert max(t for t, _ in server.received) < returned_at + int(1e9)


def test_cannot_signal_trace_or_read_the_supervisor_spawner_or_other_runs(ready_sup, layer) -> None:
    sup, ready, work = ready_sup(containment=layer)
    with sup:
        bystander = sup.start(H.cgroup_escaper, [], tools=["ready"], cwd=str(work), grace=0.3)
        assert ready.wait(30)
        ready.clear()
        spied_dir = work / "spy"
        spied_dir.mkdir()
        os.chmod(spied_dir, 0o777)
        targets = {"supervisor": os.getpid(), "spawner": sup.core.spawner.pid, "bystander": bystander.pid}
        paths = [sup.journal_path, sup.journal_path + "-wal", os.path.join(sup.core.runtime_dir, "egress")]
        run = sup.start(H.spy, targets, paths, tools=["ready"], cwd=str(spied_dir), grace=0.3)
        assert ready.wait(30)
        attempts = _attempts(spied_dir)
        visible = json.loads(attempts.pop("visible_pids"))
        own = int(attempts.pop("own_pid"))
        assert visible == [own], f"/proc shows other processes to the run: {visible}"
        assert all(v in DENIED for v in attempts.values()), {k: v for k, v in attempts.items() if v not in DENIED}
        assert os.path.exists(sup.journal_path)
        _stop_and_check(sup, run, spied_dir)
        assert bystander.state.value == "running", "the bystander must be untouched"
        assert sup.core.spawner.alive
        _stop_and_check(sup, bystander, work)
    db = sqlite3.connect(os.path.join(str(work.parent / "state"), "journal.db"))
    assert db.execute("SELECT count(*) FROM runs").fetchone()[0] == 2
    db.close()


def test_no_privilege_is_left(ready_sup) -> None:
    sup, _ready, work = ready_sup()
    with sup:
        out = sup.start(H.privilege_prober, cwd=str(work)).result(timeout=30)
    status = out["status"]
    uid = int(status["Uid"][0])
    assert uid != 0 and set(status["Uid"]) == {str(uid)} and set(status["Gid"]) == {str(uid)}
    assert status.get("Groups", []) == []
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap][0], 16) == 0, f"{cap} is not empty"
    assert status["NoNewPrivs"] == ["1"] and status["Seccomp"] == ["2"]
    for call in ("setuid0", "unshare_user", "unshare_net", "mount_tmpfs", "bpf", "perf_event_open", "keyctl",
                 "process_vm_readv", "io_uring_setup", "chroot"):
        assert out[call] in DENIED, f"{call}: {out[call]}"
    assert out["hostname"].startswith("run-")


def test_the_host_environment_never_reaches_the_run(ready_sup, monkeypatch) -> None:
    head, tail = "hunter2-" + os.urandom(4).hex(), os.urandom(4).hex()
    secret = head + tail
    monkeypatch.setenv("GATEWAY_SMTP_PASSWORD", secret)
    sup, _ready, work = ready_sup()
    with sup:
        found = sup.start(H.environment_prober, head, tail, cwd=str(work)).result(timeout=60)
        argv = sup.start(["/bin/sh", "-c", "env > env.txt"], cwd=str(work))
        argv.wait(timeout=30)
        passed = sup.start(H.environment_prober, "given-by-", "caller", cwd=str(work),
                           env={"MY_SETTING": "given-by-caller"}).result(timeout=60)
    assert found["os.environ"] is False and found["proc_environ"] is False
    assert found["memory"] is False, "the host's secret is somewhere in the run's memory"
    assert "GATEWAY_SMTP_PASSWORD" not in found["env_keys"]
    assert secret not in (work / "env.txt").read_text()
    assert passed["os.environ"] is True, "what start(env=...) passes does reach the run"


def test_a_stolen_credential_authenticates_nothing(ready_sup) -> None:
    callers: list[str] = []
    sup, ready, work = ready_sup()
    with sup:
        sup.register_tool("whoami", lambda ctx: callers.append(ctx.run_id) or ctx.run_id)
        victim = sup.start(H.cgroup_escaper, [], tools=["ready", "whoami"], cwd=str(work), grace=0.3)
        assert ready.wait(30)
        stolen = sup.core.get_run(victim.id).channel._credential.decode()  # as if read from its memory
        out = sup.start(H.stolen_credential_caller, victim.id, stolen, tools=["whoami"],
                        cwd=str(work)).result(timeout=30)
        assert out["reply"] is not None and out["reply"]["ok"] is False
        assert out["reply"]["error"]["name"] == "UNAUTHENTICATED"
        assert victim.id not in callers, "a tool ran under the victim's identity"
        assert out["own"] != victim.id and callers == [out["own"]]
        victim.stop()


def test_a_cwd_the_run_cannot_use_is_refused_at_start(tmp_path) -> None:
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    with Supervisor(state_dir=str(tmp_path)) as sup:
        with pytest.raises(Exception) as info:
            sup.start(H.privilege_prober, cwd=str(closed))
        assert type(info.value).__name__ == "InvalidTarget"
        assert str(closed) in str(info.value)


def test_the_workspace_is_shared_and_nothing_beside_it_is_visible(ready_sup) -> None:
    sup, _ready, work = ready_sup()
    secret = work.parent / "state" / "beside.txt"
    secret.write_text("not for runs")
    with sup:
        run = sup.start(["/bin/sh", "-c", f"echo made-by-run > made.txt; cat {secret} > seen.txt 2>&1; true"],
                        cwd=str(work))
        run.wait(timeout=30)
    assert (work / "made.txt").read_text().strip() == "made-by-run"
    assert "not for runs" not in (work / "seen.txt").read_text()


def test_a_silent_spawner_is_declared_lost_and_every_run_is_killed(ready_sup) -> None:
    import signal

    sup, ready, work = ready_sup(spawner_timeout=2.0)
    with sup:
        run = sup.start(H.cgroup_escaper, [], tools=["ready"], cwd=str(work), grace=0.3)
        assert ready.wait(30)
        uid = _uid_of(run.pid)
        spawner = sup.core.spawner.pid
        os.kill(spawner, signal.SIGSTOP)  # the host's doing: a run cannot (see the spy test)
        try:
            with pytest.raises(Exception) as info:
                sup.start(H.cgroup_escaper, [], tools=["ready"], cwd=str(work))
            assert "did not answer" in str(info.value) or "stopped answering" in str(info.value)
            # The aborted start is recorded as a stop report like any other end.
            sup._call(_value(sup.core.journal.commit_now))
            db = sqlite3.connect(sup.journal_path)
            reports = [json.loads(r) for (r,) in db.execute("SELECT report FROM stops")]
            db.close()
            aborted = [r for r in reports if r["ended_by"] == "never-started"]
            assert len(aborted) == 1 and aborted[0]["outcome"] == "failed", reports
            assert aborted[0]["revoke_source"] == "supervisor" and aborted[0]["survivors"] == 0
            info = run.wait(timeout=30)
            assert info.report.revoke_source == "spawner"
            assert _pids_of_uid(uid) == []
        finally:
            try:
                os.kill(spawner, signal.SIGCONT)
            except ProcessLookupError:
                pass


def _root_run_leaving_its_cgroup(sup: Supervisor, ready: threading.Event, work):
    """A run (isolation='off': root) whose leader and child moved to the cgroup root, both writing."""
    mount = find_cgroup2_mount()
    run = sup.start(H.cgroup_escaper, [os.path.join(mount[0], "cgroup.procs")], tools=["ready"], cwd=str(work),
                    grace=0.3)
    assert ready.wait(30)
    _wait_writers(work, {"leader", "child"})
    return run


@pytest.mark.skipif(not __import__("conftest").CGROUP_OK, reason="needs a writable cgroup v2")
def test_without_isolation_a_cgroup_escaper_is_still_found_killed_and_reported(ready_sup) -> None:
    """isolation='off' runs as root and can leave its cgroup: the sweep still
    finds it (among the spawner's adopted orphans, by its marker), kills it,
    and the report says so instead of claiming a clean stop."""
    from procscan import marked_processes

    sup, ready, work = ready_sup(isolation="off")
    with sup:
        run = _root_run_leaving_its_cgroup(sup, ready, work)
        assert set(_attempts(work).values()) == {"ok"}, "as root the escape itself succeeds"
        report = run.stop()
        returned_at = time.monotonic_ns()
        assert marked_processes(run.id) == {}
        assert report.survivors == 0 and report.escaped >= 2, report
        assert report.ended_by == "swept"
        _assert_silent_after(work, returned_at)


def test_an_agent_script_under_a_closed_parent_is_bound_in_and_a_closed_one_is_refused(ready_sup) -> None:
    sup, _ready, work = ready_sup()
    parent = work.parent / "closed-parent"
    parent.mkdir(mode=0o700)
    scripts = parent / "scripts"
    scripts.mkdir(mode=0o755)
    script = scripts / "agent.sh"
    script.write_text("#!/bin/sh\necho ran-from-script > out.txt\n")
    script.chmod(0o755)
    private = parent / "private.sh"
    private.write_text("#!/bin/sh\necho no\n")
    private.chmod(0o700)
    with sup:
        sup.start(["/bin/sh", str(script)], cwd=str(work)).wait(timeout=30)
        with pytest.raises(Exception) as info:
            sup.start(["/bin/sh", str(private)], cwd=str(work))
    assert (work / "out.txt").read_text().strip() == "ran-from-script"
    assert type(info.value).__name__ == "InvalidTarget" and str(private) in str(info.value)


@pytest.mark.skipif(not __import__("conftest").CGROUP_OK, reason="needs a writable cgroup v2")
def test_pause_also_stops_a_process_that_left_the_cgroup(ready_sup) -> None:
    """isolation='off' lets a root run leave its cgroup; pause() must still
    stop it (found among the spawner's orphans) before it returns True."""
    sup, ready, work = ready_sup(isolation="off")
    with sup:
        run = _root_run_leaving_its_cgroup(sup, ready, work)
        # Both the leader and its child are outside the run's cgroup now:
        # cgroup.freeze alone would freeze nothing.
        assert run.pause() is True
        paused_at = time.monotonic_ns()
        time.sleep(0.3)  # a running escaper writes every 5 ms
        log = (work / "alive.log").read_text().splitlines()
        late = [line for line in log if int(line.split()[1]) > paused_at]
        assert late == [], f"{len(late)} lines written while paused"
        assert run.resume() is True
        report = run.stop()
        assert report.survivors == 0 and report.escaped >= 1


def test_the_spawner_kills_an_orphan_that_belongs_to_no_live_run(ready_sup, layer) -> None:
    """isolation='off': a root run's grandchild that left its cgroup, group and
    marker cannot be attributed; once the spawner adopts it, it kills it,
    while the run itself lives on."""
    from procscan import wait_gone

    sup, ready, work = ready_sup(isolation="off", containment=layer)
    with sup:
        mount = find_cgroup2_mount()
        target = os.path.join(mount[0], "cgroup.procs") if layer == "cgroup" and mount else None
        run = sup.start(H.unattributable_orphan, target, tools=["ready"], cwd=str(work), grace=0.3)
        assert ready.wait(30)
        deadline = time.monotonic() + 20
        while not (work / "stray.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        stray = int((work / "stray.pid").read_text())
        assert wait_gone([stray], timeout=20) == [], "the unattributable orphan is still alive"
        assert run.state.value == "running", "the run itself is untouched"
        report = run.stop()
        assert report.survivors == 0


def test_strict_isolation_opens_as_root_and_gives_a_private_tmp(ready_sup) -> None:
    marker = f"deadstop-private-tmp-{os.getpid()}-{time.monotonic_ns()}"
    sup, _ready, work = ready_sup(isolation="strict")
    with sup:
        assert sup.isolation.mode == "strict" and sup.isolation.missing == {}
        run = sup.start(["/bin/sh", "-c", f"echo x > /tmp/{marker} && ls /tmp > tmp-listing.txt"], cwd=str(work))
        info = run.wait(timeout=30)
    assert info.exit_code == 0
    assert not os.path.exists(f"/tmp/{marker}"), "the run wrote into the host's /tmp"
    listing = set((work / "tmp-listing.txt").read_text().split())
    # Its own /tmp holds what it wrote and the way back to what it needs that lies
    # under /tmp (its cwd; the interpreter and sys.path when a checkout is there).
    needed = [str(work), sys.prefix, *sys.path]
    ways = {p.split("/")[2] for p in needed if p.startswith("/tmp/") and len(p.split("/")) > 2}
    assert marker in listing and listing <= {marker} | ways, listing
    assert info.report.isolation["private_tmp"] is True
