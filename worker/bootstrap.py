"""What a freshly forked run does before and around the user's code.

Order matters and is the point of this module: new session first (so the run
is its own process group), then the cgroup (so every later fork is contained),
then the parent-death signal, and only then user code. Nothing in here
returns: the process ends with os._exit so that no state inherited from the
spawner (atexit hooks, buffered control messages) runs twice.
"""

from __future__ import annotations

import fcntl
import inspect
import os
import signal
import sys
import traceback
from typing import Any, NoReturn

from ipc import framing
from worker import egress, platform

EXIT_BOOTSTRAP_FAILED = 121
EXIT_TARGET_UNLOADABLE = 122
EXIT_EXEC_FAILED = 127


class StartSpec:
    """Everything a run needs, as sent by the supervisor through the spawner."""

    __slots__ = ("run_id", "blob", "argv", "env", "cwd", "cgroup_procs", "in_cgroup", "rlimits", "credential",
                 "generation", "egress", "supervisor_pid")

    def __init__(self, msg: dict[str, Any]):
        for name in self.__slots__:
            setattr(self, name, msg.get(name))


def _contain(spec: StartSpec, spawner_pid: int, ready_fd: int) -> None:
    os.setsid()
    if spec.cgroup_procs and not spec.in_cgroup:
        # Born outside (no clone3 into the cgroup): "0" moves the writing
        # process itself; any fork from here on is inside.
        with open(spec.cgroup_procs, "w") as f:
            f.write("0")
    platform.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != spawner_pid:  # the spawner died before prctl took effect
        os._exit(EXIT_BOOTSTRAP_FAILED)
    os.write(ready_fd, b"1")  # the spawner may now tell the supervisor our pid
    os.close(ready_fd)


def _reset_inherited_state() -> None:
    signal.set_wakeup_fd(-1)
    # What a fresh Python process has: default dispositions, except SIGINT
    # (KeyboardInterrupt) and SIGPIPE (ignored); _exec_argv restores SIGPIPE.
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    # Drop the spawner's control socket, selector and wake-up pipe; close_range
    # makes this cheap even with a large fd limit.
    os.closerange(3, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 4096)


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


def _run_variables(spec: StartSpec) -> dict[str, str]:
    """What the run's environment adds to the spawner's (inherited by its children)."""
    env = dict(spec.env or {})
    env[framing.ENV_MARKER] = spec.run_id
    env[framing.ENV_RUN_ID] = spec.run_id
    env[framing.ENV_EGRESS] = spec.egress
    env[framing.ENV_GENERATION] = str(spec.generation or 0)
    if spec.supervisor_pid:
        env[egress.ENV_SUPERVISOR_PID] = str(spec.supervisor_pid)
    return env


def _credential_fd(credential: bytes) -> int:
    """An inheritable descriptor holding the credential: a sealed memfd where
    the platform has one (re-readable with pread by the run's children), else
    a pipe (readable once)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("deadstop-credential", os.MFD_ALLOW_SEALING)
        os.write(fd, credential)
        os.lseek(fd, 0, os.SEEK_SET)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    else:
        fd, w = os.pipe()
        os.write(w, credential)
        os.close(w)
    os.set_inheritable(fd, True)
    return fd


def _exec_argv(spec: StartSpec, env: dict[str, str]) -> NoReturn:
    # The credential goes through an inherited descriptor, never the
    # environment: /proc/<pid>/environ is readable by every process of the user.
    env[framing.ENV_CREDENTIAL_FD] = str(_credential_fd(spec.credential))
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # as subprocess's restore_signals does
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        if spec.cwd:
            os.chdir(spec.cwd)
        os.execvpe(spec.argv[0], spec.argv, env)
    except OSError as exc:
        os.write(2, f"deadstop: cannot exec {spec.argv[0]!r}: {exc}\n".encode())
        os._exit(EXIT_EXEC_FAILED)


def _run_python(spec: StartSpec) -> int:
    egress.configure(spec.egress, spec.run_id, spec.credential, spec.generation or 0, spec.supervisor_pid)
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


def child_main(msg: dict[str, Any], spawner_pid: int, ready_fd: int) -> NoReturn:
    """Entry point of a forked run; called in the child right after fork()."""
    code = EXIT_BOOTSTRAP_FAILED
    try:
        spec = StartSpec(msg)
        _contain(spec, spawner_pid, ready_fd)
        _reset_inherited_state()  # handlers to default, then unblock (the spawner blocked all across fork)
        _apply_rlimits(spec.rlimits)
        platform.rewrite_exec_env(framing.ENV_MARKER, spec.run_id)
        added = _run_variables(spec)
        if spec.argv:
            _exec_argv(spec, {**os.environ, **added})
        for name, value in added.items():  # a handful of putenv calls, not a rebuild
            os.environ[name] = value
        if spec.cwd:
            os.chdir(spec.cwd)
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
