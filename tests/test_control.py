"""The control seam: the same session verbs through two callers, and the policy that guards them.

Every session test here runs twice: once through the blocking facade's own
verbs (the in-process library principal), once as an operator speaking the
verb table as JSON bytes (what an RPC or the command line sends). Both must
keep the same promises: the old run's egress is revoked before any signal, no
process of a stopped tree is left, the report names who stopped it. The
policy tests call as a read-only gateway, as an admin gateway and as a run.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import msgspec
import pytest

import session_agents
from procscan import cpu_seconds, marked_processes
from waiting import Countdown, late_start_reply
from deadstop.ipc import control as wire
from deadstop.supervisor import AsyncSupervisor, ControlFault, Fault, Principal, Supervisor

WAIT = 60


class LibraryCaller:
    """The blocking facade's own session verbs."""

    source = "api"

    def __init__(self, sup: Supervisor):
        self.sup = sup

    def send(self, key: str, message, agent: str | None = None) -> str:
        session = self.sup.session(key, agent) if agent else self.sup.session(key)
        return session.send(message).id

    def stop(self, key: str, grace: float | None = None) -> list[dict]:
        return [r.to_dict() for r in self.sup.session(key).stop(grace)]

    def kill(self, key: str) -> list[dict]:
        return [r.to_dict() for r in self.sup.session(key).kill()]

    def pause(self, key: str) -> bool:
        return self.sup.session(key).pause()

    def resume(self, key: str) -> bool:
        return self.sup.session(key).resume()

    def show(self, key: str) -> dict:
        return self.sup.session(key).info()

    def keys(self) -> list[str]:
        return [s.key for s in self.sup.sessions()]

    def run(self, run_id: str) -> dict:
        (found,) = [r for r in self.sup.run_records() if r.id == run_id]
        return msgspec.to_builtins(found)


class OperatorCaller:
    """An operator speaking the verb table: JSON bytes in, JSON bytes out."""

    source = "cli"

    def __init__(self, sup: Supervisor):
        self.sup = sup
        self.who = Principal.operator("tests")

    def __call__(self, verb: str, **args):
        reply = self.sup.call(json.dumps({"verb": verb, **args}).encode(), self.who)
        return json.loads(wire.encode(reply))

    def send(self, key: str, message, agent: str | None = None) -> str:
        return self("sessions.send", key=key, message=message, agent=agent)["run_id"]

    def stop(self, key: str, grace: float | None = None) -> list[dict]:
        return self("sessions.stop", key=key, grace=grace)["reports"]

    def kill(self, key: str) -> list[dict]:
        return self("sessions.kill", key=key)["reports"]

    def pause(self, key: str) -> bool:
        return self("sessions.pause", key=key)

    def resume(self, key: str) -> bool:
        return self("sessions.resume", key=key)

    def show(self, key: str) -> dict:
        return self("sessions.show", key=key)

    def keys(self) -> list[str]:
        return [s["key"] for s in self("sessions.list")]

    def run(self, run_id: str) -> dict:
        return self("runs.show", run_id=run_id)


CALLERS = {"library": LibraryCaller, "operator": OperatorCaller}


@pytest.fixture(params=sorted(CALLERS))
def caller_kind(request) -> str:
    return request.param


def test_takeover_and_stop(caller_kind, tmp_path) -> None:
    ready: dict[str, Countdown] = {}
    with Supervisor(state_dir=str(tmp_path)) as sup:
        sup.register_tool("ready", lambda ctx: ready.setdefault(ctx.run_id, Countdown(1))())
        sup.register_agent("sleeper", session_agents.sleeper, tools=["ready"])
        caller = CALLERS[caller_kind](sup)
        first = caller.send("chat", "one", agent="sleeper")
        second = caller.send("chat", "two")  # takes over the first run
        assert first != second
        deadline = time.monotonic() + WAIT
        while second not in ready and time.monotonic() < deadline:  # the new run says it is up
            time.sleep(0.01)
        assert second in ready
        old = caller.run(first)
        assert old["state"] == "stopped" and old["report"]["revoke_source"] == "takeover", old
        assert marked_processes(first) == {}
        assert caller.show("chat")["state"] == "running"

        (report,) = caller.stop("chat", 0.5)

        assert report["run_id"] == second and report["survivors"] == 0
        assert report["revoke_source"] == caller.source, "the report names who stopped the session"
        assert report["revoked_at"] <= report["term_sent_at"]
        assert marked_processes(second) == {}
        info = caller.show("chat")
        assert info["state"] == "idle" and info["generation"] == 3 and info["aborted_last_run"] is True
        assert caller.keys() == ["chat"]


@pytest.mark.parametrize("verb", ["sessions.stop", "sessions.stop_all"])
def test_a_session_stopped_while_its_run_starts_ends_that_run_too(verb, monkeypatch) -> None:
    """The run is forked and running, its start not yet returned to the session: the stop reaches it,
    its report is in the reply, and nothing of it is left (sessions.stop_all used to skip the session)."""
    ready = Countdown(1)
    with Supervisor() as sup:
        sup.register_tool("ready", ready)
        sup.register_agent("sleeper", session_agents.sleeper, tools=["ready"])
        channels = sup.core.broker.channels
        late_start_reply(sup, monkeypatch, bound=WAIT,
                         until=lambda: any(c.revocation is not None for c in list(channels.values())))
        operator = OperatorCaller(sup)
        sent: dict[str, str] = {}
        sender = threading.Thread(target=lambda: sent.setdefault("run", operator.send("chat", "hi", agent="sleeper")))
        sender.start()
        assert ready.wait(WAIT), "the run never came up"
        reply = operator(verb, **({"key": "chat"} if verb == "sessions.stop" else {}))
        sender.join(WAIT)
        run_id = sent["run"]
        assert [r["run_id"] for r in reply["reports"]] == [run_id], reply
        (report,) = reply["reports"]
        assert report["survivors"] == 0 and report["revoke_source"] == operator.source, report
        assert marked_processes(run_id) == {}
        assert operator.show("chat")["state"] == "idle"


def test_stopping_a_tree(caller_kind, tmp_path) -> None:
    ready = Countdown(2)
    with Supervisor(state_dir=str(tmp_path)) as sup:
        sup.register_tool("ready", lambda depth: ready())
        sup.register_agent("level", session_agents.level, tools=["ready", "sessions.spawn"])
        caller = CALLERS[caller_kind](sup)
        top = caller.send("top", "2", agent="level")
        assert ready.wait(WAIT)
        child = caller.show("top")["children"]
        assert child == ["top/level1-1"]
        child_run = caller.show(child[0])["active_run"]
        assert len(marked_processes(top)) == 9 and len(marked_processes(child_run)) == 9

        reports = caller.kill("top")

        assert sorted(r["run_id"] for r in reports) == sorted([top, child_run])
        assert all(r["survivors"] == 0 and r["outcome"] == "killed" for r in reports), reports
        assert max(r["revoked_at"] for r in reports) < min(r["kill_sent_at"] for r in reports), \
            "the whole tree is revoked before any of it is signalled"
        assert marked_processes(top) == {} and marked_processes(child_run) == {}
        assert all(caller.show(k)["state"] == "idle" for k in ("top", "top/level1-1"))


def test_pause_and_resume(caller_kind) -> None:
    ready = Countdown(1)
    with Supervisor() as sup:
        sup.register_tool("ready", ready)
        sup.register_agent("tree", session_agents.busy_tree, tools=["ready"])
        caller = CALLERS[caller_kind](sup)
        run_id = caller.send("work", "go", agent="tree")
        assert ready.wait(WAIT)
        pids = list(marked_processes(run_id))
        assert caller.pause("work") is True and caller.show("work")["state"] == "paused"
        frozen_at = cpu_seconds(pids)
        time.sleep(0.3)  # the thing measured: no CPU time may accrue while paused
        assert cpu_seconds(pids) == frozen_at, "a process ran while the session was paused"
        assert caller.resume("work") is True and caller.show("work")["state"] == "running"
        caller.kill("work")
        assert marked_processes(run_id) == {}
        assert caller.pause("work") is False, "pausing an idle session does nothing and says so"


def test_ended_runs_leave_memory_and_are_read_back_from_the_store(caller_kind, monkeypatch, tmp_path) -> None:
    import deadstop.supervisor.engine.engine as engine

    monkeypatch.setattr(engine, "ENDED_RETAINED", 3)
    with Supervisor(state_dir=str(tmp_path)) as sup:
        sup.register_agent("echo", session_agents.flooder_or_echo)
        caller = CALLERS[caller_kind](sup)
        ids = []
        for i in range(12):
            run_id = caller.send(f"s{i}", f"hello {i}", agent="echo")
            sup.run(run_id).wait(timeout=WAIT)  # live, or the newest ended: still in memory
            ids.append(run_id)
        deadline = time.monotonic() + WAIT
        while sup.core.runs and time.monotonic() < deadline:  # the last one's end is being recorded
            time.sleep(0.01)
        assert sup.core.runs == {}, "an ended run stayed in the live table"
        assert len(sup.runs()) <= 3, "more ended runs kept in memory than ENDED_RETAINED"
        for i, run_id in enumerate(ids):
            info = caller.run(run_id)
            assert info["state"] == "exited" and info["report"]["outcome"] == "exited", info
            assert info["session"] == f"s{i}"
        assert [r.id for r in sup.run_records()] == ids


# -- policy ------------------------------------------------------------------------------------------------
def _fault(sup: Supervisor, verb: str, who: Principal, **args) -> Fault:
    with pytest.raises(ControlFault) as caught:
        sup.call(json.dumps({"verb": verb, **args}), who)
    return caught.value.fault


def test_a_gateway_has_only_the_scopes_of_its_key() -> None:
    ready = Countdown(1)
    with Supervisor() as sup:
        sup.register_tool("ready", ready)
        sup.register_agent("sleeper", session_agents.sleeper, tools=["ready"])
        reader = Principal.gateway("dashboard", ["read"])
        writer = Principal.gateway("gateway", ["read", "write"])
        run_id = sup.call(wire.SessionsSend(key="s", message="go", agent="sleeper"), writer).run_id
        assert ready.wait(WAIT)

        assert [s.key for s in sup.call(wire.SessionsList(), reader)] == ["s"]
        for verb in ("sessions.stop", "sessions.kill", "sessions.pause"):
            assert _fault(sup, verb, reader, key="s") is Fault.FORBIDDEN
        assert _fault(sup, "runs.kill", reader, run_id=run_id) is Fault.FORBIDDEN
        assert _fault(sup, "sessions.cleanup", writer) is Fault.FORBIDDEN, "cleanup needs admin"
        assert sup.run(run_id).state.value == "running" and marked_processes(run_id), \
            "a refused verb must not have touched the run"

        info = sup.call(wire.RunsKill(run_id=run_id), writer)
        assert info.state == "killed" and info.report["revoke_source"] == "gateway"
        assert "gateway 'gateway'" in info.report["revoke_reason"]
        assert marked_processes(run_id) == {}
        assert sup.call(wire.SessionsCleanup(older_than=0), Principal.gateway("admin", ["admin"])) == ["s"]


def test_faults_are_numbered_and_name_the_problem(tmp_path) -> None:
    with Supervisor(state_dir=str(tmp_path)) as sup:
        sup.register_agent("echo", session_agents.flooder_or_echo)
        op = Principal.operator()
        assert _fault(sup, "sessions.explode", op) is Fault.UNKNOWN_VERB
        assert _fault(sup, "sessions.show", op) is Fault.BAD_ARGUMENTS  # no key
        assert _fault(sup, "sessions.show", op, key=7) is Fault.BAD_ARGUMENTS
        assert _fault(sup, "sessions.show", op, key="nobody") is Fault.NO_SUCH_SESSION
        assert _fault(sup, "runs.show", op, run_id="0" * 12) is Fault.NO_SUCH_RUN
        assert _fault(sup, "sessions.send", op, key="new", message="hi", agent="ghost") is Fault.NO_SUCH_AGENT
        assert _fault(sup, "sessions.spawn", op, agent="echo", message="hi") is Fault.FORBIDDEN
        run_id = sup.call(wire.SessionsSend(key="e", message="hi", agent="echo"), op).run_id
        sup.run(run_id).wait(timeout=WAIT)
        again = sup.call(wire.RunsStop(run_id=run_id), op)  # idempotent: an ended run answers with its record
        assert again.state == "exited" and again.report["revoke_source"] == "exit"
        with pytest.raises(ControlFault) as caught:
            sup.call(b"{not json", op)
        assert caught.value.fault is Fault.BAD_ARGUMENTS and "fault 2" in str(caught.value)
        assert [a.name for a in sup.call(wire.AgentsList(), op)] == ["echo"]
        health = sup.call(wire.HealthCheck(), op)
        assert health.supervisor_id == sup.id and health.pid == os.getpid() and health.sessions == 1


def test_a_run_acts_only_on_what_it_spawned() -> None:
    """The run principal, called directly (the sessions.* tools go through the same checks)."""
    ready = Countdown(3)
    with Supervisor() as sup:
        sup.register_tool("ready", lambda depth=0: ready())
        sup.register_agent("sleeper", session_agents.sleeper, tools=["ready"])
        sup.register_agent("level", session_agents.level, tools=["ready", "sessions.spawn"])
        sup.session("top", "level").send("2")
        stranger = sup.session("stranger", "sleeper").send("go")
        assert ready.wait(WAIT), "top, its child and the stranger are up"
        top_run = sup.session("top").active_run
        who = Principal.of_run(top_run.id, "top")
        assert [s.key for s in sup.call(wire.SessionsList(), who)] == ["top/level1-1"], "a run sees only its subtree"
        assert _fault(sup, "sessions.stop", who, key="stranger") is Fault.POLICY_DENIED
        assert _fault(sup, "sessions.stop", who, key="top") is Fault.POLICY_DENIED, "not itself"
        assert _fault(sup, "runs.kill", who, run_id=stranger.id) is Fault.POLICY_DENIED
        assert _fault(sup, "sessions.show", who, key="stranger") is Fault.NO_SUCH_SESSION, "nor see a stranger"
        assert _fault(sup, "sessions.cleanup", who) is Fault.FORBIDDEN
        assert _fault(sup, "sessions.stop_all", who) is Fault.POLICY_DENIED, "a run never stops every session"
        assert stranger.state.value == "running" and top_run.state.value == "running"
        child = Principal.of_run(sup.session("top/level1-1").active_run.id, "top/level1-1")
        assert _fault(sup, "sessions.stop", child, key="top") is Fault.POLICY_DENIED, "a sub-agent may not stop"
        reply = sup.call(wire.SessionsStop(key="top/level1-1", grace=0.2), who)
        assert [r["outcome"] for r in reply.reports] == ["stopped"]
        assert reply.reports[0]["revoke_source"] == "parent"


@pytest.mark.parametrize("who", [Principal.library(), Principal.operator()], ids=["library", "operator"])
def test_the_bump_and_the_revoke_happen_in_the_callers_own_step(who) -> None:
    async def main() -> None:
        async with AsyncSupervisor() as sup:
            up: asyncio.Queue[str] = asyncio.Queue()

            async def ready(ctx) -> None:  # on the loop: the test's own clock of events
                up.put_nowait(ctx.run_id)

            sup.register_tool("ready", ready)
            sup.register_agent("sleeper", session_agents.sleeper, tools=["ready"])
            s = sup.session("s", "sleeper")
            for request in (wire.SessionsSend(key="s", message="again"), wire.SessionsStop(key="s", grace=5)):
                run = await s.send("go")
                assert await asyncio.wait_for(up.get(), WAIT) == run.id
                before = s.generation
                task = asyncio.ensure_future(sup.call(request, who))
                await asyncio.sleep(0)  # exactly one step of the call
                assert s.generation == before + 1, f"{request}: no bump in the first step"
                assert run.channel.revocation is not None, f"{request}: no revoke in the first step"
                await task
                assert marked_processes(run.id) == {}
            await s.kill()

    asyncio.run(main())


def test_every_verb_and_fault_is_documented() -> None:
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "control.md")).read()
    for name, verb in wire.VERBS.items():
        assert f"| `{name}` | {verb.scope.value} |" in doc, f"{name} is not documented in docs/control.md"
        assert verb.request.__struct_config__.tag == name
    for fault in wire.Fault:
        assert f"| {int(fault)} | `{fault.name}`" in doc, f"fault {fault.name} is not documented"
