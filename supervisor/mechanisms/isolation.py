"""Isolation of runs: which layers this host gives, and each run's sandbox plan.

Every layer has a name and a verdict (as `systemd-analyze security` scores
unit directives): probed once per supervisor by forking a probe child from
the spawner that tries each step exactly as a run would (worker/sandbox.py),
so a layer is reported active only if the kernel really allowed it.

    isolation="auto"    use every layer the host gives, name the missing ones
    isolation="strict"  refuse to open unless every layer is there
    isolation="off"     runs share the supervisor's identity, namespaces and
                        environment: for trusted code only

The plan for one run (its uid, namespaces, mounts, environment) is computed
here, on the trusted side, and carried out by the run's bootstrap.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import sys
from typing import Any, Iterable

from ...ipc import framing

ISOLATION_CHOICES = ("auto", "strict", "off")
NETWORK_CHOICES = ("none", "host")

#: Host variables a run keeps, with deadstop's own (DEADSTOP_*, but never a
#: run's channel variables, which each run gets fresh); everything else in
#: the host's environment (tokens, passwords, cloud keys) never reaches it.
KEPT_ENVIRONMENT = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TERM", "TZ")
_RUN_VARIABLES = {framing.ENV_EGRESS, framing.ENV_RUN_ID, framing.ENV_GENERATION, framing.ENV_CREDENTIAL_FD,
                  framing.ENV_MARKER, "DEADSTOP_SUPERVISOR_PID"}


def _kept(name: str) -> bool:
    return name in KEPT_ENVIRONMENT or (name.startswith("DEADSTOP_") and name not in _RUN_VARIABLES)

NAMESPACES = ("mount", "network", "ipc", "uts", "cgroup")

#: Layer name -> what it stops; the README's threat model uses the same names.
LAYERS = {
    "identity": "own uid/gid per run: cannot signal, ptrace or read the supervisor, the spawner or other runs; "
                "cannot write any cgroup file; attested on every egress connection",
    "capabilities": "empty capability sets (bounding and ambient too)",
    "no-new-privileges": "setuid binaries and file capabilities grant nothing",
    "seccomp": "ptrace, process_vm_*, pidfd_getfd, kcmp, mount, bpf, perf_event_open, keyrings, kexec, "
               "modules, io_uring and new user namespaces refused",
    "namespace:mount": "private mount table: only what the run needs is visible",
    "namespace:network": "no network but its own loopback",
    "namespace:ipc": "no System V IPC or POSIX queues shared with the host",
    "namespace:uts": "own hostname",
    "namespace:cgroup": "its cgroup is the root of what it sees",
    "proc-hidepid": "/proc shows the run's own processes only",
    "clean-environment": "the host's environment variables never reach the run",
}


@dataclasses.dataclass(frozen=True)
class Layer:
    name: str
    active: bool
    detail: str  # what it stops when active, why it is missing otherwise


@dataclasses.dataclass(frozen=True)
class IsolationProfile:
    """The layers runs of one supervisor get; `sup.isolation`, and in every StopReport."""

    mode: str
    layers: tuple[Layer, ...]
    is_root: bool

    @property
    def missing(self) -> dict[str, str]:
        return {layer.name: layer.detail for layer in self.layers if not layer.active}

    @property
    def active(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.active]

    def has(self, name: str) -> bool:
        return any(layer.name == name and layer.active for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "active": self.active, "missing": self.missing}

    def __str__(self) -> str:
        if self.mode == "off":
            return "off (runs share the supervisor's identity, namespaces and environment)"
        text = ", ".join(self.active) or "none"
        if self.missing:
            text += "; missing: " + "; ".join(f"{k} ({v})" for k, v in self.missing.items())
        return text


def probe_plan(uid: int | None) -> dict[str, Any]:
    """Everything a run could get, for the spawner's probe child to try."""
    root = os.geteuid() == 0
    return {"namespaces": list(NAMESPACES), "userns": not root, "proc": root, "uid": uid if root else None,
            "gid": uid if root else None, "caps": True, "no_new_privs": True, "seccomp": True,
            "mounts": [{"op": "tmpfs", "path": "/tmp", "mode": 0o1777, "writable": True}]}


def profile_from_probe(mode: str, results: dict[str, str]) -> IsolationProfile:
    """Turn the probe child's verdicts (layer -> "" or why it failed) into a profile."""
    root = os.geteuid() == 0
    layers = []
    for name, stops in LAYERS.items():
        if mode == "off":
            layers.append(Layer(name, False, "isolation='off'"))
            continue
        why = results.get(name, "not probed")
        if name == "identity" and not root:
            why = "deadstop is not root: runs share the supervisor's uid"
        if name == "proc-hidepid" and not root:
            why = "deadstop is not root: a fresh /proc needs a PID namespace of our own"
        if name == "clean-environment":
            why = ""
        layers.append(Layer(name, not why, stops if not why else why))
    return IsolationProfile(mode, tuple(layers), root)


# -- one run's plan ----------------------------------------------------------------------------
def run_environment(extra: dict[str, str] | None, home: str) -> dict[str, str]:
    """The environment a run starts from: a few host variables, HOME, then what the caller passed."""
    env = {k: v for k, v in os.environ.items() if _kept(k)}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["HOME"] = home
    env.update(extra or {})
    return env


def spawner_environment() -> dict[str, str]:
    """The spawner's exec-time environment under isolation: runs are forked
    from it and can read their own memory, so it must hold no host secret."""
    return {k: v for k, v in os.environ.items() if _kept(k)}


def interpreter_paths() -> list[str]:
    """What a Python run needs to read: the interpreter, its prefixes, sys.path, and
    deadstop's own run-side packages (an editable install maps them from a source
    tree that need not be on sys.path)."""
    from ... import ipc, worker

    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable)),
             os.path.dirname(os.path.abspath(ipc.__file__)), os.path.dirname(os.path.abspath(worker.__file__))]
    paths += [p for p in sys.path if p]
    out = []
    for path in paths:
        path = os.path.abspath(path)
        for candidate in {path, os.path.realpath(path)}:
            if os.path.exists(candidate) and candidate not in out:
                out.append(candidate)
    return out


def can_use(path: str, uid: int, gid: int, need: int) -> bool:
    """Would `uid`/`gid` (no supplementary groups, no capabilities) get `need`
    (a mask of R_OK/W_OK/X_OK) on `path` by its mode bits?"""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if st.st_uid == uid:
        bits = (st.st_mode >> 6) & 7
    elif st.st_gid == gid:
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    return bits & need == need


def _ancestors(path: str) -> list[str]:
    """'/a/b/c' -> ['/', '/a', '/a/b'] (parents only, top first)."""
    parts = path.strip("/").split("/")
    return ["/"] + ["/" + "/".join(parts[:i]) for i in range(1, len(parts))]


class MountPlanner:
    """Works out the tmpfs covers and bind mounts that make `needed` paths
    reachable by a run's uid, bubblewrap-style, without touching the host:

    * a parent the uid cannot traverse (a 0700 home, /tmp/pytest-of-root)
      gets a tmpfs laid over it in the run's namespace, in which a skeleton of
      directories leads to each needed path, bound back from the original;
    * a private /tmp (and /dev/shm) is a tmpfs too, with the needed paths
      under it bound back the same way;
    * masks (the journal, for example) are bind-mounted over with an
      inaccessible inode, which also makes them impossible to unlink.
    """

    def __init__(self, uid: int, gid: int, covers: Iterable[tuple[str, int, bool]] = ()):
        self.uid, self.gid = uid, gid
        self.ops: list[dict[str, Any]] = []
        #: path -> ("tmpfs" | "bind", writable)
        self._mounted: dict[str, tuple[str, bool]] = {}
        for path, mode, writable in covers:
            self._add({"op": "tmpfs", "path": path, "mode": mode, "writable": writable})

    def copy(self) -> "MountPlanner":
        """A planner to extend for one run; the common part (the interpreter's paths) is computed once."""
        other = MountPlanner.__new__(MountPlanner)
        other.uid, other.gid = self.uid, self.gid
        other.ops = list(self.ops)
        other._mounted = dict(self._mounted)
        return other

    def _add(self, op: dict[str, Any]) -> None:
        self.ops.append(op)
        self._mounted[op["path"]] = (op["op"], bool(op.get("writable")))

    def _base(self, path: str) -> tuple[str | None, str | None]:
        """The deepest mount of ours above `path`: (its path, its kind), or (None, None)."""
        best: tuple[str | None, str | None] = (None, None)
        for anc in _ancestors(path):
            if anc in self._mounted:
                best = (anc, self._mounted[anc][0])
        return best

    def expose(self, path: str, writable: bool = False) -> None:
        """Make `path` reachable (and writable if asked) at the same path in the run."""
        path = os.path.abspath(path)
        if path in self._mounted:
            return
        is_dir = os.path.isdir(path)
        base, kind = self._base(path)
        if kind == "tmpfs":
            self._add({"op": "bind", "src": path, "path": path, "writable": writable, "skeleton": True,
                       "dir": is_dir})
            return
        start = base or "/"
        for anc in _ancestors(path):
            if len(anc) < len(start) or anc in self._mounted:
                continue
            if not can_use(anc, self.uid, self.gid, os.X_OK):
                self._add({"op": "tmpfs", "path": anc, "mode": 0o755, "writable": False})
                self._add({"op": "bind", "src": path, "path": path, "writable": writable, "skeleton": True,
                           "dir": is_dir})
                return
        if base is not None and writable and not self._mounted[base][1]:
            self._add({"op": "bind", "src": path, "path": path, "writable": True, "skeleton": False, "dir": is_dir})

    def reachable(self, path: str) -> bool:
        """Whether the run would reach `path` through this plan (to decide on masks)."""
        base, kind = self._base(path)
        if kind == "tmpfs" and base != path:
            return False  # hidden by our cover unless bound back
        start = base or "/"
        return all(can_use(a, self.uid, self.gid, os.X_OK) for a in _ancestors(path) if len(a) >= len(start))

    def mask(self, path: str, void_file: str, void_dir: str) -> None:
        if os.path.lexists(path) and self.reachable(path):
            self._add({"op": "bind", "src": void_dir if os.path.isdir(path) else void_file, "path": path,
                       "writable": False, "skeleton": False, "dir": os.path.isdir(path)})


@dataclasses.dataclass(frozen=True)
class Confinement:
    """What the host needs to confine one run (host/local.py provision)."""

    plan: dict[str, Any] | None  # worker/sandbox.py's input; None: no sandbox
    env: dict[str, str]
    clean_env: bool  # the run's environment is exactly `env` (plus deadstop's variables)
    cwd: str | None
    endpoint_dir: str | None  # the run's own egress endpoint lives here
    summary: dict[str, Any]  # for the StopReport


def base_planner(uid: int, gid: int, private_tmp: bool, interpreter_paths: list[str]) -> MountPlanner:
    """The mounts every run of a supervisor shares: private /dev/shm (and /tmp), the interpreter's paths.

    Computed once: run uids own no host file, so what one of them can reach
    every one of them can.
    """
    covers = [("/dev/shm", 0o1777, True)] + ([("/tmp", 0o1777, True)] if private_tmp else [])
    planner = MountPlanner(uid, gid, [c for c in covers if os.path.isdir(c[0])])
    for path in sorted(set(interpreter_paths), key=lambda q: q.count("/")):
        if os.path.isdir(path) and not can_use(path, uid, gid, os.X_OK):
            # A sys.path entry no run uid may enter (a 0700 directory holding a configuration
            # file, say): bound back it would still keep the run out, and it would shadow the
            # cover that a run's own path below it (its cwd) gets.
            continue
        planner.expose(path)
    return planner


def unreadable(paths: Iterable[str], uid: int, gid: int) -> list[str]:
    """Those of `paths` a run's uid could not read even once they are bound into its namespace
    (a bind keeps the mode: a 0700 virtual environment stays 0700)."""
    out = []
    for path in paths:
        need = os.R_OK | os.X_OK if os.path.isdir(path) else os.R_OK
        if os.path.exists(path) and not can_use(path, uid, gid, need):
            out.append(path)
    return out


def sandbox_plan(profile: IsolationProfile, run_id: str, uid: int | None, cwd: str, argv: list[str] | None,
                 network: str, base: MountPlanner, egress_dir: str | None, voids: tuple[str, str],
                 masks: list[str]) -> dict[str, Any]:
    """One run's sandbox, from the layers the host gives and what the run needs to reach
    (`egress_dir`: the directory of the socket its egress goes to)."""
    namespaces = [n for n in NAMESPACES if profile.has(f"namespace:{n}") and not (n == "network" and network == "host")]
    plan: dict[str, Any] = {
        "namespaces": namespaces, "userns": not profile.is_root and bool(namespaces),
        "hostname": f"run-{run_id}", "uid": uid, "gid": uid,
        "caps": profile.has("capabilities"), "no_new_privs": profile.has("no-new-privileges"),
        "seccomp": profile.has("seccomp"), "proc": "mount" in namespaces and profile.has("proc-hidepid"),
        "mounts": [],
    }
    if "mount" not in namespaces:
        return plan
    planner = base.copy()
    needed = []
    for arg in argv or ():
        if os.path.isabs(arg) and os.path.exists(arg):
            needed += [arg, os.path.realpath(arg)]
    if egress_dir:
        needed.append(egress_dir)
    for path in sorted(set(needed), key=lambda q: q.count("/")):
        planner.expose(path)
    planner.expose(cwd, writable=True)
    void_file, void_dir = voids
    for path in masks:
        if not _contains(path, cwd) and not any(_contains(path, n) for n in needed):
            planner.mask(path, void_file, void_dir)
    plan["mounts"] = planner.ops
    return plan


def _contains(outer: str, inner: str) -> bool:
    """Whether `inner` is `outer` or lies below it (masking `outer` would hide `inner`)."""
    outer, inner = os.path.abspath(outer), os.path.abspath(inner)
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def make_voids(runtime_dir: str) -> tuple[str, str]:
    """An inaccessible file and directory to bind over masked paths (as systemd's InaccessiblePaths=)."""
    void_file, void_dir = os.path.join(runtime_dir, "void"), os.path.join(runtime_dir, "void.d")
    os.close(os.open(void_file, os.O_CREAT | os.O_WRONLY, 0))
    os.chmod(void_file, 0)
    os.mkdir(void_dir, 0)
    os.chmod(void_dir, 0)
    return void_file, void_dir


def check_workspace(cwd: str, uid: int, gid: int) -> str:
    """Why the run's identity cannot work in `cwd` ("" when it can)."""
    if not os.path.isdir(cwd):
        return f"cwd {cwd!r} is not a directory"
    if not can_use(cwd, uid, gid, os.R_OK | os.X_OK):
        mode = stat.filemode(os.stat(cwd).st_mode)
        return (f"cwd {cwd!r} ({mode}) is not readable and searchable by the run's uid {uid}; "
                f"give it mode 0777 (or chown it to {uid}), or pass isolation='off' for trusted code")
    return ""
