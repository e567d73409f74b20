"""Many runs on one host, at a size CI affords: all started concurrently, all stopped in one stop_all,
nothing left alive (an independent /proc scan), the supervisor's memory and each run's bounded.

300 at once is past where a burst of starts used to fill the spawner's socket both ways and take
every run down with a "spawner stopped reading" (it failed so at 300 before the start window)."""

from __future__ import annotations

import asyncio
import os

import psutil

import behaviours
from procscan import marked_processes
from deadstop.supervisor import AsyncSupervisor

RUNS = 300
#: what RUNS idle runs may add to the supervisor's own resident memory (the runs are other processes;
#: this process also holds pytest and whatever earlier tests imported, so its growth is what is bounded)
RSS_GROWTH_BOUND = 60 << 20
#: the unique memory of an idle run (its pages copied from the spawner, psutil's USS); about 3 MiB
#: measured (benchmarks/scale_latency.py), so this catches a start path that copies the heap, not noise
USS_BOUND = 6 << 20
USS_SAMPLE = 20


def test_three_hundred_runs_start_together_and_one_stop_all_ends_them(tmp_path) -> None:
    async def main() -> None:
        async with AsyncSupervisor(state_dir=str(tmp_path / "state")) as sup:
            up = asyncio.Semaphore(0)

            async def ready() -> None:
                up.release()

            sup.register_tool("ready", ready)
            before = psutil.Process(os.getpid()).memory_info().rss
            runs = await asyncio.gather(*(sup.start(behaviours.victim, tools=["ready"]) for _ in range(RUNS)))
            for _ in range(RUNS):  # every one of them reached its first line and called out
                await asyncio.wait_for(up.acquire(), 120)
            alive = marked_processes()
            assert {r.id for r in runs} <= set(alive.values()), "every run has a live process"
            grown = psutil.Process(os.getpid()).memory_info().rss - before
            assert grown < RSS_GROWTH_BOUND, f"{RUNS} idle runs grew the supervisor by {grown >> 20} MiB"
            uss = sorted(psutil.Process(r.pid).memory_full_info().uss for r in runs[:: RUNS // USS_SAMPLE])
            assert uss[len(uss) // 2] < USS_BOUND, f"idle runs own {[u >> 10 for u in uss]} KiB each"
            reports = await sup.stop_all(grace=1.0)
            assert len(reports) == RUNS and all(r.survivors == 0 for r in reports)
            assert max(r.revoked_at for r in reports) < min(r.term_sent_at or r.kill_sent_at for r in reports)
            assert {r.state.value for r in runs} == {"stopped"}
        assert not any(run_id in {r.id for r in runs} for run_id in marked_processes().values()), \
            "a run's process outlived stop_all"

    asyncio.run(main())
