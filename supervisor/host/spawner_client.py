"""The supervisor's side of the spawner (see worker/spawner.py).

The spawner is a fresh interpreter exec'd with an explicit environment, not a
`multiprocess.Process`: a Process started with "spawn" re-imports the host's
__main__ module in the child and starts a resource-tracker process beside
the host, and "fork" would copy the host's threads' locks; an embedded
executor may do none of that to its host application. multiprocess still
carries the control channel: its Connection frames every message and its
reduction.sendfds/recvfds hand each run's pidfd over SCM_RIGHTS.
"""

from __future__ import annotations

import asyncio
import os
import queue
import socket
import struct
import threading
import sys
from typing import Any, Callable

import subprocess

from multiprocess import reduction
from multiprocess.connection import Connection

from ...ipc import framing
from ...ipc import spawner_wire as wire

from ..mechanisms.cgroups import Cgroup
from ..errors import DeadstopError



#: Longest the spawner may take to answer a start or a probe. A start is a
#: fork plus the sandbox set-up (milliseconds); a spawner silent this long is
#: stopped or wedged, and is treated as lost: every run is killed through
#: its cgroup and no new run starts.
ANSWER_TIMEOUT = 10.0
#: Starts sent to the spawner and not yet answered, at most. The spawner forks them one after another;
#: more in flight gains nothing, and a burst of hundreds would fill the socket both ways while this
#: loop is blocked writing the next one (found by benchmarks/scale_latency.py at 500 concurrent starts).
START_WINDOW = 16


class SpawnerLost(DeadstopError):
    """The spawner process died or stopped answering; no run can be started or reaped through it."""


class Started:
    __slots__ = ("pid", "create_time", "pidfd", "proxy_fd")

    def __init__(self, pid: int, create_time: float, pidfd: int | None, proxy_fd: int | None = None):
        self.pid = pid
        self.create_time = create_time
        self.pidfd = pidfd
        self.proxy_fd = proxy_fd  # a listener inside the run's network namespace (a proxied run)


class SpawnerClient:
    def __init__(self, loop: asyncio.AbstractEventLoop, pid: int, sock: socket.socket):
        self.loop = loop
        self.pid = pid
        self.sock = sock
        self.conn = Connection(os.dup(sock.fileno()))
        self.subreaper = False
        self.alive = True
        self._ready: asyncio.Future = loop.create_future()
        self._starts: dict[str, asyncio.Future] = {}
        self._start_slots = asyncio.Semaphore(START_WINDOW)
        self._probe: asyncio.Future | None = None
        self.lost_reason = ""
        self.answer_timeout = ANSWER_TIMEOUT
        self._reaps: dict[int, asyncio.Future] = {}
        self.on_lost: Any = None
        self.proc: subprocess.Popen[bytes] | None = None  # set by launch()
        self.pidfd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
        # A stopped spawner must not wedge the event loop in a blocking write
        # of a large start message: the write fails instead, and the spawner
        # is declared lost like one that stopped answering.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(ANSWER_TIMEOUT), 0))
        # The loop never blocks writing to the spawner: what does not fit in the socket at once is written
        # by a thread of its own, in order. A burst (a thousand Ended at one stop_all) filling the socket
        # while the spawner's replies fill the other way would otherwise block the loop that must read
        # those replies (found at 1,000 runs).
        self._outbox: queue.SimpleQueue[tuple[bytes, list[int]] | None] = queue.SimpleQueue()
        self._write_lock = threading.Lock()
        self._pending = 0  # items queued for the writer and not yet written: nothing may overtake them
        self._writer = threading.Thread(target=self._write_forever, name=f"deadstop-spawner-{pid}-writer",
                                        daemon=True)
        self._writer.start()
        loop.add_reader(self.conn.fileno(), self._readable)
        # The spawner's death is seen on its pidfd, not as EOF on the socket:
        # its watchdog holds the spawner's end open (worker/watchdog.py).
        if self.pidfd is not None:
            loop.add_reader(self.pidfd, self._lost)

    @classmethod
    async def launch(cls, cgroup: Cgroup | None = None, env: dict[str, str] | None = None,
                     isolated: bool = False) -> "SpawnerClient":
        """Start the spawner; `env` is its whole exec-time environment (default: ours)."""
        loop = asyncio.get_running_loop()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fd = child.fileno()
        paths = [p for p in sys.path]
        code = (f"import sys; sys.path[:0] = {paths!r}; "
                f"from deadstop.worker.spawner import main; main({fd}, {isolated!r})")
        env = dict(os.environ if env is None else env)
        # Fixed-width slot each forked run overwrites with its id (worker.platform.exec_env_slot).
        env[framing.ENV_MARKER] = "-" * framing.RUN_ID_CHARS
        try:
            proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=[fd], env=env, close_fds=True)
        finally:
            child.close()
        pid = proc.pid
        if cgroup is not None:
            cgroup.write("cgroup.procs", str(pid))
        client = cls(loop, pid, parent)
        client.proc = proc
        try:
            msg = await asyncio.wait_for(client._ready, 30)
        except BaseException:
            proc.kill()
            proc.wait()
            client._lost()
            raise
        client.subreaper = msg.subreaper
        return client

    # -- requests --------------------------------------------------------------
    def _send(self, msg: Any, fds: list[int] | None = None) -> None:
        """Send a message, and descriptors that follow it, without ever blocking the loop.

        It goes straight out when the socket has room and nothing is queued
        before it (the usual case: no thread hop); whatever does not fit is
        queued, descriptors duplicated, for the writer thread, which sends it
        in order and blocking.
        """
        if not self.alive:
            raise SpawnerLost(self.lost_reason or f"spawner (pid {self.pid}) is gone")
        body = wire.encode(msg)
        frame = struct.pack("!i", len(body)) + body  # multiprocess Connection framing (messages < 2 GiB)
        wanted = list(fds or [])
        with self._write_lock:
            if not self._pending:
                try:
                    sent = self.sock.send(frame, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    self.declare_lost(f"spawner (pid {self.pid}) stopped reading its control socket ({exc})")
                    raise SpawnerLost(self.lost_reason) from None
                frame = frame[sent:]
                if not frame and wanted:
                    try:
                        socket.send_fds(self.sock, [bytes([len(wanted)])], wanted, socket.MSG_DONTWAIT)
                        wanted = []
                    except BlockingIOError:
                        pass
                if not frame and not wanted:
                    return
            self._pending += 1
            self._outbox.put((frame, [os.dup(fd) for fd in wanted]))

    def _write_forever(self) -> None:
        """The writer thread: what did not fit at once, in order, blocking, until told to stop or a write fails."""
        while True:
            item = self._outbox.get()
            if item is None:
                return
            frame, fds = item
            try:
                if frame:
                    self.sock.sendall(frame)
                if fds:
                    reduction.sendfds(self.sock, fds)
            except OSError as exc:
                why = f"spawner (pid {self.pid}) stopped reading its control socket ({exc})"
                try:
                    self.loop.call_soon_threadsafe(self.declare_lost, why)
                except RuntimeError:
                    pass  # the loop is closed: nobody is left to tell
                self._drain_outbox()
                return
            finally:
                for fd in fds:
                    os.close(fd)
                with self._write_lock:
                    self._pending -= 1

    def _drain_outbox(self) -> None:
        while True:
            try:
                item = self._outbox.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                for fd in item[1]:
                    os.close(fd)

    def _stop_writer(self) -> None:
        self._outbox.put(None)
        if self._writer.is_alive() and threading.current_thread() is not self._writer:
            self._writer.join(ANSWER_TIMEOUT + 1)

    def configure(self, config: wire.Config) -> None:
        """Tell the spawner what it must clean up should the supervisor die."""
        self._send(config)

    async def start(self, msg: wire.Start, credential_fd: int | None = None, stdio_fd: int | None = None, *,
                    still_wanted: Callable[[], bool] | None = None) -> Started:
        """Fork a run; `credential_fd` (a sealed memfd) and `stdio_fd` go to it over SCM_RIGHTS.

        `still_wanted` is asked once a start slot is free: a start given up while it queued for one
        (a cancelled caller, a stop_all) fails there, and the spawner never forks it.
        """
        async with self._start_slots:
            if still_wanted is not None and not still_wanted():
                raise DeadstopError(f"start of run {msg.run_id} given up before the spawner was asked")
            fut = self.loop.create_future()
            self._starts[msg.run_id] = fut
            fds = [fd for fd in (credential_fd, stdio_fd) if fd is not None]
            msg.fds = len(fds)
            msg.stdio = stdio_fd is not None
            try:
                self._send(msg, fds)
                return await self._answer(fut, f"start of run {msg.run_id}")
            finally:
                self._starts.pop(msg.run_id, None)

    def run_ended(self, run_id: str) -> None:
        """The run's stop is complete: from now on the spawner kills any orphan of it it adopts."""
        if self.alive:
            try:
                self._send(wire.Ended(run_id=run_id))
            except SpawnerLost:
                pass

    async def probe(self, plan: dict[str, Any]) -> dict[str, str]:
        """Have a throw-away child try every sandbox step; layer -> "" or why it failed."""
        fut = self._probe = self.loop.create_future()
        self._send(wire.Probe(plan=plan))
        return await self._answer(fut, "isolation probe")

    async def _answer(self, fut: asyncio.Future, what: str) -> Any:
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.answer_timeout)
        except asyncio.TimeoutError:
            self.declare_lost(f"spawner (pid {self.pid}) did not answer the {what} within {self.answer_timeout:g} s")
            raise SpawnerLost(f"spawner (pid {self.pid}) stopped answering ({what}); "
                              "its runs are being killed through their cgroups") from None

    def declare_lost(self, why: str) -> None:
        """Give up on a spawner that no longer answers: SIGKILL it and fail everything pending."""
        if self.pidfd is not None:
            try:
                import signal

                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except OSError:
                pass
        self._lost(why)

    def _reap_future(self, pid: int) -> asyncio.Future:
        fut = self._reaps.get(pid)
        if fut is None:
            fut = self._reaps[pid] = self.loop.create_future()
        return fut

    async def release(self, pid: int, pinned: bool = True) -> int:
        """Let the spawner reap a run leader (if it holds it); returns its wait status."""
        fut = self._reap_future(pid)
        if pinned and not fut.done() and not getattr(fut, "release_sent", False):
            fut.release_sent = True  # type: ignore[attr-defined]
            self._send(wire.Release(pid=pid))
        try:
            return await fut
        finally:
            self._reaps.pop(pid, None)

    # -- replies ------------------------------------------------------------------
    def _readable(self) -> None:
        try:
            raw = self.conn.recv_bytes()
        except (EOFError, OSError):
            self._lost()
            return
        msg = wire.decode_from_spawner(raw)
        if isinstance(msg, wire.Ready):
            if not self._ready.done():
                self._ready.set_result(msg)
        elif isinstance(msg, wire.Started):
            count = int(msg.has_pidfd) + int(msg.has_proxy)
            fds = reduction.recvfds(self.sock, count) if count else []
            pidfd = fds.pop(0) if msg.has_pidfd else None
            proxy_fd = fds.pop(0) if msg.has_proxy else None
            fut = self._starts.get(msg.run_id)
            if fut is not None and not fut.done():
                fut.set_result(Started(msg.pid, msg.create_time, pidfd, proxy_fd))
            else:
                for fd in (pidfd, proxy_fd):
                    if fd is not None:
                        os.close(fd)
        elif isinstance(msg, wire.Probed):
            if self._probe is not None and not self._probe.done():
                self._probe.set_result(msg.results)
        elif isinstance(msg, wire.StartFailed):
            fut = self._starts.get(msg.run_id)
            if fut is not None and not fut.done():
                fut.set_exception(DeadstopError(f"spawner could not start run {msg.run_id}: {msg.error}"))
        elif isinstance(msg, wire.Reaped):
            fut = self._reap_future(msg.pid)
            if not fut.done():
                fut.set_result(msg.status)

    def _lost(self, why: str = "") -> None:
        if not self.alive:
            return
        self.alive = False
        self.lost_reason = why or f"spawner (pid {self.pid}) exited"
        self.loop.remove_reader(self.conn.fileno())
        if self.pidfd is not None:
            self.loop.remove_reader(self.pidfd)
        err = SpawnerLost(self.lost_reason)
        pending = [self._ready, *self._starts.values(), *self._reaps.values()]
        if self._probe is not None:
            pending.append(self._probe)
        for fut in pending:
            if not fut.done():
                fut.set_exception(err)
        self._reaps.clear()
        self._outbox.put(None)  # the writer thread ends after what is queued (or at its first failed write)
        if self.on_lost is not None:
            self.on_lost()

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Ask the spawner to kill what is left and exit; reap it."""
        if self.alive:
            try:
                self._send(wire.Shutdown())
            except (OSError, SpawnerLost):
                pass
            # From here its exit is expected, not a loss: stop watching for one.
            self.alive = False
            self.loop.remove_reader(self.conn.fileno())
            if self.pidfd is not None:
                self.loop.remove_reader(self.pidfd)
        if self.pidfd is not None:
            from ..mechanisms.procs import wait_pidfd

            if not await wait_pidfd(self.pidfd, timeout):
                try:
                    import signal

                    signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                except OSError:
                    pass
                await wait_pidfd(self.pidfd, 5)
            os.close(self.pidfd)
            self.pidfd = None
        if self.proc is not None:
            self.proc.wait()
        self._stop_writer()
        self.conn.close()
        self.sock.close()
