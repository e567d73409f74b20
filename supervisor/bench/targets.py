"""Code that runs inside the measured processes (deadstop runs, peers' workers, floor children).

Every process announces itself on a named FIFO with one line,
``<tag> <pid> <monotonic_ns>``: a FIFO is reachable by path, so it works for
forked children, for runs (the spawner closes inherited descriptors) and for
freshly exec'd interpreters alike, and writes below PIPE_BUF are atomic, so
40 processes can share it. The timestamp is the process's first action;
CLOCK_MONOTONIC is system-wide, so the benchmark compares it with its own.

Only the standard library is imported at module level: the same functions
run in multiprocess "spawn" children, where imports are part of what is timed.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, NoReturn

#: The measured tree: a leader, 13 children, 2 grandchildren each = 40 processes.
TREE_CHILDREN = 13
TREE_GRANDCHILDREN = 2
TREE_SIZE = 1 + TREE_CHILDREN * (1 + TREE_GRANDCHILDREN)


def announce(path: str, tag: str, t_ns: int | None = None) -> None:
    """Write one ready line to the FIFO at `path`."""
    t = time.monotonic_ns() if t_ns is None else t_ns
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, f"{tag} {os.getpid()} {t}\n".encode())
    finally:
        os.close(fd)


def sleep_forever() -> NoReturn:
    """Idle with the default SIGTERM disposition, like a run blocked on its model's reply.

    One long sleep, not a poll: a run that woke 20 times a second would, a
    thousand of them, spend most of a core on wake-ups and tilt every figure
    measured beside them (the scale benchmark's starts and stop_all)."""
    while True:
        time.sleep(3600)


def sleeper(path: str) -> None:
    """A cooperative run: announces its first instant, then sleeps in a loop."""
    t = time.monotonic_ns()
    announce(path, "L", t)
    sleep_forever()


def term_ignorer(path: str) -> None:
    """A run that ignores SIGTERM, so only the grace timer and SIGKILL end it."""
    t = time.monotonic_ns()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    announce(path, "L", t)
    sleep_forever()


def _fork_child(body) -> int:
    """fork(); the child runs `body` and never returns into the caller's stack."""
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            os._exit(0)
    return pid


def fork_members(path: str, children: int, grandchildren: int) -> None:
    """Fork `children` children, each with `grandchildren` of its own; every one announces itself, then sleeps."""

    def grandchild() -> None:
        announce(path, "G")
        sleep_forever()

    def child() -> None:
        for _ in range(grandchildren):
            _fork_child(grandchild)
        announce(path, "C")
        sleep_forever()

    for _ in range(children):
        _fork_child(child)


def tree(path: str, children: int = TREE_CHILDREN, grandchildren: int = TREE_GRANDCHILDREN) -> None:
    """Leader of a 40-process tree; every member announces itself, then sleeps."""
    t = time.monotonic_ns()
    fork_members(path, children, grandchildren)
    announce(path, "L", t)
    sleep_forever()


def first_line(path: str) -> None:
    """Start-latency probe for a multiprocess spawn child: stamp, announce, exit."""
    announce(path, "L", time.monotonic_ns())


def egress_round_trips(tool: str, n: int, warmup: int) -> list[int]:
    """`n` sequential egress.call(tool) from inside a run, timed by the run itself."""
    from deadstop.worker import egress

    for _ in range(warmup):
        egress.call(tool)
    out = []
    for _ in range(n):
        t = time.monotonic_ns()
        egress.call(tool)
        out.append(time.monotonic_ns() - t)
    return out


async def egress_pipelined(tool: str, batches: int, batch: int) -> list[int]:
    """Batches of `batch` concurrent egress.acall(tool); returns each batch's duration."""
    import asyncio

    from deadstop.worker import egress

    async def one_batch() -> int:
        t = time.monotonic_ns()
        await asyncio.gather(*(egress.acall(tool) for _ in range(batch)))
        return time.monotonic_ns() - t

    await one_batch()  # warm-up: socket connect, first-call imports
    return [await one_batch() for _ in range(batches)]


def noop() -> None:
    """Sync no-op tool (dispatched to the broker's thread pool)."""
    return None


async def anoop() -> None:
    """Async no-op tool (dispatched as a task on the broker's loop)."""
    return None


def zmq_echo_client(address: str, n: int, warmup: int, batches: int, batch: int) -> dict[str, Any]:
    """Raw DEALER client: sequential round trips, then pipelined batches, against an echo ROUTER."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    payload = b"x" * 64
    for _ in range(warmup):
        sock.send(payload)
        sock.recv()
    rtt = []
    for _ in range(n):
        t = time.monotonic_ns()
        sock.send(payload)
        sock.recv()
        rtt.append(time.monotonic_ns() - t)
    piped = []
    for _ in range(batches + 1):  # the first batch is a warm-up
        t = time.monotonic_ns()
        for _ in range(batch):
            sock.send(payload)
        for _ in range(batch):
            sock.recv()
        piped.append(time.monotonic_ns() - t)
    sock.send(b"quit")
    sock.recv()
    sock.close()
    ctx.term()
    return {"rtt": rtt, "pipelined": piped[1:]}


def idle_ready() -> NoReturn:
    """An idle run for the scale benchmark: says it is up through the `ready` tool, then sleeps."""
    from deadstop.worker import egress

    egress.call("ready")
    sleep_forever()


def timed_agent(path: str, fn: Any, args: tuple[Any, ...] = ()) -> Any:
    """The user's agent, announced first: `deadstop bench --target` times start() to this line,
    as the kill benchmark times its own targets. Then the agent runs as it would unwrapped."""
    announce(path, "L", time.monotonic_ns())
    return fn(*args)
