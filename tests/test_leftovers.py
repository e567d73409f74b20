"""Leftovers: a supervisor killed with SIGKILL leaves its runtime directory and
cgroup subtree; the next supervisor removes those of dead supervisors (owner
identified by pid and start time) and never touches a live one's.

The supervisors are real separate processes. Each end-to-end test gives them
a private XDG_RUNTIME_DIR and a private parent cgroup, so that supervisors
other programs open on this machine meanwhile cannot sweep the leftovers
before the test has looked at them, and the sweep under test cannot touch
anything outside the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from conftest import CGROUP_OK
from procscan import marked_processes, wait_gone
from deadstop.supervisor.mechanisms import leftovers
from deadstop.supervisor.mechanisms.cgroups import Cgroup, own_cgroup_dir

HERE = os.path.dirname(os.path.abspath(__file__))
HOST = os.path.join(HERE, "agents_leftovers_host.py")

needs_cgroup = pytest.mark.skipif(not CGROUP_OK, reason="cgroup v2 is not writable here")


# -- helpers ---------------------------------------------------------------------------
@pytest.fixture
def xdg():
    """A short private XDG_RUNTIME_DIR (socket paths must stay short)."""
    path = tempfile.mkdtemp(prefix="dsx", dir="/tmp")
    os.chmod(path, 0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def private_cgroup():
    """A cgroup of the test's own, below this process's v2 cgroup ("-" without cgroups)."""
    if not CGROUP_OK:
        yield "-"
        return
    base, _ = own_cgroup_dir()
    path = os.path.join(base, f"dstest-{os.getpid()}-{secrets.token_hex(3)}")
    os.mkdir(path)
    yield path
    if not Cgroup(path).remove():  # only if something outlived the test; kill it, then retry
        for d in leftovers._tree_dirs(path):
            if os.path.exists(os.path.join(d, "cgroup.kill")):
                Cgroup(d).kill()
        deadline = time.monotonic() + 5
        while not Cgroup(path).remove() and time.monotonic() < deadline:
            time.sleep(0.05)


class Host:
    def __init__(self, layer: str, cgroup: str, xdg: str, scratch: str, mode: str):
        env = {**os.environ, "XDG_RUNTIME_DIR": xdg,
               "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen([sys.executable, HOST, layer, cgroup, scratch, mode], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=HERE, env=env, start_new_session=True)
        line = self.proc.stdout.readline()
        assert line, f"host ({mode}) did not report"
        self.info = json.loads(line)
        assert "error" not in self.info, self.info

    def finish(self, timeout: float = 60) -> dict:
        """EOF on stdin: the host stops its run and closes cleanly."""
        out, _ = self.proc.communicate("", timeout=timeout)
        assert self.proc.returncode == 0, f"host exited with {self.proc.returncode}"
        return json.loads(out)

    def kill_group(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def _sweep_in_host(layer, cgroup, xdg, scratch) -> dict:
    host = Host(layer, cgroup, xdg, scratch, "sweep")
    try:
        host.proc.wait(timeout=60)
        assert host.proc.returncode == 0
        return host.info
    finally:
        host.cleanup()


def _kill_marked(run_ids) -> None:
    for run in run_ids:
        for pid in marked_processes(run):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _cgroup_pids(path: str) -> set[int]:
    """Every process in a cgroup subtree, read from cgroupfs by the test itself.
    (The run marker scan needs the test session variable in the run's initial
    environment, which an isolated run does not inherit.)"""
    pids: set[int] = set()
    for d, _dirs, _files in os.walk(path):
        try:
            with open(os.path.join(d, "cgroup.procs")) as f:
                pids.update(int(x) for x in f.read().split())
        except FileNotFoundError:
            pass
    return pids


def _run_pids(info: dict) -> set[int]:
    return _cgroup_pids(os.path.join(info["cgroup"], f"run-{info['runs'][0]}"))


def _paths(removed, kind) -> set[str]:
    return {r["path"] for r in removed if r["kind"] == kind}


def _v1_subtrees(supervisor_id: str) -> list[str]:
    """A supervisor's subtrees in the v1 memory/pids hierarchies. These live in
    the process's own (shared) v1 cgroups, not the test's private one, so
    only their final state is asserted: another program's supervisor may
    have swept a dead owner's first."""
    from deadstop.supervisor.mechanisms import cgroup_v1

    return sorted(e.path for root in cgroup_v1.leftover_roots() for e in os.scandir(root)
                  if e.name.startswith(f"deadstop-{supervisor_id}-"))


# -- end to end ----------------------------------------------------------------------------
@needs_cgroup
def test_dead_supervisors_populated_cgroup_and_runtime_dir_are_removed_live_ones_kept(
        xdg, private_cgroup, tmp_path) -> None:
    """Supervisor and spawner SIGKILLed together: what is left of the run stays in
    the dead supervisor's cgroup. A new supervisor (with a journal of its own,
    so the journal-based recovery knows nothing of them) kills them and removes
    the subtree and the runtime directory; a live supervisor's run, cgroup and
    runtime directory are untouched and it still stops its run normally."""
    live = dead = straggler = None
    run_ids: list[str] = []
    try:
        live = Host("cgroup", private_cgroup, xdg, str(tmp_path), "tree")
        dead = Host("cgroup", private_cgroup, xdg, str(tmp_path), "tree")
        run_ids = live.info["runs"] + dead.info["runs"]
        live_procs = _run_pids(live.info)
        assert len(live_procs) == 7, live_procs
        for info in (live.info, dead.info):
            assert os.path.dirname(info["runtime_dir"]) == os.path.join(xdg, "deadstop")
            assert os.path.dirname(info["cgroup"]) == private_cgroup

        dead.kill_group()
        # The spawner is gone (else its own cleanup would race the assertions below).
        assert wait_gone([dead.info["spawner"]], timeout=20) == []
        # Whatever of the run outlived its spawner (the tree's children, possibly
        # its leader), plus a straggler of the test's own in the run's cgroup, so
        # the dead subtree is surely populated whatever the run's isolation did.
        straggler = _populate(os.path.join(dead.info["cgroup"], f"run-{dead.info['runs'][0]}"))
        _reaped_in_background(straggler)
        left = _run_pids(dead.info) | set(dead.info["leaders"])
        assert straggler.pid in left
        # Otherwise the test would prove nothing.
        assert os.path.isdir(dead.info["runtime_dir"])
        assert Cgroup(dead.info["cgroup"]).populated()

        removed = _sweep_in_host("cgroup", private_cgroup, xdg, str(tmp_path))["removed"]

        assert wait_gone(sorted(left), timeout=20) == [], "the sweep left the dead supervisor's runs alive"
        assert straggler.wait(timeout=10) == -signal.SIGKILL
        assert marked_processes(dead.info["runs"][0]) == {}
        assert not os.path.exists(dead.info["runtime_dir"])
        assert not os.path.exists(dead.info["cgroup"])
        assert _paths(removed, "runtime_dir") == {dead.info["runtime_dir"]}, removed
        assert _paths(removed, "cgroup") == {dead.info["cgroup"]}, removed
        (cg_rec,) = [r for r in removed if r["kind"] == "cgroup"]
        assert straggler.pid in cg_rec["killed"] and set(cg_rec["killed"]) <= left
        assert cg_rec["supervisor_id"] == dead.info["id"] and cg_rec["pid"] == dead.info["pid"]

        # The live supervisor: untouched, and still in charge of its run.
        assert os.path.exists(os.path.join(live.info["runtime_dir"], "egress"))
        assert os.path.isdir(live.info["cgroup"])
        assert _run_pids(live.info) == live_procs
        assert _v1_subtrees(dead.info["id"]) == []
        assert _v1_subtrees(live.info["id"]) == live.info["v1"]
        result = live.finish()
        assert result["survivors"] == 0, result
        assert not os.path.exists(live.info["runtime_dir"]) and not os.path.exists(live.info["cgroup"])
    finally:
        for host in (live, dead):
            if host is not None:
                host.cleanup()
        if straggler is not None:
            straggler.kill()
            straggler.wait()
        _kill_marked(run_ids)


def test_sigkilled_supervisor_leaves_dirs_that_the_next_one_removes(layer, xdg, private_cgroup, tmp_path) -> None:
    """Only the supervisor is SIGKILLed: its spawner kills the runs (and removes
    the v2 subtree), and the runtime directory and the v1 subtrees stay behind
    until the next supervisor opens; an idle live supervisor's stay."""
    live = dead = None
    run_ids: list[str] = []
    try:
        live = Host(layer, private_cgroup, xdg, str(tmp_path), "idle")
        dead = Host(layer, private_cgroup, xdg, str(tmp_path), "tree")
        run_ids = dead.info["runs"]
        run_pids = set(dead.info["leaders"]) | set(marked_processes(run_ids[0]))
        if layer == "cgroup":
            run_pids |= _run_pids(dead.info)
        os.kill(dead.info["pid"], signal.SIGKILL)
        dead.proc.wait(timeout=30)
        assert wait_gone([dead.info["spawner"]] + sorted(run_pids), timeout=20) == []
        assert os.path.isdir(dead.info["runtime_dir"])
        # (The spawner, on its way out, usually removes the emptied v2 subtree itself.)

        removed = _sweep_in_host(layer, private_cgroup, xdg, str(tmp_path))["removed"]

        assert not os.path.exists(dead.info["runtime_dir"])
        assert _paths(removed, "runtime_dir") == {dead.info["runtime_dir"]}, removed
        if layer == "cgroup":
            assert not os.path.exists(dead.info["cgroup"])
            assert _paths(removed, "cgroup") <= {dead.info["cgroup"]}, removed
        else:
            assert _paths(removed, "cgroup") == set()
        assert os.path.exists(os.path.join(live.info["runtime_dir"], "egress"))
        if live.info["cgroup"]:
            assert os.path.isdir(live.info["cgroup"])
        assert _v1_subtrees(dead.info["id"]) == []
        assert _v1_subtrees(live.info["id"]) == live.info["v1"]
        assert live.finish() == {}
        assert _v1_subtrees(live.info["id"]) == []
    finally:
        for host in (live, dead):
            if host is not None:
                host.cleanup()
        _kill_marked(run_ids)


# -- the owner judgments, on hand-made directories ----------------------------------------
def _dead_process() -> tuple[int, int]:
    """(pid, start ticks) of a process that has exited and been reaped."""
    p = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    ticks = leftovers.start_ticks(p.pid)
    p.communicate(b"")
    return p.pid, ticks


def _make(base: str, name: str, record: dict | None, mode: int = 0o700) -> str:
    path = os.path.join(base, name)
    os.mkdir(path, mode)
    with open(os.path.join(path, "egress"), "w") as f:
        f.write("socket stand-in")
    if record is not None:
        with open(os.path.join(path, leftovers.OWNER_FILE), "w") as f:
            json.dump(record, f)
    return path


def _record(sid: str, pid: int, ticks: int, **extra) -> dict:
    return {"supervisor_id": sid, "pid": pid, "start_ticks": ticks, "boot_id": leftovers.boot_id(),
            "pidns": leftovers.pid_namespace(), "uid": os.geteuid(), **extra}


def test_runtime_dir_sweep_removes_only_dead_owners_own_dirs(tmp_path) -> None:
    base = tmp_path / "base"
    base.mkdir(mode=0o711)
    base = str(base)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    me = leftovers.owner_of_self()
    dead_pid, dead_ticks = _dead_process()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    zombie_ticks = leftovers.start_ticks(zombie.pid)
    try:
        deadline = time.monotonic() + 10
        while leftovers._stat_fields(zombie.pid)[0] != b"Z":  # exited, not reaped (no wait() yet)
            assert time.monotonic() < deadline
            time.sleep(0.01)

        removed_expected = {
            _make(base, "ds-0000dead", _record("0000dead", dead_pid, dead_ticks)),
            _make(base, "ds-0000reus", _record("0000reus", me["pid"], me["start_ticks"] - 1)),
            _make(base, "ds-0000boot", _record("0000boot", me["pid"], me["start_ticks"], boot_id="another-boot")),
            _make(base, "ds-0000zomb", _record("0000zomb", zombie.pid, zombie_ticks)),
            _make(base, "ds-0000dead-abc123", _record("0000dead", dead_pid, dead_ticks)),
        }
        with_link = _make(base, "ds-0000link", _record("0000link", dead_pid, dead_ticks))
        os.symlink(str(outside), os.path.join(with_link, "escape"))
        removed_expected.add(with_link)
        stale = _make(base, ".ds-new-stale1", None)
        os.utime(stale, (time.time() - 600, time.time() - 600))
        removed_expected.add(stale)

        kept = {
            _make(base, "ds-0000live", _record("0000live", me["pid"], me["start_ticks"])),
            _make(base, "ds-0000pns1", _record("0000pns1", dead_pid, dead_ticks, pidns=1)),
            _make(base, "ds-0000none", None),
            _make(base, "ds-0000badr", {"pid": "x"}),
            _make(base, "ds-0000nsid", _record("somebody", dead_pid, dead_ticks)),
            _make(base, "deadstop-0000", _record("0000", dead_pid, dead_ticks)),
            _make(base, ".ds-new-fresh1", None),
        }
        link = os.path.join(base, "ds-0000syml")
        os.symlink(str(outside), link)
        with open(outside / leftovers.OWNER_FILE, "w") as f:
            json.dump(_record("0000syml", dead_pid, dead_ticks), f)
        if os.geteuid() == 0:
            foreign = _make(base, "ds-0000uid9", _record("0000uid9", dead_pid, dead_ticks))
            os.chown(foreign, 65534, 65534)
            kept.add(foreign)

        removed = leftovers.sweep_runtime_dirs([base])

        assert {r["path"] for r in removed} == removed_expected
        assert all(r["kind"] == "runtime_dir" for r in removed)
        for path in removed_expected:
            assert not os.path.lexists(path)
        for path in kept:
            assert os.path.isdir(path), path
        assert os.path.islink(link)
        assert (outside / "precious").read_text() == "keep me"
        assert (outside / leftovers.OWNER_FILE).exists()
        # A base that is a symlink is not walked at all.
        os.symlink(base, str(tmp_path / "base-link"))
        assert leftovers.sweep_runtime_dirs([str(tmp_path / "base-link")]) == []
        # Nor is one writable by others.
        os.chmod(base, 0o777)
        _make(base, "ds-0000dea2", _record("0000dea2", dead_pid, dead_ticks))
        assert leftovers.sweep_runtime_dirs([base]) == []
    finally:
        zombie.wait()


def test_make_runtime_dir_is_predictable_private_and_owned(monkeypatch, xdg) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", xdg)
    path = leftovers.make_runtime_dir("0123abcd")
    assert path == os.path.join(xdg, "deadstop", "ds-0123abcd")
    assert os.stat(path).st_mode & 0o777 == 0o700
    assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o711
    assert os.listdir(path) == [leftovers.OWNER_FILE]
    with open(os.path.join(path, leftovers.OWNER_FILE)) as f:
        rec = json.load(f)
    assert rec["supervisor_id"] == "0123abcd"
    assert (rec["pid"], rec["start_ticks"]) == (os.getpid(), leftovers.start_ticks(os.getpid()))
    assert rec["boot_id"] == leftovers.boot_id() and rec["pidns"] == leftovers.pid_namespace()
    assert leftovers.owner_status(rec["pid"], rec["start_ticks"], rec["boot_id"], rec["pidns"])[0] == "alive"
    # The same id again (a second supervisor with a colliding id): another name.
    other = leftovers.make_runtime_dir("0123abcd")
    assert other != path and os.path.basename(other).startswith("ds-0123abcd-")
    # Both live: a sweep keeps them.
    assert leftovers.sweep_runtime_dirs([os.path.dirname(path)]) == []
    assert os.path.isdir(path) and os.path.isdir(other)
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".ds-new-")]


def _fs_type(path: str) -> str:
    """The filesystem type of `path` as coreutils' stat sees it (statfs), not as deadstop parses it."""
    return subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True, check=True).stdout.strip()


def test_without_xdg_the_runtime_dir_sits_on_a_memory_filesystem_where_one_is_offered(monkeypatch) -> None:
    # Every run's endpoint is made and removed in this directory: on a disk filesystem that is
    # inode allocation at each start and stop. /dev/shm is tmpfs on Linux wherever it exists.
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    bases = leftovers.runtime_bases()
    parents = [os.path.dirname(b) for b in bases]
    memory = [p for p in parents if _fs_type(p) in ("tmpfs", "ramfs")]
    if not memory:
        pytest.skip("no candidate base on a memory filesystem here")
    assert _fs_type(parents[0]) in ("tmpfs", "ramfs"), list(zip(bases, map(_fs_type, parents)))
    path = leftovers.make_runtime_dir("0123abcf")
    try:
        assert _fs_type(path) in ("tmpfs", "ramfs")
        assert os.stat(path).st_mode & 0o777 == 0o700
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_make_runtime_dir_refuses_a_symlinked_base(monkeypatch, xdg, tmp_path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    os.symlink(str(target), os.path.join(xdg, "deadstop"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", xdg)
    path = leftovers.make_runtime_dir("0123abce")
    try:
        assert not path.startswith(xdg + os.sep)
        assert os.listdir(target) == []
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- cgroup subtrees, on hand-made cgroups ------------------------------------------------------
def _reaped_in_background(p: subprocess.Popen) -> threading.Thread:
    t = threading.Thread(target=p.wait, daemon=True)
    t.start()
    return t


def _populate(cgroup: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(p.pid))
    return p


def _cgroup_cases(root: str) -> tuple[dict[str, str], list[subprocess.Popen]]:
    me = leftovers.owner_of_self()
    dead_pid, dead_ticks = _dead_process()
    ns = me["pidns"]
    paths = {
        "dead-populated": f"deadstop-00000001-{dead_pid}-{dead_ticks}-{ns}",
        "reused-empty": f"deadstop-00000002-{me['pid']}-{me['start_ticks'] - 1}-{ns}",
        "live": leftovers.cgroup_name("00000003"),
        "other-pidns": f"deadstop-00000004-{dead_pid}-{dead_ticks}-1",
        "legacy": "deadstop-00000005",
    }
    paths = {k: os.path.join(root, v) for k, v in paths.items()}
    for path in paths.values():
        os.mkdir(path)
        os.mkdir(os.path.join(path, "run-a"))
        os.mkdir(os.path.join(path, "run-a", "deeper"))
    popen = [_populate(os.path.join(paths["dead-populated"], "run-a")),
             _populate(os.path.join(paths["dead-populated"], "run-a", "deeper")),
             _populate(os.path.join(paths["live"], "run-a"))]
    return paths, popen


def _check_cgroup_sweep(paths: dict[str, str], popen, removed, kind: str) -> None:
    assert {r["path"] for r in removed} == {paths["dead-populated"], paths["reused-empty"]}, removed
    assert all(r["kind"] == kind for r in removed)
    (populated,) = [r for r in removed if r["path"] == paths["dead-populated"]]
    assert populated["killed"] == sorted([popen[0].pid, popen[1].pid])
    assert popen[0].wait(timeout=10) == -signal.SIGKILL and popen[1].wait(timeout=10) == -signal.SIGKILL
    assert popen[2].poll() is None, "a live supervisor's run was killed"
    for key in ("live", "other-pidns", "legacy"):
        assert os.path.isdir(os.path.join(paths[key], "run-a", "deeper")), key
    for key in ("dead-populated", "reused-empty"):
        assert not os.path.exists(paths[key])


@needs_cgroup
@pytest.mark.parametrize("use_kill", [True, False], ids=["cgroup.kill", "freeze+pidfd"])
def test_cgroup_sweep_kills_and_removes_only_dead_owners_subtrees(private_cgroup, use_kill) -> None:
    _sweep_and_check(private_cgroup, "cgroup", v2=True, use_kill=use_kill)


def _sweep_and_check(root: str, kind: str, **sweep_options) -> None:
    """Make the owner cases under `root`, sweep it, check what went, and clean up whatever happened."""
    paths, popen = _cgroup_cases(root)
    try:
        for p in popen:
            _reaped_in_background(p)
        removed = asyncio.run(leftovers.sweep_cgroup_roots([root], **sweep_options))
        _check_cgroup_sweep(paths, popen, removed, kind)
    finally:
        for p in popen:
            p.kill()
            p.wait()
        for path in paths.values():
            Cgroup(path).remove()


def test_cgroup_sweep_of_a_v1_hierarchy() -> None:
    """The hook for the v1 memory/pids subtrees: no cgroup.kill, no cgroup.events."""
    from deadstop.supervisor.mechanisms import cgroup_v1

    own = cgroup_v1.own_dirs()[0].get("pids")
    if own is None or not os.access(own, os.W_OK):
        pytest.skip("no writable v1 pids hierarchy here")
    root = os.path.join(own, f"dstest-{os.getpid()}-{secrets.token_hex(3)}")
    os.mkdir(root)
    try:
        _sweep_and_check(root, "cgroup-v1", v2=False)
    finally:
        Cgroup(root).remove()


def test_owner_names_round_trip() -> None:
    name = leftovers.cgroup_name("abcd0123")
    parsed = leftovers.parse_cgroup_name(name)
    assert parsed == {"supervisor_id": "abcd0123", "pid": os.getpid(),
                      "start_ticks": leftovers.start_ticks(os.getpid()), "pidns": leftovers.pid_namespace()}
    assert leftovers.is_subtree_of(name, "abcd0123") and leftovers.is_subtree_of("deadstop-abcd0123", "abcd0123")
    assert not leftovers.is_subtree_of(name, "abcd012")
    assert leftovers.parse_cgroup_name("deadstop-abcd0123") is None
    assert leftovers.parse_cgroup_name("deadstop-a/b-1-2-3") is None
