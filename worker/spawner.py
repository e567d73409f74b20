"""The spawner: a pre-warmed, single-threaded parent of every run.

The supervisor starts one spawner per Supervisor. It imports the worker
machinery once, then forks a run per `start` command, so a run starts at the
cost of a warm fork instead of an interpreter start. It also keeps the host
application's process untouched: the child-subreaper flag, the SIGCHLD
handler and the reaping live here, not in the host.

Rules this process keeps:

* It never creates a ZeroMQ context or a thread: fork() from a
  multi-threaded process is unsafe, and runs are forked from here.
* It never unpickles a target: the blob is opened only in the forked child.
* Where the supervisor signals a run by process group, it holds the run's
  leader as a zombie until the supervisor says `release`: a zombie pins its
  pid and its process-group id, so killpg() can never hit a recycled group
  (pid_max may be as low as 32768). Runs contained by a cgroup are signalled
  through it, so their leaders are reaped at once and the status is sent
  unasked.
* Orphans adopted through the subreaper flag are reaped at once, and an
  orphan that belongs to no live run (its uid or marker names none: it made
  itself unattributable, or outlived its run) is killed when it is adopted.
* When the supervisor goes away (control socket EOF) or on SIGTERM, it kills
  every process below it, then exits: runs never outlive their supervisor.
* Under isolation it is exec'd with a clean environment and holds no run's
  credential (each arrives as a memfd over SCM_RIGHTS and is closed here
  right after the fork): runs are forked from this process and can read
  their own memory, so whatever it holds, they hold. It is not dumpable,
  so no process without CAP_SYS_PTRACE can read its memory or descriptors.

Wire: ipc/spawner_wire.py, typed messages in the framing of multiprocess's
Connection (a 4-byte big-endian length, then the payload); a `Started` reply
is followed by the run's pidfd passed with SCM_RIGHTS as
multiprocess.reduction.sendfds does.
The supervisor's side uses multiprocess itself; this side speaks the same
bytes with the standard library, because importing multiprocess pulls in
dill, and every megabyte in this template is a megabyte each run must unmap
when it is killed (about 0.15 ms of kill latency per run, measured).
"""

from __future__ import annotations

import _signal
import functools
import gc
import os
import select
import selectors
import signal
import socket
import sys
import time
from typing import Any, NamedTuple

import msgspec
import struct

from ..ipc import framing
from ..ipc import spawner_wire as wire
from . import bootstrap, platform, sandbox, watchdog

# Pre-warm what nearly every run needs before the first fork. asyncio and
# zmq.asyncio are left to the runs that use them: every megabyte in the
# template is a megabyte each run must unmap when it is killed.
import cloudpickle  # noqa: F401
import fcntl  # noqa: F401  (the sandbox's loopback set-up)
import zmq  # noqa: F401
from . import egress  # noqa: F401

MARKER_PREFIX = f"{framing.ENV_MARKER}=".encode()
#: Made once: the per-start path creates as few objects as it can (see _fork_run).
ALL_SIGNALS = frozenset(signal.valid_signals())
#: Adoption raises no signal: orphans are looked at this often, and at every SIGCHLD.
STRAY_SCAN_INTERVAL = 1.0
#: A stray is killed only once it has been one this long: a run being
#: stopped has its orphans swept (and reported) by its own stop first.
STRAY_GRACE = 1.0
#: Scans triggered by exits and ends come at most this often (each reads every child of the spawner).
STRAY_SCAN_MIN_GAP = 0.05


class _Starting(NamedTuple):
    """A forked run waiting for its confinement verdict on its ready pipe."""

    msg: wire.Start
    pid: int
    pidfd: int
    proxy_fd: int | None
    go_w: int  # written once Started is sent: the run's own code starts only then



class Spawner:
    def __init__(self, ctrl_fd: int, isolated: bool = False):
        self.sock = socket.socket(fileno=ctrl_fd)
        self.sock.setblocking(True)
        self.pid = os.getpid()
        self.leaders: dict[int, str] = {}  # pid -> run id, held as zombies
        self.released: set[int] = set()  # released but not yet exited
        self.cgroups: list[str] = []
        self.cgroup_root: str | None = None  # the supervisor's subtree, removed on the way out
        self.home_procs: str | None = None  # where to move ourselves so the subtree can go
        self.stopping = False
        self.watchdog: int | None = None  # worker/watchdog.py: kills every run if we cannot
        self.run_of_uid: dict[int, str] = {}  # identities of the runs started here
        self.live_runs: set[str] = set()  # started here, not yet ended by the supervisor
        self.strays: dict[int, float] = {}  # pid -> when first seen as an orphan of no live run
        self.strays_scanned = 0.0  # monotonic time of the last stray scan (they are throttled)
        #: forked runs whose confinement is not yet confirmed: ready pipe's read end -> what the answer needs.
        #: The spawner forks the next run while these set themselves up (two cores work, not one).
        self.starting: dict[int, _Starting] = {}
        self.early_exits: dict[int, int] = {}  # pid -> wait status of a child reaped before its answer was read
        self.pinned: set[int] = set()  # leaders held as zombies until the supervisor releases them
        # A bare poll object, not a selectors.Selector: its keys are objects made per registration,
        # and every object made while a run starts is a page that run ends up owning a copy of.
        self.poller = select.poll()
        self.ctrl_fd = self.sock.fileno()
        self.subreaper = platform.set_child_subreaper()
        self.clone_into_cgroup = True  # until the kernel says otherwise
        self.bounding_empty = False  # emptied once here: runs inherit it so
        platform.set_dumpable(False)
        # Compiled once here, loaded by each isolated run (worker/seccomp_filter.py).
        self.seccomp: Any = None
        self.seccomp_error = ""
        if isolated:
            platform.prewarm_sandbox()
            try:
                from . import seccomp_filter

                self.seccomp = seccomp_filter.Prepared(seccomp_filter.build())
            except OSError as exc:
                self.seccomp_error = str(exc)
            # The spawner never execs, so its bounding set grants it nothing;
            # emptied here once, every run inherits it empty (40 prctl calls
            # less per start). Its own effective capabilities stay.
            try:
                platform.drop_bounding_set()
                self.bounding_empty = True
            except OSError:
                pass  # not ours to drop (no CAP_SETPCAP): each run drops what it can
        self.netns = sandbox.NetnsPool() if isolated and os.geteuid() == 0 else None

    # -- main loop ---------------------------------------------------------
    def serve(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the host decides on ^C
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        poller = self.poller
        poller.register(self.ctrl_fd, select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        gc.freeze()  # keep warm pages shared with forked runs
        self._send(wire.Ready(pid=self.pid, subreaper=self.subreaper))
        while not self.stopping:
            pool = self.netns if self.netns is not None and self.netns.wants_more else None
            events = poller.poll(0 if pool is not None else STRAY_SCAN_INTERVAL * 1000)
            if not events:
                if pool is not None:
                    pool.fill_one()  # only when nothing is waiting for us
                else:
                    self._kill_strays()
                continue
            for fd, _ in events:  # any event of a descriptor (data, hang-up, error) means: read it
                if fd == wake_r:
                    try:
                        while os.read(wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                    self._reap()
                elif fd in self.starting:
                    self._answer_start(fd)
                elif fd == self.ctrl_fd and not self._handle_ctrl():
                    self.stopping = True
        self.kill_everything()

    def _on_sigterm(self, *_: Any) -> None:
        self.stopping = True

    def _handle_ctrl(self) -> bool:
        try:
            raw = self._recv_frame()
        except (EOFError, OSError):
            return False  # the supervisor is gone
        msg = wire.decode_to_spawner(raw)
        if isinstance(msg, wire.Start):
            fds: list[int] = []
            if msg.fds:
                _, fds, _, _ = socket.recv_fds(self.sock, 1, msg.fds)
            self._start(msg, fds)
        elif isinstance(msg, wire.Probe):
            self._probe(msg)
        elif isinstance(msg, wire.Config):
            self.cgroup_root = msg.cgroup_root
            self.home_procs = msg.home_procs
            if self.watchdog is None:
                self.watchdog = watchdog.start(self.sock.fileno(), msgspec.structs.asdict(msg), self.pid)
        elif isinstance(msg, wire.Ended):  # the supervisor is done with the run: what is left of it is a stray
            self.live_runs.discard(msg.run_id)
            self._kill_strays(throttled=True)
        elif isinstance(msg, wire.Release):
            self.released.add(msg.pid)
            self.pinned.discard(msg.pid)
            self._reap()
        elif isinstance(msg, wire.Shutdown):
            return False
        return True

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("supervisor closed the control socket")
            buf += chunk
        return bytes(buf)

    def _recv_frame(self) -> bytes:
        (size,) = struct.unpack("!i", self._recv_exact(4))
        if size == -1:  # Connection's header for payloads over 2 GiB
            (size,) = struct.unpack("!Q", self._recv_exact(8))
        return self._recv_exact(size)

    def _send(self, msg: Any) -> None:
        body = wire.encode(msg)
        self.sock.sendall(struct.pack("!i", len(body)) + body)

    # -- runs ----------------------------------------------------------------
    def _start(self, msg: wire.Start, fds: list[int]) -> None:
        if fds:
            msg.credential_fd = fds[0]
        if msg.stdio and len(fds) > 1:
            msg.stdio_fd = fds[1]
        try:
            self._start_run(msg)
        finally:
            for fd in fds:  # the child has its copy; the spawner keeps none
                os.close(fd)

    def _start_run(self, msg: wire.Start) -> None:
        plan = msg.sandbox
        if plan:
            plan["bounding_empty"] = self.bounding_empty
        if plan and plan.get("uid") is not None:
            self.run_of_uid[plan["uid"]] = msg.run_id
        proxy_fd = None
        if plan and "network" in plan.get("namespaces", ()) and self.netns is not None:
            plan["netns_fd"] = self.netns.take_now() if msg.proxy_port else self.netns.take()
        try:
            if msg.proxy_port:
                # The listener exists before the run does: its first connection cannot race it.
                if not plan or plan.get("netns_fd") is None:
                    self._send(wire.StartFailed(run_id=msg.run_id, error="a proxied run needs a network namespace "
                                                "prepared by a root spawner (none is available here)"))
                    return
                try:
                    proxy_fd = self.netns.listen_inside(plan["netns_fd"], msg.proxy_port)  # type: ignore[union-attr]
                except OSError as exc:
                    self._send(wire.StartFailed(run_id=msg.run_id, error=f"the proxy listener failed: {exc}"))
                    return
            self._fork_run(msg, proxy_fd)
        finally:
            if plan and plan.get("netns_fd") is not None:
                os.close(plan["netns_fd"])  # the run has its own copy
            if proxy_fd is not None:
                os.close(proxy_fd)  # the supervisor has its copy (or the start failed)

    def _fork_run(self, msg: wire.Start, proxy_fd: int | None = None) -> None:
        if msg.cgroup_procs:
            self.cgroups.append(os.path.dirname(msg.cgroup_procs))
        # Block every signal across fork: a SIGTERM aimed at the new run before
        # it has reset the spawner's handlers must stay pending until it has,
        # then act with its default disposition (bootstrap unblocks).
        # _signal's: signal.pthread_sigmask turns each of the 64 signals of the old mask into an enum
        # member, and every object it touches is a page the new run would own a copy of.
        old_mask = _signal.pthread_sigmask(signal.SIG_BLOCK, ALL_SIGNALS)
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()  # the spawner's "told the supervisor": the run's code waits for it
        try:
            pid, pidfd = self._fork(msg)
        except OSError as exc:
            _signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            for fd in (ready_r, ready_w, go_r, go_w):
                os.close(fd)
            self._send(wire.StartFailed(run_id=msg.run_id, error=f"fork failed: {exc}"))
            return
        if pid == 0:
            os.close(ready_r)
            os.close(go_w)
            bootstrap.child_main(msg, self.pid, ready_w, self.seccomp, go_r)  # never returns
        _signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(ready_w)
        os.close(go_r)
        # Reply only once the child is its own session, inside its cgroup and
        # confined: the supervisor must never signal a group or cgroup the
        # run has not joined yet, nor count as started a run whose sandbox
        # failed. EOF (child died first) is as good as the byte. The answer
        # is read from the select loop: the next start forks meanwhile.
        self.live_runs.add(msg.run_id)  # not a stray while it sets itself up
        self.starting[ready_r] = _Starting(msg, pid, pidfd, os.dup(proxy_fd) if proxy_fd is not None else None, go_w)
        self.poller.register(ready_r, select.POLLIN)

    def _answer_start(self, ready_r: int) -> None:
        """The child's confinement verdict came (or its EOF): tell the supervisor."""
        pending = self.starting.pop(ready_r)
        self.poller.unregister(ready_r)
        msg, pid, pidfd, proxy_fd, go_w = pending.msg, pending.pid, pending.pidfd, pending.proxy_fd, pending.go_w
        try:
            answer = os.read(ready_r, 4096)
        except OSError:
            answer = b"Ethe run's ready pipe failed"
        finally:
            os.close(ready_r)
        try:
            if answer.startswith(b"E"):  # it exits by itself; _reap collects it like any orphan
                self.live_runs.discard(msg.run_id)
                self.early_exits.pop(pid, None)  # never a leader: nothing to tell of its exit
                self._send(wire.StartFailed(run_id=msg.run_id, error=answer[1:].decode(errors="replace")))
                self._reap()
                return
            self.leaders[pid] = msg.run_id
            if not msg.pin_group:
                self.released.add(pid)  # nothing signals its group by pgid: reap as soon as it exits
            else:
                self.pinned.add(pid)
            if pidfd < 0 and hasattr(os, "pidfd_open"):
                try:
                    pidfd = os.pidfd_open(pid)
                except OSError:
                    pidfd = -1
            try:
                create_time = platform.create_time(pid)  # not psutil's: its objects would dirty the run's pages
            except OSError:
                create_time = 0.0
            self._send(wire.Started(run_id=msg.run_id, pid=pid, create_time=create_time, has_pidfd=pidfd >= 0,
                                    has_proxy=proxy_fd is not None))
            fds = ([pidfd] if pidfd >= 0 else []) + ([proxy_fd] if proxy_fd is not None else [])
            if fds:
                socket.send_fds(self.sock, [bytes([len(fds)])], fds)  # = multiprocess.reduction.sendfds
            if pid in self.early_exits:  # it exited, and was reaped, before its answer was read
                self._reaped(pid, self.early_exits.pop(pid))
            try:
                os.write(go_w, b"g")  # the supervisor has its Started: the run's events now come after it
            except OSError:
                pass  # it is gone already
        finally:
            os.close(go_w)
            for fd in (pidfd, proxy_fd):
                if fd is not None and fd >= 0:
                    os.close(fd)

    def _probe(self, msg: wire.Probe) -> None:
        """Fork a throw-away child that tries every sandbox step; reply with the verdicts."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(r)
                result = sandbox.probe(msg.plan, self.seccomp)
                if self.seccomp_error:
                    result["seccomp"] = self.seccomp_error
                os.write(w, wire.encode(result))
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        chunks = []
        try:
            sel = selectors.DefaultSelector()
            sel.register(r, selectors.EVENT_READ)
            while sel.select(10.0):
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
            sel.close()
        finally:
            os.close(r)
            try:
                os.kill(pid, signal.SIGKILL)  # our own child, not yet reaped: its pid is pinned
            except OSError:
                pass
            os.waitpid(pid, 0)
        try:
            result = msgspec.msgpack.decode(b"".join(chunks), type=dict[str, str])
        except (msgspec.DecodeError, msgspec.ValidationError):
            result = {"probe": "the probe child died"}
        self._send(wire.Probed(results=result))

    def _fork(self, msg: wire.Start) -> tuple[int, int]:
        """Fork the run, born inside its cgroup where the kernel allows it.

        Returns (pid, pidfd or -1) in the parent, (0, -1) in the child; sets
        msg.in_cgroup for the child when it needs no move.
        """
        procs = msg.cgroup_procs
        if procs and self.clone_into_cgroup:
            fd = os.open(os.path.dirname(procs), os.O_RDONLY | os.O_DIRECTORY)
            try:
                pid, pidfd = platform.fork_into_cgroup(fd)
                msg.in_cgroup = True
                return pid, pidfd
            except OSError:
                self.clone_into_cgroup = False  # old kernel or seccomp: move after fork from now on
            finally:
                os.close(fd)  # in both processes: the child needs no handle on its cgroup
        return os.fork(), -1

    def _reap(self) -> None:
        for pid, status in self._exited():
            self._reaped(pid, status)
        self._kill_strays(throttled=True)

    def _exited(self) -> list[tuple[int, int]]:
        """Children that have exited, reaped; a pinned leader's zombie is left alone.

        With no leader pinned (every run in a cgroup) one waitpid(-1) per exit:
        a scan of every child per SIGCHLD would make a stop of N runs cost N^2.
        """
        found: list[tuple[int, int]] = []
        if not self.pinned:
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    return found
                if not pid:
                    return found
                found.append((pid, status))
        for pid in platform.direct_children(self.pid):
            if pid in self.pinned:
                continue  # pinned until the supervisor is done with its group
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if got:
                found.append((pid, status))
        done = {pid for pid, _ in found}
        for pid in [p for p in self.released if p in self.leaders and p not in done]:  # released, missing from the list
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                got, status = pid, 0
            if got:
                found.append((pid, status))
        return found

    def _starting_pids(self) -> set[int]:
        return {pending.pid for pending in self.starting.values()}  # at most the client's start window

    def _reaped(self, pid: int, status: int) -> None:
        if pid in self._starting_pids():
            self.early_exits[pid] = status  # told after its Started (or StartFailed)
            return
        self.released.discard(pid)
        self.pinned.discard(pid)
        run_id = self.leaders.pop(pid, None)
        if run_id is not None:
            self._send(wire.Reaped(run_id=run_id, pid=pid, status=status))

    def _kill_strays(self, throttled: bool = False) -> None:
        """SIGKILL adopted orphans that have belonged to no live run for STRAY_GRACE
        (live: until the supervisor says the run ended). `throttled`: skipped if
        the last scan is more recent than STRAY_SCAN_MIN_GAP (a stray is killed
        only after STRAY_GRACE anyway, and the idle loop scans again)."""
        now = time.monotonic()
        if throttled and now - self.strays_scanned < STRAY_SCAN_MIN_GAP:
            return
        self.strays_scanned = now
        seen: dict[int, float] = {}
        starting = self._starting_pids()
        for pid in platform.direct_children(self.pid):
            if pid in self.leaders or pid in starting or pid == self.watchdog \
                    or self._is_live_run(pid, self.live_runs):
                continue
            first = seen[pid] = self.strays.get(pid, now)
            if now - first >= STRAY_GRACE:  # still our child when signalled: the pidfd then names it
                platform.kill_checked(pid, lambda p: p in platform.direct_children(self.pid))
        self.strays = seen

    def _is_live_run(self, pid: int, live: set[str]) -> bool:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                    return True  # already exited: only to be reaped
        except OSError:
            return True
        uid = platform.process_uid(pid)
        if uid in self.run_of_uid:
            return self.run_of_uid[uid] in live
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                entries = f.read().split(b"\0")
        except OSError:
            return False
        prefix = MARKER_PREFIX
        return any(e.startswith(prefix) and e[len(prefix):].decode(errors="replace") in live for e in entries)

    # -- shutdown --------------------------------------------------------------
    def kill_everything(self) -> None:
        """SIGKILL every process below the spawner, reap them all, remove the cgroup subtree."""
        self._kill_descendants()
        self._remove_cgroups()

    def _remove_cgroups(self) -> None:
        if not (self.cgroup_root and self.home_procs):
            return
        try:
            with open(self.home_procs, "w") as f:
                f.write(str(self.pid))
        except OSError:
            return
        for dirpath, _dirs, _files in sorted(os.walk(self.cgroup_root), key=lambda e: -len(e[0])):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass

    def _kill_descendants(self) -> None:
        for cg in self.cgroups:
            try:
                with open(os.path.join(cg, "cgroup.kill"), "w") as f:
                    f.write("1")
            except OSError:
                pass
        for pid in self.leaders:
            try:
                os.killpg(pid, signal.SIGKILL)  # group pinned by the zombie leader
            except OSError:
                pass
        # Then whatever is left below us, by a walk of /proc (no psutil in this template: its
        # megabytes would be mapped, copied at every fork and unmapped at every run's death).
        for _ in range(50):
            rest = self._descendants()
            for pid, parent in rest:
                # The pidfd pins the process; the parent check proves it is still the one found
                # (a recycled pid has another parent, or is a new child of our own descendant).
                platform.kill_checked(pid, functools.partial(_has_parent, parent))
            while True:
                try:
                    got, _ = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    got = 0
                    if not rest:
                        return
                if not got:
                    break
            if not rest:
                return
            time.sleep(0.01)  # the kills take effect; orphans re-parent to us (the subreaper) to be reaped

    def _descendants(self) -> list[tuple[int, int]]:
        """(pid, parent pid) of every process below the spawner, from the children files."""
        found: list[tuple[int, int]] = []
        parents = [self.pid]
        while parents:
            parent = parents.pop()
            for child in platform.direct_children(parent):
                found.append((child, parent))
                parents.append(child)
        return found


def _has_parent(parent: int, pid: int) -> bool:
    return platform.parent_pid(pid) == parent


def main(ctrl_fd: int, isolated: bool = False) -> None:
    Spawner(ctrl_fd, isolated).serve()
    sys.exit(0)


if __name__ == "__main__":
    main(int(sys.argv[1]), len(sys.argv) > 2 and sys.argv[2] == "isolated")
