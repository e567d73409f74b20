"""What a freshly forked run does before and around the user's code.

Order matters and is the point of this module: new session first (so the run
is its own process group), then the cgroup (so every later fork is contained),
then the parent-death signal, then the sandbox (worker/sandbox.py: namespaces,
mounts, identity, capabilities, seccomp), and only then user code. The
spawner is told the run is ready only once all of that is done; a failed
step is reported to it instead (the start fails with the step named).
Nothing in here returns: the process ends with os._exit so that no state
inherited from the spawner (atexit hooks, buffered control messages) runs
twice.
"""

from __future__ import annotations

import _signal
import inspect
import os
import signal
import sys
import traceback
from typing import Any, NoReturn

from ..ipc import framing
from ..ipc import spawner_wire as wire
from . import egress, platform, sandbox

EXIT_BOOTSTRAP_FAILED = 121
EXIT_TARGET_UNLOADABLE = 122
EXIT_EXEC_FAILED = 127
#: Signals the spawner handles and a fresh process leaves at their default (ints, made once).
_DEFAULT_DISPOSITION = (int(signal.SIGCHLD), int(signal.SIGTERM), int(signal.SIGHUP))
#: The run marker's slot in the spawner's exec-time environment, found once here, before any fork.
_MARKER_SLOT = platform.exec_env_slot(framing.ENV_MARKER)


def _contain(spec: wire.Start, spawner_pid: int) -> None:
    os.setsid()
    if spec.cgroup_procs and not spec.in_cgroup:
        # Born outside (no clone3 into the cgroup): "0" moves the writing
        # process itself; any fork from here on is inside.
        with open(spec.cgroup_procs, "w") as f:
            f.write("0")
    for procs in spec.join_cgroups or ():  # v1 controllers that enforce limits
        with open(procs, "w") as f:
            f.write("0")
    platform.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != spawner_pid:  # the spawner died before prctl took effect
        os._exit(EXIT_BOOTSTRAP_FAILED)


def _wait_go(go_fd: int) -> None:
    while True:
        try:
            os.read(go_fd, 1)
            break
        except InterruptedError:
            continue
    os.close(go_fd)


def _ready(ready_fd: int, error: str = "") -> None:
    """Tell the spawner the run is contained and confined (or why it is not)."""
    os.write(ready_fd, (b"E" + error.encode(errors="replace")[:4000]) if error else b"1")
    os.close(ready_fd)


def _reset_inherited_state(keep_fd: int | None) -> None:
    # _signal's functions, not the signal module's wrappers: those turn every handler and signal
    # they return into enum members, and each object they touch is a page the run owns a copy of.
    _signal.set_wakeup_fd(-1)
    # What a fresh Python process has: default dispositions, except SIGINT
    # (KeyboardInterrupt) and SIGPIPE (ignored); _exec_argv restores SIGPIPE.
    for sig in _DEFAULT_DISPOSITION:
        _signal.signal(sig, _signal.SIG_DFL)
    _signal.signal(_signal.SIGINT, _signal.default_int_handler)
    _signal.pthread_sigmask(_signal.SIG_SETMASK, ())
    # Drop the spawner's control socket, selector and wake-up pipe; close_range
    # makes this cheap even with a large fd limit.
    top = os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 4096
    if keep_fd is None:
        os.closerange(3, top)
    else:  # the run's credential descriptor stays
        os.closerange(3, keep_fd)
        os.closerange(keep_fd + 1, top)


def _apply_rlimits(extra: dict[str, int] | None) -> None:
    """Limits the cgroup could not enforce, as headroom above the current use."""
    if not extra:
        return
    import resource

    if "as_extra" in extra:
        with open("/proc/self/status") as f:
            vm_kb = next((int(line.split()[1]) for line in f if line.startswith("VmSize:")), 0)
        cap = vm_kb * 1024 + extra["as_extra"]
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    if "nproc_extra" in extra and os.geteuid() != 0:  # the kernel ignores RLIMIT_NPROC for root
        import psutil

        uid = os.getuid()
        mine = sum(1 for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid)
        cap = mine + extra["nproc_extra"]
        resource.setrlimit(resource.RLIMIT_NPROC, (cap, cap))


def _run_variables(spec: wire.Start) -> dict[str, str]:
    """What the run's environment adds to the spawner's (inherited by its children)."""
    env = dict(spec.env or {})
    env[framing.ENV_MARKER] = spec.run_id
    if spec.credential_fd is not None:
        env[framing.ENV_CREDENTIAL_FD] = str(spec.credential_fd)
    env[framing.ENV_RUN_ID] = spec.run_id
    env[framing.ENV_EGRESS] = spec.egress
    env[framing.ENV_GENERATION] = str(spec.generation or 0)
    if spec.supervisor_pid:
        env[egress.ENV_SUPERVISOR_PID] = str(spec.supervisor_pid)
    return env


def _exec_argv(spec: wire.Start, env: dict[str, str]) -> NoReturn:
    # The credential arrives in an inherited descriptor (a sealed memfd made
    # by the supervisor), never in the environment.
    if spec.credential_fd is not None:
        os.set_inheritable(spec.credential_fd, True)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # as subprocess's restore_signals does
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    argv = spec.argv
    assert argv, "an argv run has an argv (the supervisor checked it)"
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        os.write(2, f"deadstop: cannot exec {argv[0]!r}: {exc}\n".encode())
        os._exit(EXIT_EXEC_FAILED)


def _run_python(spec: wire.Start) -> int:
    credential = egress.read_credential(spec.credential_fd) if spec.credential_fd is not None else b""
    egress.configure(spec.egress, spec.run_id, credential, spec.generation or 0, spec.supervisor_pid)
    try:
        import cloudpickle

        target, args, kwargs = cloudpickle.loads(spec.blob)
    except BaseException as exc:  # the target's module may not import here
        _report_failure(exc, prefix="target could not be loaded in the run: ")
        return EXIT_TARGET_UNLOADABLE
    try:
        value = target(*args, **kwargs)
        if inspect.isawaitable(value):
            import asyncio

            value = asyncio.run(_await(value))
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except BaseException as exc:
        _report_failure(exc)
        return 1
    try:
        egress.report_result(value)
    except TypeError as exc:
        _report_failure(exc, prefix="the target's return value is not JSON: ")
        return 1
    except Exception:
        return 1  # revoked while reporting: the supervisor no longer listens
    return 0


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _report_failure(exc: BaseException, prefix: str = "") -> None:
    try:
        egress.report_failure(type(exc).__name__, prefix + str(exc),
                              "".join(traceback.format_exception(exc)))
    except Exception:
        pass  # revoked or supervisor gone; the exit code still says "failed"


def _confine(spec: wire.Start, spawner_pid: int, seccomp: Any) -> None:
    """The sandbox, then the cwd check that only the run's own identity can make."""
    if spec.sandbox:
        sandbox.enter(spec.sandbox, seccomp)
        # The kernel clears the parent-death signal when the uid changes: set
        # it again, and check again that the spawner did not die meanwhile.
        platform.set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != spawner_pid:
            os._exit(EXIT_BOOTSTRAP_FAILED)
    if spec.cwd:
        os.chdir(spec.cwd)


def child_main(spec: wire.Start, spawner_pid: int, ready_fd: int, seccomp: Any = None,
               go_fd: int | None = None) -> NoReturn:
    """Entry point of a forked run; called in the child right after fork().

    `go_fd`: read once after the ready byte; the spawner writes to it once it
    has told the supervisor the run started (it answers from its select loop,
    forking other runs meanwhile), so nothing the run emits can reach the
    supervisor before its `run.started`. EOF (the spawner died) goes on: the
    parent-death signal ends the run anyway.
    """
    code = EXIT_BOOTSTRAP_FAILED
    try:
        try:
            _contain(spec, spawner_pid)
            _confine(spec, spawner_pid, seccomp)
        except OSError as exc:
            _ready(ready_fd, f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
            os._exit(EXIT_BOOTSTRAP_FAILED)
        _ready(ready_fd)  # the spawner may now tell the supervisor our pid
        if go_fd is not None:
            _wait_go(go_fd)
        if spec.stdio_fd is not None:  # stdin and stdout are the supervisor's socket (an MCP server run)
            os.dup2(spec.stdio_fd, 0)
            os.dup2(spec.stdio_fd, 1)
        _reset_inherited_state(spec.credential_fd)  # handlers to default, unblock (the spawner blocked all)
        _apply_rlimits(spec.rlimits)
        platform.write_exec_env_slot(_MARKER_SLOT, spec.run_id.encode())
        added = _run_variables(spec)
        if spec.clean_env:  # nothing of the spawner's (or the host's) environment
            for name in list(os.environ):  # not os.environ.clear(): it pops until KeyError, a traceback's pages
                del os.environ[name]
        if spec.argv:
            _exec_argv(spec, {**os.environ, **added})
        for name, value in added.items():  # a handful of putenv calls, not a rebuild
            os.environ[name] = value
        code = _run_python(spec)
    except BaseException:
        try:
            traceback.print_exc()
        except Exception:
            pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)
