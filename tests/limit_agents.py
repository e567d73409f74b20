"""Session agents for the limits, recovery and cleanup tests (not test_sessions.py's).

Each is called inside a run as ``agent(message, **context)``. Agents that
need the test to wait for them call the `ready` tool (a waiting.Countdown)
once they are set up; the tests never sleep to synchronise.
"""

from __future__ import annotations

import os
import signal
import time

from deadstop.worker import egress


def _ready() -> None:
    try:
        egress.call("ready")
    except egress.DeadstopError:
        pass


def call_until_refused(message: dict, **context) -> int:
    """Call message["tool"] up to message["n"] times. On the first refusal, write
    "<class> <code> <index>" to message["out"] and exit at once.

    SIGTERM is ignored so the refusal is always on record before the run
    ends: the stop that follows the refusal then ends by the run's own exit.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for i in range(message["n"]):
        try:
            egress.call(message["tool"])
        except Exception as exc:
            line = f"{type(exc).__name__} {int(getattr(exc, 'code', 0))} {i}\n"
            fd = os.open(message["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, line.encode())
            os.fsync(fd)
            os.close(fd)
            os._exit(0)
    return message["n"]


def call_until_refused_then_sleep(message: dict, **context) -> None:
    """Call message["tool"] until one call is refused, create message["out"], then sleep until stopped."""
    while True:
        try:
            egress.call(message["tool"])
        except egress.DeadstopError:
            break
    os.close(os.open(message["out"], os.O_WRONLY | os.O_CREAT, 0o644))
    while True:
        time.sleep(1)


def ready_then_sleep(message, **context) -> None:
    """Say ready, then sleep until stopped."""
    _ready()
    while True:
        time.sleep(1)


def sleep_forever(message, **context) -> None:
    while True:
        time.sleep(1)


def _sleep_in_steps(seconds: float, step: float = 0.01) -> None:
    # Short steps: a freeze in the middle of one step costs at most one step,
    # whereas one long sleep would run out its time while frozen.
    for _ in range(int(round(seconds / step))):
        time.sleep(step)


def sleep_pause_point_sleep(message: dict, **context) -> str:
    """Sleep message["before"] s, call `ready` (the test pauses the session
    there), sleep message["after"] s, return "done"."""
    _sleep_in_steps(message["before"])
    egress.call("ready")
    _sleep_in_steps(message["after"])
    return "done"


def busy_loop(message, **context) -> None:
    _ready()
    x = 0
    while True:
        x += 1


def allocate(message: dict, **context) -> None:
    """Allocate and touch message["step_mb"] MiB at a time up to message["max_mb"],
    holding all of it; on MemoryError keep what was allocated. Then sleep."""
    held = []
    step = message["step_mb"] << 20
    try:
        for _ in range(message["max_mb"] // message["step_mb"]):
            block = bytearray(step)
            for off in range(0, step, 4096):  # touch every page: resident, not just mapped
                block[off] = 1
            held.append(block)
            time.sleep(0.02)
    except MemoryError:
        pass
    while True:
        time.sleep(1)


def fork_sleepers(message: dict, **context) -> None:
    """Fork message["children"] children that sleep forever, then sleep."""
    for _ in range(message["children"]):
        try:
            pid = os.fork()
        except OSError:  # a pids limit refused the fork: fine, we are over it anyway
            break
        if pid == 0:
            while True:
                time.sleep(1)
    while True:
        time.sleep(1)


def tree_session(message: str, **context) -> None:
    """behaviours.tree with 5 children, each with a grandchild."""
    import behaviours

    behaviours.tree(message, 5)


def escaper_session(message: str, **context) -> None:
    """behaviours.setsid_escaper: a setsid grandchild that ignores SIGTERM."""
    import behaviours

    behaviours.setsid_escaper(message)


def use_llm(message: str, **context) -> str:
    """One `llm` tool call (which reports tokens), then return the message in upper case."""
    egress.call("llm")
    return message.upper()


def use_llm_then_sleep(message, **context) -> None:
    """One `llm` call, say ready, then sleep until stopped."""
    egress.call("llm")
    _ready()
    while True:
        time.sleep(1)


def report_tokens(message: dict, **context) -> int:
    """One `llm` call that reports message["tokens"] tokens; returns that number."""
    egress.call("llm", message["tokens"])
    return message["tokens"]


def report_tokens_then_sleep(message: dict, **context) -> None:
    """One `llm` call reporting message["tokens"] tokens, say ready, sleep until stopped."""
    egress.call("llm", message["tokens"])
    _ready()
    while True:
        time.sleep(1)


def spawn_child(message: dict, **context) -> str:
    """Spawn a sub-agent session of agent message["agent"] and return its key; the child outlives this run."""
    return egress.call("sessions.spawn", message["agent"], message["message"])["key"]


# -- hostile runs against kernel-enforced limits (test_kernel_limits.py) -----------------
# Each one is bounded in count, size and time by itself, whatever enforces the limit.

def fork_bomb(message: dict, **context) -> None:
    """Every process forks as fast as it can until message["seconds"] have passed
    since the bomb started; a child exits message["life"] s after its birth. At
    most message["cap"] forks in all (a shared counter), then the leader sleeps
    until stopped (bounded too)."""
    import mmap
    import struct

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel, zombies never pile up
    counter = mmap.mmap(-1, 8)  # MAP_SHARED: one count for the whole bomb
    start = time.monotonic()
    deadline = start + message["seconds"]
    born, leader = start, True
    while True:
        now = time.monotonic()
        if now >= deadline or (not leader and now - born >= message["life"]):
            break
        (made,) = struct.unpack_from("q", counter)
        if made >= message["cap"]:
            time.sleep(0.005)
            continue
        try:
            pid = os.fork()
        except OSError:  # EAGAIN from the pids limit: try again at once
            continue
        if pid == 0:
            leader, born = False, time.monotonic()
            continue
        struct.pack_into("q", counter, 0, made + 1)
    if not leader:
        os._exit(0)
    end = time.monotonic() + 30
    while time.monotonic() < end:
        time.sleep(0.05)


def children_allocate(message: dict, **context) -> None:
    """Fork message["children"] children that each allocate and touch
    message["mb"] MiB, call the `allocated` tool, then hold it for at most
    message["hold"] s. The leader sleeps (bounded) until stopped."""
    size = message["mb"] << 20
    pids = []
    for _ in range(message["children"]):
        pid = os.fork()
        if pid == 0:
            try:
                block = bytearray(size)
                for off in range(0, size, 4096):  # touch every page: charged, not just mapped
                    block[off] = 1
                try:
                    egress.call("allocated")
                except Exception:
                    pass
                time.sleep(message["hold"])
            finally:
                os._exit(0)
        pids.append(pid)
    end = time.monotonic() + message["hold"]
    while time.monotonic() < end:
        time.sleep(0.05)


def memfd_hog(message: dict, **context) -> None:
    """Write message["mb"] MiB into a memfd (shmem: resident in no process's
    RSS), calling `progress` with the MiB written every 20 MiB; then hold it
    for at most message["hold"] s."""
    fd = os.memfd_create("hog")
    chunk = b"\1" * (1 << 20)
    for i in range(1, message["mb"] + 1):
        os.write(fd, chunk)
        if i % 20 == 0:
            try:
                egress.call("progress", i)
            except Exception:
                pass
    end = time.monotonic() + message["hold"]
    while time.monotonic() < end:
        time.sleep(0.05)


def leave_v1_groups(message: dict, **context) -> None:
    """Try to move itself into each cgroup.procs in message["targets"] (out of
    its limited groups); report {path: "moved" | error} with the `report`
    tool, then sleep (bounded) until stopped."""
    results = {}
    for path in message["targets"]:
        try:
            with open(path, "w") as f:
                f.write("0")
            results[path] = "moved"
        except OSError as exc:
            results[path] = exc.strerror or str(exc)
    egress.call("report", results)
    end = time.monotonic() + 30
    while time.monotonic() < end:
        time.sleep(0.05)


def escape_then_linger(message: dict, **context) -> None:
    """A child that leaves everything but its v1 groups: setsid (out of the
    process group), into message["v2_procs"] if given (out of its v2 cgroup;
    needs root: isolation="off"), its run marker overwritten in memory (out
    of the marker sweep), SIGTERM ignored. It reports its pid with the
    `escaped` tool and lingers at most message["linger"] s."""
    from deadstop.ipc import framing

    pid = os.fork()
    if pid == 0:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os.setsid()
            if message.get("v2_procs"):
                with open(message["v2_procs"], "w") as f:
                    f.write("0")
            _erase_marker(framing.ENV_MARKER.encode() + b"=")
            try:
                egress.call("escaped", os.getpid())
            except Exception:
                pass  # revoked before the reply came back: linger all the same
            end = time.monotonic() + message["linger"]
            while time.monotonic() < end:
                time.sleep(0.02)
        finally:
            os._exit(0)
    end = time.monotonic() + message["linger"]
    while time.monotonic() < end:
        time.sleep(0.05)


def _erase_marker(prefix: bytes) -> None:
    """Overwrite the marker's value in this process's exec-time environment
    block (what /proc/<pid>/environ shows) through /proc/self/mem."""
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()  # fields[0] is field 3 (state)
    env_start, env_end = int(fields[50 - 3]), int(fields[51 - 3])
    with open("/proc/self/mem", "r+b", buffering=0) as mem:
        mem.seek(env_start)
        block = b"\0" + mem.read(env_end - env_start)
        at = block.find(b"\0" + prefix)
        if at < 0:
            return
        value = at + 1 + len(prefix)  # where the value starts in `block`
        end = block.index(b"\0", value)
        mem.seek(env_start + value - 1)  # - 1: the NUL put in front of the block
        mem.write(b"-" * (end - value))
