"""Helper process: how other ways of running work in a process stop it.

Run as ``python -m deadstop.supervisor.bench.peers TRIALS SETTLE``; prints JSON. For a
cooperative single-process target and for the 40-process tree it measures,
per peer, the caller's clock before the peer's stop API to the moment the
API returned and the leader had exited, then counts which announced members
are still alive 50 ms later (by pidfd). That count is the point: pools and
Process.terminate() end the process they started, not what it started.

This is a separate, subreaper process so that leaked members can be killed
and reaped here (PID 1 need not reap orphans), and so the peers' threads and
forks never share a process with the deadstop measurements.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable

from . import progress
from . import targets as _targets
from .procs import (ReadyChannel, Tracked, cleanup_leaked, helper_main, kill_and_wait, reap_known,
                               spawn_leader, tree_ready)

LEAK_WINDOW = 0.05


class Peer:
    """A way to run `target(path)` in another process and to stop it again."""

    name = ""
    how = ""  # what the stop does, for the report
    tree_cap: int | None = None  # fewer tree trials when each one is known to take seconds

    def start(self, target: Callable[[str], None], path: str) -> Any:
        raise NotImplementedError

    def stop(self, handle: Any) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class MultiprocessTerminate(Peer):
    name, how = "multiprocess Process.terminate+join", "SIGTERM to the process, join"

    def start(self, target: Callable[[str], None], path: str) -> Any:
        import multiprocess

        p = multiprocess.Process(target=target, args=(path,))
        p.start()
        return p

    def stop(self, p: Any) -> None:
        p.terminate()
        p.join()


class PebbleCancel(Peer):
    name, how = "pebble ProcessPool future.cancel", "returns at once; timed to worker exit (pool polls each 0.1 s)"

    def __init__(self) -> None:
        import pebble

        self.pool = pebble.ProcessPool(max_workers=1)

    def start(self, target: Callable[[str], None], path: str) -> Any:
        return self.pool.schedule(target, args=(path,))

    def stop(self, future: Any) -> None:
        future.cancel()

    def close(self) -> None:
        self.pool.stop()
        self.pool.join()


class PebbleStop(Peer):
    name, how = "pebble ProcessPool stop+join", "SIGTERM to the worker, SIGKILL after term_timeout (3 s)"
    # Once the task has forked, the worker's SIGTERM handler does not finish
    # and pebble waits its term_timeout (3 s) before SIGKILL: cap the trials.
    tree_cap = 5

    def start(self, target: Callable[[str], None], path: str) -> Any:
        import pebble

        pool = pebble.ProcessPool(max_workers=1)
        pool.schedule(target, args=(path,))
        return pool

    def stop(self, pool: Any) -> None:
        pool.stop()
        pool.join()


class LokyKill(Peer):
    name, how = "loky shutdown(kill_workers=True)", "kill_process_tree (psutil) of each worker"

    def start(self, target: Callable[[str], None], path: str) -> Any:
        import loky

        ex = loky.ProcessPoolExecutor(max_workers=1)
        ex.submit(target, path)
        return ex

    def stop(self, ex: Any) -> None:
        ex.shutdown(wait=True, kill_workers=True)

    def close(self) -> None:
        from loky.backend import resource_tracker

        resource_tracker._resource_tracker._stop()


class PsutilTree(Peer):
    name, how = "psutil children(recursive)+kill+wait_procs", "SIGKILL to each process found, then wait"

    def start(self, target: Callable[[str], None], path: str) -> int:
        return spawn_leader(path, target)

    def stop(self, pid: int) -> None:
        import psutil

        leader = psutil.Process(pid)
        kill_and_wait([leader, *leader.children(recursive=True)])


class Killpg(Peer):
    name, how = "plain killpg(SIGKILL)+waitpid", "SIGKILL to the process group (a setsid() member would escape)"

    def start(self, target: Callable[[str], None], path: str) -> int:
        return spawn_leader(path, target, own_group=True)

    def stop(self, pid: int) -> None:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def measure(peer: Peer, chan: ReadyChannel, target: Callable[[str], None], tree: bool, trials: int,
            settle: float) -> dict[str, Any]:
    """Trials of start, wait until every member announced itself, stop; samples and leak counts."""
    samples: list[int] = []
    leaked: list[int] = []
    for i in progress.trials(trials + 2, f"peer: {peer.name}{', tree' if tree else ''}"):  # two warm-ups
        handle = peer.start(target, chan.path)
        ready = tree_ready(chan, timeout=30) if tree else chan.wait(1, timeout=30)
        pids = [r.pid for r in ready]
        time.sleep(settle)
        with Tracked(pids) as tracked:
            t0 = time.monotonic_ns()
            peer.stop(handle)
            if not tracked.wait_one(pids[0], 10.0):
                raise RuntimeError(f"{peer.name}: leader {pids[0]} still alive 10 s after stop")
            t1 = time.monotonic_ns()
            n_leaked = cleanup_leaked(tracked, LEAK_WINDOW)
        reap_known(pids[1:])  # orphans that came back to us as the subreaper
        if i >= 2:
            samples.append(t1 - t0)
            leaked.append(n_leaked)
    return {"samples": samples, "leaked": leaked, "how": peer.how}


def available_peers() -> tuple[list[Callable[[], Peer]], dict[str, str]]:
    """Peer factories in run order (forking ones first), and notes for those that cannot run."""
    peers: list[Callable[[], Peer]] = [MultiprocessTerminate, PsutilTree, Killpg]
    skipped: dict[str, str] = {}
    for mod, factories in (("pebble", [PebbleCancel, PebbleStop]), ("loky", [LokyKill])):
        try:
            __import__(mod)
        except ImportError as exc:
            for f in factories:
                skipped[f.name] = f"skipped: {exc} (pip install 'deadstop[bench]')"
            continue
        peers.extend(factories)
    return peers, skipped


def measure_all(chan: ReadyChannel, trials: int, settle: float) -> dict[str, Any]:
    """Every available peer on both targets; what is left when this returns is killed (and reported) by helper_main."""
    results: dict[str, Any] = {}
    factories, skipped = available_peers()
    for factory in factories:
        peer = factory()
        try:
            results[peer.name] = {
                "coop": measure(peer, chan, _targets.sleeper, False, trials, settle),
                "tree": measure(peer, chan, _targets.tree, True, min(trials, peer.tree_cap or trials), settle),
            }
        finally:
            peer.close()
    import multiprocessing.resource_tracker as stdlib_tracker  # started by loky for its semaphores

    stdlib_tracker._resource_tracker._stop()  # type: ignore[attr-defined]  # private: no public way to end it
    return {"peers": results, "skipped": skipped}


if __name__ == "__main__":
    helper_main(measure_all)
