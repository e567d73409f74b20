"""Run targets that attack on purpose: escape, spy, steal, signal, persist.

Each records what its attacks got (errno names, or what it read) in
`attempts.json` in its cwd, calls `ready`, then keeps proving it is alive by
appending "<who> <monotonic_ns>" lines to `alive.log` in its cwd (from every
process it made), so that a test can check that nothing of it acted after
stop() returned. Every loop is bounded: nothing here outlives LIFETIME even
if deadstop failed to stop it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import time

from deadstop.worker import egress

LIFETIME = 60.0
_libc = ctypes.CDLL(None, use_errno=True)


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def _try(fn, *args) -> str:
    """'ok' or the errno name the kernel answered with."""
    try:
        fn(*args)
        return "ok"
    except OSError as exc:
        return _errname(exc)


def _syscall(nr: int, *args: int) -> str:
    ret = _libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    return "ok" if ret >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")


def _record(attempts: dict) -> None:
    with open("attempts.json.tmp", "w") as f:
        json.dump(attempts, f)
    os.rename("attempts.json.tmp", "attempts.json")


def _ready() -> None:
    try:
        egress.call("ready")
    except egress.DeadstopError:
        pass


def _alive_forever(who: str) -> None:
    """Append a timestamped line every 5 ms until LIFETIME (then exit)."""
    end = time.monotonic() + LIFETIME
    fd = os.open("alive.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    while time.monotonic() < end:
        try:
            os.write(fd, f"{who} {time.monotonic_ns()}\n".encode())
        except OSError:
            pass
        time.sleep(0.005)
    os._exit(0)


def _fork(fn, *args) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            fn(*args)
        finally:
            os._exit(0)
    return pid


def _write_pid(procs_file: str) -> str:
    def write() -> None:
        with open(procs_file, "w") as f:
            f.write(str(os.getpid()))
    return _try(write)


# -- escapes ----------------------------------------------------------------------------------
def erase_marker() -> None:
    """Overwrite the run marker where /proc/<pid>/environ reads it: the exec-time
    environment block (env_start..env_end of /proc/self/stat), through /proc/self/mem."""
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    start, end = int(fields[47]), int(fields[48])  # fields 50 and 51 of stat(5)
    with open("/proc/self/mem", "r+b", 0) as mem:
        mem.seek(start)
        block = mem.read(end - start)
        key = b"DEADSTOP_RUN_MARKER="
        i = block.find(key)
        if i >= 0:
            j = block.index(b"\0", i)
            mem.seek(start + i + len(key))
            mem.write(b"0" * (j - i - len(key)))


def cgroup_escaper(procs_files: list[str]) -> None:
    """Write its own pid, then a child's, into other cgroups' cgroup.procs, then live on."""
    attempts = {"leader:" + p: _write_pid(p) for p in procs_files}

    def child() -> None:
        for p in procs_files:
            _write_pid(p)
        _alive_forever("child")

    _fork(child)
    _record(attempts)
    _ready()
    _alive_forever("leader")


def group_escaper() -> None:
    """setsid + marker rewrite (no exec), and an own-subreaper double fork, then live on."""
    attempts = {}

    def rewritten() -> None:
        os.setsid()
        erase_marker()  # pretend to be nobody's
        _alive_forever("rewritten")

    def subreaped() -> None:
        os.setsid()
        from deadstop.worker import platform

        platform.set_child_subreaper()
        if os.fork() == 0:
            if os.fork() == 0:
                _alive_forever("grandchild")
            os._exit(0)
        _alive_forever("subreaper")

    _fork(rewritten)
    _fork(subreaped)
    attempts["setsid"] = "ok"
    _record(attempts)
    time.sleep(0.05)  # let the forks get going before saying ready (bounded, not a sync point)
    _ready()
    _alive_forever("leader")


# -- reaching past the run ---------------------------------------------------------------------
def network_prober(port: int) -> None:
    """Connect to the host's 127.0.0.1:<port> and send a line every 5 ms; also use our own loopback."""
    attempts = {}
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=2)
        s.sendall(f"line {time.monotonic_ns()}\n".encode())
        attempts["host_loopback"] = "ok"
    except OSError as exc:
        s = None
        attempts["host_loopback"] = _errname(exc)
    try:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        c = socket.create_connection(srv.getsockname(), timeout=2)
        c.sendall(b"x")
        conn, _ = srv.accept()
        attempts["own_loopback"] = "ok" if conn.recv(1) == b"x" else "short"
    except OSError as exc:
        attempts["own_loopback"] = _errname(exc)
    # Only loopback addresses: tests never send to any other address.
    attempts["interfaces"] = json.dumps(sorted(name for _, name in socket.if_nameindex()))
    _record(attempts)
    _ready()
    end = time.monotonic() + LIFETIME
    while s is not None and time.monotonic() < end:
        try:
            s.sendall(f"line {time.monotonic_ns()}\n".encode())
        except OSError:
            break
        time.sleep(0.005)
    _alive_forever("leader")


def spy(targets: dict[str, int], paths: list[str]) -> None:
    """Signal, ptrace and read the memory of other processes; read files the run must not."""
    attempts: dict[str, str] = {}
    for name, pid in targets.items():
        attempts[f"kill0:{name}"] = _try(os.kill, pid, 0)
        attempts[f"sigstop:{name}"] = _try(os.kill, pid, 19)
        attempts[f"ptrace:{name}"] = "ok" if _libc.ptrace(16, pid, 0, 0) == 0 else \
            errno.errorcode.get(ctypes.get_errno(), "?")
        attempts[f"mem:{name}"] = _try(lambda p=pid: open(f"/proc/{p}/mem", "rb").read(1))
        attempts[f"fd:{name}"] = _try(os.listdir, f"/proc/{pid}/fd")
        attempts[f"environ:{name}"] = _try(lambda p=pid: open(f"/proc/{p}/environ", "rb").read())
        try:
            pidfd = os.pidfd_open(pid)
            attempts[f"pidfd_getfd:{name}"] = _syscall(438, pidfd, 0, 0)  # x86_64 pidfd_getfd
            os.close(pidfd)
        except OSError as exc:
            attempts[f"pidfd_getfd:{name}"] = _errname(exc)
    for path in paths:
        attempts[f"read:{path}"] = _try(lambda p=path: open(p, "rb").read(1))
        attempts[f"unlink:{path}"] = _try(os.unlink, path)
    attempts["visible_pids"] = json.dumps(sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
    attempts["own_pid"] = str(os.getpid())
    _record(attempts)
    _ready()
    _alive_forever("leader")


def privilege_prober() -> dict:
    """What privilege is left: ids, capability sets, and syscalls the filter must refuse."""
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs",
                       "Seccomp"):
                status[key] = value.split()
    out = {"status": status,
           "setuid0": _try(os.setuid, 0),
           "unshare_user": _syscall(272, 0x10000000),  # x86_64 unshare(CLONE_NEWUSER)
           "unshare_net": _syscall(272, 0x40000000),
           "mount_tmpfs": "ok" if _libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 0, None) == 0 else
           errno.errorcode.get(ctypes.get_errno(), "?"),
           "bpf": _syscall(321, 0, 0, 0),
           "perf_event_open": _syscall(298, 0, 0, -1, -1, 0),
           "keyctl": _syscall(250, 0, 0, 0),
           "process_vm_readv": _syscall(310, os.getppid(), 0, 0, 0, 0, 0),
           "io_uring_setup": _syscall(425, 1, 0),
           "chroot": _try(os.chroot, "/"),
           "hostname": socket.gethostname()}
    return out


def environment_prober(head: str, tail: str) -> dict:
    """Look for a host secret (head + tail) in the environment, the exec-time
    block and the run's whole memory. The two halves arrive apart and are
    never joined here, so finding them side by side means the secret itself
    is in the run's memory."""
    h, t = head.encode(), tail.encode()

    def holds(blob: bytes) -> bool:
        i = blob.find(h)
        while i >= 0:
            if blob[i + len(h):i + len(h) + len(t)] == t:
                return True
            i = blob.find(h, i + 1)
        return False

    found = {"os.environ": any(v.startswith(head) and v[len(head):] == tail for v in os.environ.values()),
             "proc_environ": holds(open("/proc/self/environ", "rb").read()),
             "memory": False, "env_keys": sorted(os.environ)}
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
        for line in maps:
            addr, perms = line.split()[:2]
            if not perms.startswith("r") or "[vvar" in line or "[vsyscall" in line:
                continue
            lo, hi = (int(x, 16) for x in addr.split("-"))
            try:
                mem.seek(lo)
                if holds(mem.read(hi - lo)):
                    found["memory"] = True
                    break
            except (OSError, ValueError, OverflowError):
                continue
    return found


def stolen_credential_caller(victim_id: str, victim_credential: str) -> dict:
    """Call a tool as another run with that run's real (stolen) credential."""
    import zmq

    cfg = egress._cfg()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cfg.address)
    body = json.dumps({"verb": "call", "id": 77, "tool": "whoami"}).encode()
    sock.send_multipart([b"ds1", victim_id.encode(), victim_credential.encode(), b"0", body])
    out = {"reply": None}
    if sock.poll(5000):
        frames = sock.recv_multipart()
        out["reply"] = json.loads(frames[-1])
    sock.close()
    ctx.term()
    out["own"] = egress.call("whoami")
    return out


def unattributable_orphan(procs_file: str | None) -> None:
    """A child that leaves the cgroup (if it can), its group and its marker, then
    double-forks so its grandchild is adopted by the spawner with nothing naming
    the run; the leader lives on."""

    def child() -> None:
        os.setsid()
        if procs_file:
            _write_pid(procs_file)
        erase_marker()
        if os.fork() == 0:
            with open("stray.pid.tmp", "w") as f:  # renamed into place: never seen half-written
                f.write(str(os.getpid()))
            os.rename("stray.pid.tmp", "stray.pid")
            _alive_forever("stray")
        os._exit(0)  # the grandchild is an orphan now

    _fork(child)
    _ready()
    _alive_forever("leader")
