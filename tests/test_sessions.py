"""Sessions: unified run invalidation (generation, pre-tool gate, stale output
fence, takeover), pause/resume, sub-agent trees and their policy.

Real processes throughout; async tool handlers stamp themselves on the
supervisor's loop, the same thread that bumps generations and revokes, so
"before" and "after" are exact.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
import time

import pytest

import session_agents
from procscan import cpu_seconds, marked_processes
from deadstop.supervisor import AsyncSupervisor, InvalidTarget, SessionStopped, Supervisor
from deadstop.supervisor.engine.events import HELD_PER_RUN
from waiting import Countdown, late_start_reply


def test_takeover_while_the_old_run_floods(tmp_path) -> None:
    async def main() -> None:
        async with AsyncSupervisor(state_dir=str(tmp_path)) as sup:
            ticks: list[tuple[str, int]] = []
            ready, flooding = asyncio.Event(), asyncio.Event()

            async def tick(ctx) -> None:
                ticks.append((ctx.run_id, time.monotonic_ns()))
                flooding.set()

            sup.register_tool("tick", tick)
            sup.register_tool("ready", ready.set)
            sup.register_agent("flooder", session_agents.flooder_or_echo, tools=["tick", "ready"])
            s = sup.session("chat", agent="flooder")
            old = await s.send("flood")
            await asyncio.wait_for(ready.wait(), 30)
            await asyncio.wait_for(flooding.wait(), 30)
            assert s.generation == 1 and old.state.value == "running"

            runs = await asyncio.gather(s.send("first"), s.send("second"), s.send("third"))

            assert runs[0] is runs[1] is runs[2], "messages of one takeover start one run"
            new = runs[0]
            assert new is not old and new.generation == s.generation == 4
            assert await new.result(30) == {"message": "first\n\nsecond\n\nthird", "generation": 4,
                                            "messages": ["first", "second", "third"]}
            assert s.answer["message"] == "first\n\nsecond\n\nthird" and s.answer_generation == 4
            old_ticks = [t for run_id, t in ticks if run_id == old.id]
            assert old_ticks, "the old run was flooding"
            # The first send bumps the generation and revokes the old run in one
            # loop step, so revoked_at is the bump's time as the broker saw it.
            assert max(old_ticks) < old.report.revoked_at, "an old-generation tool call ran after the bump"
            assert old.state.value == "stopped" and old.report.revoke_source == "takeover"
            assert marked_processes(old.id) == {}
            sup.journal.commit_now()
            db = sqlite3.connect(sup.journal.path)
            (late,) = db.execute(
                "SELECT count(*) FROM egress e JOIN revocations r USING (run_id) WHERE e.run_id = ?"
                " AND e.decision = 'dispatched' AND e.t_ns > r.t_ns", (old.id,)).fetchone()
            after = db.execute(
                "SELECT e.decision, e.code FROM egress e JOIN revocations r USING (run_id) WHERE e.run_id = ?"
                " AND e.t_ns > r.t_ns", (old.id,)).fetchall()
            messages = [json.loads(m) for (m,) in db.execute("SELECT message FROM messages WHERE session='chat'"
                                                             " ORDER BY seq")]
            db.close()
            assert late == 0
            assert messages == ["flood", "first", "second", "third"], "every message is journaled, in order"
            # After the bump, everything the flooding run still sent was refused
            # (revoked or stale) or, if already in flight, cancelled.
            assert {d for d, _ in after} <= {"refused", "cancelled"}, after
            assert {c for d, c in after if d == "refused"} <= {5, 6}, after
            refused = sum(1 for d, _ in after if d == "refused")
            assert refused >= old.report.refused_after_revoke

    asyncio.run(main())


@pytest.mark.parametrize("count", [20, HELD_PER_RUN + 50])
def test_no_subscriber_sees_a_runs_output_before_its_start(count, tmp_path, monkeypatch) -> None:
    """A run's first events can reach the broker before the spawner's word that the run started:
    they wait for its run.started, then come in the order the run sent them; what overflows the
    hold (a run flooding in that window) is counted as one events.dropped, as a slow reader's is."""
    async def main() -> None:
        async with AsyncSupervisor(state_dir=str(tmp_path)) as sup:
            ready = asyncio.Event()
            sup.register_tool("ready", ready.set)
            sup.register_agent("emitter", session_agents.emits_then_waits, tools=["ready"])
            late_start_reply(sup, monkeypatch, until=ready.is_set, bound=60)  # all emitted before it is heard
            events = sup.subscribe(session="feed", lifecycle=True)
            first = asyncio.ensure_future(events.__anext__())
            s = sup.session("feed", agent="emitter")
            run = await s.send(str(count))
            assert ready.is_set(), "the start was answered before the run emitted: the window was not opened"
            seen = [await asyncio.wait_for(first, 30)]
            while seen[-1].kind not in ("run.tool_call", "events.dropped"):  # its call of `ready` ends the window
                seen.append(await asyncio.wait_for(events.__anext__(), 30))
            mine = [e for e in seen if e.run_id == run.id and e.kind != "run.sample"]
            assert mine[0].kind == "run.started", [e.kind for e in seen][:5]
            if count <= HELD_PER_RUN:
                assert [e.data["i"] for e in mine[1:-1]] == list(range(count))
                assert mine[-1].data["tool"] == "ready"
            else:  # the progress beyond the hold and the call's own event are counted
                assert [e.data["i"] for e in mine[1:-1]] == list(range(HELD_PER_RUN))
                assert mine[-1].data == {"count": count - HELD_PER_RUN + 1}
            await s.stop()
            await events.aclose()

    asyncio.run(main())


def test_stale_events_never_reach_subscribers(tmp_path) -> None:
    async def main() -> None:
        async with AsyncSupervisor(state_dir=str(tmp_path)) as sup:
            ready = asyncio.Event()
            sup.register_tool("ready", ready.set)
            sup.register_agent("emitter", session_agents.emitter, tools=["ready"])
            s = sup.session("feed", agent="emitter")
            events = sup.subscribe(session="feed")
            first = asyncio.ensure_future(events.__anext__())
            await s.send("stream")
            await asyncio.wait_for(ready.wait(), 30)
            got = await asyncio.wait_for(first, 30)
            assert got.kind == "progress" and got.generation == 1
            # Let generation-1 events pile up undelivered, then supersede the run.
            while sup._subscribers[0].backlog() < 50:
                await asyncio.sleep(0.001)
            run = await s.send("answer please")
            assert s.generation == 2
            delivered = []
            async for ev in events:
                delivered.append(ev)
                if ev.kind == "run.ended" and ev.run_id == run.id:
                    break
            progress = [ev for ev in delivered if ev.kind == "progress"]
            assert progress == [], f"{len(progress)} stale events reached the subscriber"
            assert s.answer == {"answer": "answer please", "generation": 2}
            sup.journal.commit_now()  # fenced rows written during delivery wait for the next commit otherwise
            db = sqlite3.connect(sup.journal.path)
            (fenced,) = db.execute("SELECT count(*) FROM egress WHERE decision = 'fenced'").fetchone()
            db.close()
            assert fenced >= 50, "held-back events are journaled as fenced"

    asyncio.run(main())


def test_pause_freezes_the_tree_and_resume_thaws_it(layer, tmp_path) -> None:
    ready = Countdown(1)
    with Supervisor(containment=layer) as sup:
        sup.register_tool("ready", ready)
        sup.register_agent("tree", session_agents.busy_tree, tools=["ready"])
        s = sup.session("work", agent="tree")
        run = s.send("go")
        assert ready.wait(30)
        pids = list(marked_processes(run.id))
        assert len(pids) == 21
        assert s.pause() is True and s.state == "paused" and run.state.value == "paused"
        frozen_at = cpu_seconds(pids)
        time.sleep(0.5)  # the thing measured: no CPU time may accrue while paused
        assert cpu_seconds(pids) == frozen_at, "a process ran while the session was paused"
        assert s.resume() is True and s.state == "running"
        time.sleep(0.3)
        assert cpu_seconds(pids) > frozen_at, "resume must thaw every process"
        assert s.pause() is True
        reports = s.kill()  # a paused run can be killed at once
        assert reports[0].outcome == "killed" and reports[0].survivors == 0
        assert marked_processes(run.id) == {}


def test_pause_holds_egress_and_resume_releases_it_in_order(tmp_path) -> None:
    async def main() -> None:
        async with AsyncSupervisor(state_dir=str(tmp_path)) as sup:
            order: list[int] = []
            paused = asyncio.Event()

            async def pause_me(ctx) -> None:
                await sup.runs[ctx.run_id].owner.pause()  # holds egress first, in this very step
                paused.set()

            async def seq(i: int) -> int:
                order.append(i)
                return i

            sup.register_tool("pause_me", pause_me)
            sup.register_tool("seq", seq)
            sup.register_agent("burst", session_agents.burst_then_wait, tools=["pause_me", "seq"])
            s = sup.session("b", agent="burst")
            run = await s.send("go")
            await asyncio.wait_for(paused.wait(), 30)
            assert s.state == "paused"
            # How many of the burst reached the broker before the freeze is a
            # race by nature (the rest wait, frozen, in the run's own socket);
            # what must hold is that none of them is dispatched while paused.
            held = len(run.channel.held)
            assert order == [], "the burst came after pause_me on one socket: none of it may run before the pause"
            await asyncio.sleep(0.2)
            assert order == [], "nothing is dispatched while paused"
            await s.resume()
            assert await run.result(30) == list(range(20))
            assert order == list(range(20)), "held requests are released in arrival order"
            db = sqlite3.connect(sup.journal.path)
            (n,) = db.execute("SELECT count(*) FROM egress WHERE run_id = ? AND decision = 'held'",
                              (run.id,)).fetchone()
            db.close()
            assert n == held

    asyncio.run(main())


def test_stopping_a_grandparent_kills_three_levels_of_sub_agents(layer, tmp_path) -> None:
    ready = Countdown(3)
    with Supervisor(containment=layer, state_dir=str(tmp_path)) as sup:
        sup.register_tool("ready", lambda depth: ready())
        sup.register_agent("level", session_agents.level, tools=["ready", "sessions.spawn"])
        top = sup.session("grandparent", agent="level")
        top.send("3")
        assert ready.wait(60)
        sessions = [top] + top.children + top.children[0].children
        assert [s.key for s in sessions] == ["grandparent", "grandparent/level2-1", "grandparent/level2-1/level1-1"]
        runs = [s.active_run for s in sessions]
        pids = {run.id: set(marked_processes(run.id)) for run in runs}
        assert all(len(p) == 9 for p in pids.values()), "each level has its own tree of 9 processes"
        leaders = [run.pid for run in runs]
        assert len({os.getpgid(pid) for pid in leaders}) == 3, "each sub-agent is its own process group"

        reports = top.stop()

        assert len(reports) == 3 and all(r.survivors == 0 for r in reports)
        for run in runs:
            assert marked_processes(run.id) == {}, "a sub-agent outlived its stopped ancestor"
        # The whole tree's egress was revoked before any of it was signalled.
        assert max(r.revoked_at for r in reports) < min(r.term_sent_at for r in reports)
        assert all(s.state == "idle" for s in sessions)
        assert top.info()["aborted_last_run"] is True


def test_sub_agent_policy(tmp_path) -> None:
    """sessions.stop is denied to sub-agents unless allowed; a run acts only on
    sessions it spawned unless the agent-to-agent allow-list says otherwise."""
    ready = Countdown(1)
    with Supervisor(state_dir=str(tmp_path)) as sup:
        tools = ["sessions.spawn", "sessions.stop", "sessions.send", "sessions.list"]
        sup.register_tool("ready", ready)
        sup.register_agent("caller", session_agents.session_tool_caller, tools=tools)
        sup.register_agent("trusted", session_agents.session_tool_caller, tools=tools, may_stop_sessions=True,
                           peers=["sleeper"])
        sup.register_agent("sleeper", session_agents.sleeper, tools=["ready"])
        stranger = sup.session("stranger", agent="sleeper")
        stranger.send("x")
        assert ready.wait(30)

        # A top-level run: may spawn, list and stop its own sub-agent; may not touch a stranger.
        steps = [["sessions.spawn", ["sleeper", "hi", "kid"]], ["sessions.list", []],
                 ["sessions.stop", ["top/kid-1"]], ["sessions.stop", ["stranger"]],
                 ["sessions.send", ["stranger", "hello"]], ["sessions.stop", ["top"]]]
        top = sup.session("top", agent="caller")
        out = top.send(json.dumps(steps)).result(timeout=60)
        assert out[0]["ok"] and out[0]["value"]["key"] == "top/kid-1"
        assert [s["key"] for s in out[1]["value"]] == ["top/kid-1"]
        assert out[2] == {"ok": True, "value": {"key": "top/kid-1", "runs_stopped": 1, "outcomes": ["stopped"]}}
        assert (out[3]["ok"], out[3]["code"]) == (False, 15) and "did not spawn" in out[3]["message"]
        assert (out[4]["ok"], out[4]["code"]) == (False, 15)
        assert (out[5]["ok"], out[5]["code"]) == (False, 15) and "itself or an ancestor" in out[5]["message"]
        assert stranger.state == "running", "a denied stop must change nothing"

        # A sub-agent may not use sessions.stop at all, even on its own child.
        parent = sup.session("parent", agent="caller")
        inner = json.dumps([["sessions.spawn", ["sleeper", "hi", "grandkid"]],
                            ["sessions.stop", ["parent/sub-1/grandkid-1"]]])
        out = parent.send(json.dumps([["sessions.spawn", ["caller", inner, "sub"]]])).result(timeout=60)
        assert out[0]["ok"]
        sub_out = sup.session("parent/sub-1").runs[-1].result(timeout=60)
        assert sub_out[0]["ok"] is True
        assert (sub_out[1]["ok"], sub_out[1]["code"]) == (False, 15) and "sub-agents may not" in sub_out[1]["message"]
        assert sup.session("parent/sub-1/grandkid-1").state == "running"

        # An agent with may_stop_sessions and peers=["sleeper"] may stop a stranger's sleeper session.
        boss = sup.session("boss", agent="trusted")
        out = boss.send(json.dumps([["sessions.stop", ["stranger"]]])).result(timeout=60)
        assert out == [{"ok": True, "value": {"key": "stranger", "runs_stopped": 1, "outcomes": ["stopped"]}}]
        assert stranger.state == "idle"

        db = sqlite3.connect(sup.journal_path)
        (denied,) = db.execute("SELECT count(*) FROM egress WHERE code = 15 AND decision = 'refused'").fetchone()
        db.close()
        assert denied == 4, "every policy refusal is journaled"
        for s in sup.sessions(active=True):
            s.kill()


def test_session_needs_an_agent_and_keeps_it() -> None:
    with Supervisor() as sup:
        sup.register_agent("a", session_agents.sleeper)
        with pytest.raises(InvalidTarget, match="name its agent"):
            sup.session("nobody")
        with pytest.raises(InvalidTarget, match="not registered"):
            sup.session("x", agent="unknown")
        sup.session("k", agent="a")
        assert sup.session("k").key == "k"
        with pytest.raises(InvalidTarget, match="runs agent 'a'"):
            sup.session("k", agent=session_agents.emitter)


def test_argv_agent_reads_its_message_from_the_inbox(tmp_path) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(here, "agents", "argv_session_agent.py")
    with Supervisor() as sup:
        sup.register_agent("argv", [os.sys.executable, script])
        s = sup.session("cli", agent="argv")
        run = s.send("hello from the gateway")
        assert run.result(timeout=30) == {"got": "hello from the gateway", "generation": 1, "session": "cli"}
        assert s.answer == run.result(timeout=30) and s.info()["last_outcome"] == "exited"


def test_stop_while_the_run_is_starting_leaves_nothing_running(tmp_path) -> None:
    async def main() -> None:
        async with AsyncSupervisor() as sup:
            sup.register_tool("ready", lambda: None)
            sup.register_agent("sleeper", session_agents.sleeper, tools=["ready"])
            s = sup.session("racy", agent="sleeper")
            sending = asyncio.ensure_future(s.send("go"))
            while not sup.runs:  # loop turns until the run exists but its spawn is not answered yet
                await asyncio.sleep(0)
            (starting,) = sup.runs.values()
            assert starting.state.value == "starting"
            await s.stop()
            # The stop came before the spawner was asked: the start is given up and nothing is forked.
            # (A stop after the spawner was asked: tests/test_control.py, a session stopped while its run starts.)
            with pytest.raises(SessionStopped, match="stopped before the run for this message started"):
                await sending
            assert marked_processes(starting.id) == {}
            assert starting.state.value == "failed" and starting.report.ended_by == "never-started"
            assert s.state == "idle"

    asyncio.run(main())


def test_spawned_keys_stay_unique_after_cleanup(tmp_path) -> None:
    """A child removed by cleanup frees no key that a live sibling still holds."""
    ready, cleaned, waiting = Countdown(1), threading.Event(), threading.Event()
    with Supervisor() as sup:
        def wait_for_cleanup() -> None:
            waiting.set()
            assert cleaned.wait(30)

        sup.register_tool("ready", ready)
        sup.register_tool("wait_for_cleanup", wait_for_cleanup)
        sup.register_agent("caller", session_agents.session_tool_caller,
                           tools=["sessions.spawn", "wait_for_cleanup"])
        sup.register_agent("sleeper", session_agents.sleeper, tools=["ready"])
        sup.register_agent("quick", session_agents.flooder_or_echo)
        top = sup.session("top", agent="caller")
        steps = [["sessions.spawn", ["quick", "done", "a"]], ["sessions.spawn", ["sleeper", "x", "b"]],
                 ["wait_for_cleanup", []], ["sessions.spawn", ["sleeper", "y", "b"]]]
        run = top.send(json.dumps(steps))
        assert waiting.wait(30) and ready.wait(30)
        sup.session("top/a-1").runs[-1].wait(timeout=30)
        b2 = sup.session("top/b-2")
        generation = b2.generation
        assert sup.cleanup(older_than=0) == ["top/a-1"]
        cleaned.set()
        out = run.result(timeout=60)
        assert [o["value"]["key"] for o in out if o["value"]] == ["top/a-1", "top/b-2", "top/b-3"]
        assert b2.state == "running" and b2.generation == generation, "a new child took over a live sibling"


def test_a_paused_session_stops_at_once(layer) -> None:
    """SIGTERM reaches frozen processes only once thawed: stop() thaws after signalling."""
    ready = Countdown(1)
    with Supervisor(containment=layer, grace=30) as sup:
        sup.register_tool("ready", ready)
        sup.register_agent("tree", session_agents.busy_tree, tools=["ready"])
        s = sup.session("frozen", agent="tree")
        run = s.send("go")
        assert ready.wait(30) and s.pause()
        (report,) = s.stop()
        # SIGTERM, not the 30 s grace, ended the tree. In the fallback layer the sweep that follows may
        # still catch a process of the tree that had not left yet (ended_by "swept"), as any stop's can.
        acted = ("sigterm",) if layer == "cgroup" else ("sigterm", "swept")
        assert report.ended_by in acted and report.kill_sent_at is None, report
        assert report.reaped_at - report.requested_at < 10e9, "the stop waited out the grace"
        assert report.survivors == 0 and marked_processes(run.id) == {}
