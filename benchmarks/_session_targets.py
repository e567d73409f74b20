"""Agent targets for the session benchmark, and the busy tree its freeze floors use.

Agents are called as ``agent(message, **context)`` in a run; the message is a
dict naming the ready FIFO (see _targets.announce) and what to do. They are
pickled by value (session_latency registers this module and _targets with
cloudpickle), so a run never imports benchmark modules.

Only the standard library is imported at module level; `worker.egress` is
imported inside the functions that need it, in the run.
"""

from __future__ import annotations

import threading
import time
from typing import Any, NoReturn

from benchmarks._targets import _fork_child, announce, fork_members, sleep_forever

#: The paused tree: a leader and 19 children, every one busy-looping.
BUSY_PROCS = 20

#: The stopped session tree, top level first: (children, grandchildren each)
#: per level, so a level has 1 + children * (1 + grandchildren) processes.
#: 16 + 13 + 11 = 40 = TREE_SIZE, so the 40-process tree floors apply as they are.
LEVELS = [[5, 2], [4, 2], [5, 1]]


def level_size(children: int, grandchildren: int) -> int:
    return 1 + children * (1 + grandchildren)


def spin() -> NoReturn:
    """Burn CPU forever (the tree a pause must freeze is busy, not idle)."""
    x = 0
    while True:
        x += 1


def busy_tree(path: str, procs: int = BUSY_PROCS) -> NoReturn:
    """Leader of `procs` busy-looping processes; each announces itself first."""
    t = time.monotonic_ns()

    def child() -> None:
        announce(path, "C")
        spin()

    for _ in range(procs - 1):
        _fork_child(child)
    announce(path, "L", t)
    spin()


def busy_agent(message: dict[str, Any], **context: Any) -> NoReturn:
    busy_tree(message["path"], message["procs"])


def flood_agent(message: dict[str, Any], **context: Any) -> None:
    """mode "probe": stamp the first line, announce it, return (the run exits).

    mode "flood": `threads` threads call the no-op `tool` back to back until
    egress refuses (revoked / stale generation); the main thread announces
    and then idles with the default SIGTERM disposition, so a stop ends the
    run by SIGTERM and no grace elapses.
    """
    t = time.monotonic_ns()
    path = message["path"]
    if message["mode"] == "probe":
        announce(path, "P", t)
        return None
    from deadstop.worker import egress

    tool = message["tool"]

    def flood() -> None:
        while True:
            try:
                egress.call(tool)
            except Exception:
                return

    for _ in range(message["threads"]):
        threading.Thread(target=flood, daemon=True).start()
    announce(path, "F", t)
    sleep_forever()


def level_agent(message: dict[str, Any], **context: Any) -> NoReturn:
    """One level of the session tree: its own process tree, then the next level as a sub-agent.

    The leader announces itself only after sessions.spawn returned, i.e.
    after the next level's run exists, so the benchmark has the whole tree
    once every process announced.
    """
    t = time.monotonic_ns()
    path = message["path"]
    (children, grandchildren), below = message["levels"][0], message["levels"][1:]
    fork_members(path, children, grandchildren)
    if below:
        from deadstop.worker import egress

        egress.call("sessions.spawn", message["agent"], {**message, "levels": below}, f"level{len(below)}")
    announce(path, "L", t)
    sleep_forever()
