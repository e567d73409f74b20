"""The run's sandbox, set up in the forked child before any user code runs.

One fixed order, read top to bottom in `enter()` (as bubblewrap and nsjail
do it), each step a small function that raises on failure so the start
fails closed instead of running a half-confined run:

1. namespaces: mount, network, IPC, UTS, cgroup (and a user namespace when
   the supervisor is not root);
2. mounts: private propagation, inaccessible parents covered by a tmpfs
   with only what the run needs bound back read-only (its cwd read-write),
   a private /tmp and /dev/shm, masks over the supervisor's files, and a
   fresh /proc with hidepid=invisible (the run sees its own processes only);
3. loopback up (the run's own 127.0.0.1; the host's network is gone);
4. identity: no supplementary groups, the run's own gid and uid;
5. capabilities: bounding and ambient sets dropped, then every set emptied,
   verified against what the kernel reports;
6. no-new-privileges;
7. the seccomp filter, last, so that the steps above may still use the
   syscalls it denies.

The plan (which namespaces, which mounts, which uid) is computed by the
supervisor (supervisor/mechanisms/isolation.py) and arrives in the start message; this
module only carries it out. Nothing here imports beyond the standard library
and worker.platform, so a run pays for no import it does not need.
"""

from __future__ import annotations

import os
from typing import Any

from . import platform as p

NAMESPACE_FLAGS = {
    "mount": p.CLONE_NEWNS,
    "network": p.CLONE_NEWNET,
    "ipc": p.CLONE_NEWIPC,
    "uts": p.CLONE_NEWUTS,
    "cgroup": p.CLONE_NEWCGROUP,
}


CAP_SETPCAP = 8


class SandboxError(OSError):
    """A sandbox step failed; the run must not start."""


def enter(plan: dict[str, Any], seccomp: Any | None) -> None:
    """Confine the calling process as `plan` says; raise SandboxError naming the step."""
    for name, step in (("user namespace", _user_namespace), ("namespaces", _namespaces),
                       ("mounts", _mounts), ("loopback", _loopback), ("identity", _identity),
                       ("capabilities", _capabilities), ("no-new-privileges", _no_new_privs)):
        try:
            step(plan)
        except OSError as exc:
            raise SandboxError(exc.errno, f"sandbox step {name!r} failed: {exc.strerror or exc}") from None
    if seccomp is not None and plan.get("seccomp"):
        try:
            from . import seccomp_filter

            seccomp_filter.load(seccomp)
        except Exception as exc:  # libseccomp raises OSError or RuntimeError
            raise SandboxError(getattr(exc, "errno", None) or 1, f"sandbox step 'seccomp' failed: {exc}") from None


# -- 1. namespaces ---------------------------------------------------------------------
def _user_namespace(plan: dict[str, Any]) -> None:
    """Unprivileged supervisor: a user namespace mapping only our own ids, so
    the steps below (mount, network) are allowed inside it and nowhere else."""
    if not plan.get("userns"):
        return
    uid, gid = os.geteuid(), os.getegid()
    p.prctl(p.PR_SET_DUMPABLE, 1)  # the spawner is not: its children's /proc/self files would be root's
    p.unshare(p.CLONE_NEWUSER)
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")


def _namespaces(plan: dict[str, Any]) -> None:
    flags = 0
    for name in plan.get("namespaces", ()):
        flags |= NAMESPACE_FLAGS[name]
    netns = plan.get("netns_fd")
    if netns is not None and flags & p.CLONE_NEWNET:
        p.setns(netns, p.CLONE_NEWNET)  # made ahead by the spawner, loopback up (NetnsPool)
        os.close(netns)
        flags &= ~p.CLONE_NEWNET
    if flags:
        p.unshare(flags)
    if "uts" in plan.get("namespaces", ()):
        p.sethostname(plan.get("hostname") or "deadstop-run")


# -- 2. mounts ---------------------------------------------------------------------------
def _mounts(plan: dict[str, Any]) -> None:
    """Carry out the supervisor's mount plan in this (new) mount namespace.

    Every bind source is opened (O_PATH) before anything is mounted, because
    a tmpfs laid over a parent hides the originals; binds then go through
    /proc/self/fd/N, which still names them.
    """
    if "mount" not in plan.get("namespaces", ()):
        return
    ops: list[dict[str, Any]] = plan.get("mounts", [])
    sources: dict[str, int] = {}
    try:
        for op in ops:
            src = op.get("src")
            if src is not None and src not in sources:
                sources[src] = os.open(src, os.O_PATH | os.O_CLOEXEC)
        p.mount(None, "/", None, p.MS_REC | p.MS_PRIVATE)
        covers: list[str] = []
        for op in ops:
            if op["op"] == "tmpfs":
                _tmpfs(op["path"], op.get("mode", 0o755), bool(op.get("writable")))
                if not op.get("writable"):
                    covers.append(op["path"])
            else:
                _bind(sources[op["src"]], op["path"], op.get("skeleton", False), op.get("writable", False),
                      op.get("dir", True))
        for path in covers:  # skeletons done: nobody writes into them any more
            p.mount(None, path, None, p.MS_REMOUNT | p.MS_RDONLY | p.MS_NOSUID | p.MS_NODEV)
    finally:
        for fd in sources.values():
            os.close(fd)
    if plan.get("proc"):
        p.mount("proc", "/proc", "proc", p.MS_NOSUID | p.MS_NODEV | p.MS_NOEXEC, "hidepid=invisible")


def _tmpfs(path: str, mode: int, writable: bool) -> None:
    # A skeleton holds directories and mount points only; a private /tmp or
    # /dev/shm gets the kernel's default size, its pages charged to the run's
    # memory cgroup like any other memory of it.
    p.mount("tmpfs", path, "tmpfs", p.MS_NOSUID | p.MS_NODEV, f"mode={mode:o}" + ("" if writable else ",size=4m"))


def _bind(fd: int, dst: str, skeleton: bool, writable: bool, is_dir: bool) -> None:
    if skeleton:  # inside a tmpfs of ours: make the mount point (never on a host filesystem)
        os.makedirs(dst if is_dir else os.path.dirname(dst), mode=0o755, exist_ok=True)
        if not is_dir and not os.path.exists(dst):
            os.close(os.open(dst, os.O_CREAT | os.O_WRONLY, 0o644))
    p.mount(f"/proc/self/fd/{fd}", dst, None, p.MS_BIND | p.MS_REC)
    if not writable:
        p.mount(None, dst, None, p.MS_REMOUNT | p.MS_BIND | p.MS_RDONLY | p.MS_NOSUID | p.MS_NODEV)


# -- 3. network -----------------------------------------------------------------------------
def _loopback(plan: dict[str, Any]) -> None:
    if "network" in plan.get("namespaces", ()) and plan.get("netns_fd") is None:
        p.loopback_up()


# -- 4. identity ------------------------------------------------------------------------------
def _identity(plan: dict[str, Any]) -> None:
    uid, gid = plan.get("uid"), plan.get("gid")
    if uid is None or gid is None:
        return
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    p.prctl(p.PR_CAP_AMBIENT, p.PR_CAP_AMBIENT_CLEAR_ALL)
    if plan.get("caps") and not plan.get("bounding_empty"):
        p.drop_bounding_set()  # needs CAP_SETPCAP: before the uid change takes it away
    os.setresuid(uid, uid, uid)
    # The uid change made us non-dumpable, which would leave the run's own
    # /proc/self files owned by root and unreadable to the run itself (as an
    # exec would undo anyway). Other uids still cannot ptrace or read it.
    p.prctl(p.PR_SET_DUMPABLE, 1)


# -- 5. capabilities ----------------------------------------------------------------------------
def _capabilities(plan: dict[str, Any]) -> None:
    if not plan.get("caps"):
        return
    if plan.get("uid") is None:  # no identity change: what we still hold, we drop here
        if not plan.get("bounding_empty") and p.capabilities_held().get("CapEff", 0) & (1 << CAP_SETPCAP):
            p.drop_bounding_set()
        p.prctl(p.PR_CAP_AMBIENT, p.PR_CAP_AMBIENT_CLEAR_ALL)
    p.clear_capabilities()
    # An unprivileged process that never held CAP_SETPCAP cannot shrink its
    # bounding set; with no permitted capabilities and no-new-privileges it
    # can never use it either, so only the other sets are checked.
    left = p.capabilities_held()
    if left:
        raise OSError(1, f"capabilities left after dropping them all: {left}")


# -- 6. no new privileges ----------------------------------------------------------------------------
def _no_new_privs(plan: dict[str, Any]) -> None:
    if plan.get("no_new_privs"):
        p.prctl(p.PR_SET_NO_NEW_PRIVS, 1)


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def probe(plan: dict[str, Any], seccomp: Any | None) -> dict[str, str]:
    """Try every step of `enter` as a run would; layer name -> "" or why it failed.

    Runs in a throw-away child of the spawner: it changes the calling
    process for good.
    """
    out: dict[str, str] = {}

    def attempt(names: list[str], fn: Any, *args: Any) -> bool:
        try:
            fn(*args)
        except Exception as exc:  # OSError mostly; report whatever the kernel said
            for name in names:
                out.setdefault(name, str(exc) or type(exc).__name__)
            return False
        for name in names:
            out.setdefault(name, "")
        return True

    ns_layers = [f"namespace:{n}" for n in plan.get("namespaces", ())]
    if plan.get("userns") and not attempt([], _user_namespace, plan):
        for name in ns_layers:
            out[name] = "unprivileged user namespaces are not available"
    if not attempt(ns_layers, _namespaces, plan):
        out = {k: v for k, v in out.items() if k not in ns_layers}
        for n in plan.get("namespaces", ()):  # which of them is refused?
            attempt([f"namespace:{n}"], p.unshare, NAMESPACE_FLAGS[n])
    if not out.get("namespace:network"):
        attempt(["namespace:network"], p.loopback_up)
    if not out.get("namespace:mount"):
        attempt(["namespace:mount"], _mounts, {**plan, "proc": False})
        if plan.get("proc"):
            attempt(["proc-hidepid"], p.mount, "proc", "/proc", "proc",
                    p.MS_NOSUID | p.MS_NODEV | p.MS_NOEXEC, "hidepid=invisible")
    else:
        out["proc-hidepid"] = "needs a mount namespace"
    if plan.get("uid") is not None:
        attempt(["identity"], _identity, plan)
    attempt(["capabilities"], _capabilities, plan)
    attempt(["no-new-privileges"], _no_new_privs, plan)
    if seccomp is None:
        out["seccomp"] = "libseccomp (pyseccomp) is not usable in the spawner"
    else:
        from . import seccomp_filter

        attempt(["seccomp"], seccomp_filter.load, seccomp)
    return out


class NetnsPool:
    """Network namespaces made ahead of time, loopback already up.

    A new network namespace and its loopback cost a run ~0.9 ms of its start
    (measured), most of it in the kernel bringing `lo` up. The spawner makes a
    few while it is idle (it enters one, opens it, and returns to its own),
    and each isolated run enters one with setns(). Each namespace is handed
    to exactly one run: the spawner closes its descriptor right after the
    fork, so when that run ends the namespace goes with it. Root only: an
    unprivileged spawner's runs make theirs inside their user namespace.
    """

    SIZE = 8

    def __init__(self) -> None:
        self._own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._ready: list[int] = []
        self.broken = ""

    @property
    def wants_more(self) -> bool:
        return not self.broken and len(self._ready) < self.SIZE

    def fill_one(self) -> None:
        try:
            p.unshare(p.CLONE_NEWNET)
        except OSError as exc:
            self.broken = str(exc)
            return
        try:
            p.loopback_up()
            self._ready.append(os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
        except OSError as exc:
            self.broken = str(exc)
        finally:
            # Never stay in it: runs with network="host" inherit ours.
            p.setns(self._own, p.CLONE_NEWNET)

    def take(self) -> int | None:
        return self._ready.pop() if self._ready else None

    def take_now(self) -> int | None:
        """A namespace now: one made ahead, else one made on the spot."""
        if not self._ready and not self.broken:
            self.fill_one()
        return self.take()

    def listen_inside(self, netns: int, port: int) -> int:
        """A TCP listener on 127.0.0.1:port inside `netns` (its loopback is the run's own).

        The spawner enters the namespace only for the socket() call: a socket
        belongs to the namespace it was made in for its whole life, wherever
        its descriptor goes, so the supervisor can serve it from its own.
        """
        import socket

        p.setns(netns, p.CLONE_NEWNET)
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            p.setns(self._own, p.CLONE_NEWNET)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        return sock.detach()
