"""Tool handlers of every shape reach the run with their result or a typed
error: sync (on a thread), async finishing in its first step, async
suspending any number of times (bare yields, futures, gathers)."""

from __future__ import annotations

import asyncio

import pytest

import behaviours
from deadstop.supervisor import Supervisor


async def immediate(x: int) -> int:
    return x + 1


async def suspends(x: int) -> int:
    await asyncio.sleep(0)  # a bare yield
    await asyncio.sleep(0.01)  # a timer future
    a, b = await asyncio.gather(immediate(x), asyncio.sleep(0.001, result=10))
    return a + b


async def fails_after_await(x: int) -> int:
    await asyncio.sleep(0.001)
    raise LookupError(f"no record {x}")


async def fails_at_once(x: int) -> int:
    raise LookupError(f"no record {x}")


def blocking(x: int) -> int:
    return x * 2


def raises_a_refusal(x: int) -> int:
    from deadstop.ipc.errors import EgressRefused, Revoked

    raise (Revoked("not really") if x == 1 else EgressRefused("odd", code=99))


@pytest.mark.parametrize("tool,expected", [
    ("immediate", {"ok": True, "value": 2}),
    ("suspends", {"ok": True, "value": 12}),
    ("blocking", {"ok": True, "value": 2}),
    ("fails_after_await", {"ok": False, "type": "ToolError", "code": 9}),
    ("fails_at_once", {"ok": False, "type": "ToolError", "code": 9}),
    # A handler raising a wire error class does not get to speak for the broker.
    ("raises_a_refusal", {"ok": False, "type": "ToolError", "code": 9}),
])
def test_handler_shapes(tool, expected) -> None:
    with Supervisor() as sup:
        for fn in (immediate, suspends, fails_after_await, fails_at_once, blocking, raises_a_refusal):
            sup.register_tool(fn.__name__, fn)
        out = sup.start(behaviours.calls_and_reports, tool, 1, tools=[tool]).result(timeout=30)
    message = out.pop("message", "")
    assert out == expected
    if tool.startswith("fails"):
        assert "LookupError: no record 1" in message


def plain(a, b=2, c=3):  # type: ignore[no-untyped-def]
    return [a, b, c]


def plain_with_ctx(a, ctx, b=2):  # type: ignore[no-untyped-def]
    return [a, b, ctx.tool]


ARGUMENTS = [([], {}), ([1], {}), ([1, 2, 3], {}), ([1, 2, 3, 4], {}), ([], {"a": 1}), ([1], {"a": 1}),
             ([1], {"c": 9}), ([], {"b": 1}), ([1], {"d": 1}), ([1, 2], {"b": 5}), ([], {"a": 1, "b": 1, "c": 1})]


@pytest.mark.parametrize("fn", [plain, plain_with_ctx])
def test_arguments_bind_as_the_handlers_signature_says(fn) -> None:
    """The broker's fast binding check agrees with inspect.Signature.bind on every case, through a real run."""
    import inspect

    import batch_agents

    class _Ctx:
        tool = fn.__name__

    sig = inspect.signature(fn)
    expected = {}
    for i, (args, kwargs) in enumerate(ARGUMENTS, start=1):
        try:
            bound = sig.bind(*args, **({**kwargs, "ctx": _Ctx()} if "ctx" in sig.parameters else kwargs))
            expected[i] = (True, fn(*bound.args, **bound.kwargs))
        except TypeError:
            expected[i] = (False, 11)  # BAD_ARGUMENTS
    batch = [{"verb": "call", "id": i, "tool": fn.__name__, "args": a, "kwargs": k}
             for i, (a, k) in enumerate(ARGUMENTS, start=1)]
    with Supervisor() as sup:
        sup.register_tool(fn.__name__, fn)
        got = sup.start(batch_agents.exchange, [{"version": "ds2", "body": batch}], len(batch),
                        tools=[fn.__name__]).result(timeout=30)
    replies = {r["id"]: (True, r.get("result")) if r["ok"] else (False, r["error"]["code"])
               for _v, body in got for r in body}
    assert replies == expected


def test_sync_handlers_in_flight_together_each_get_a_thread() -> None:
    """Eight blocking calls in flight at once meet at a barrier of eight: none waits for another to return."""
    import threading

    import batch_agents

    barrier = threading.Barrier(8, timeout=30)

    def meet(i: int) -> int:
        barrier.wait()  # breaks (BrokenBarrierError) unless all eight run at the same time
        return i

    with Supervisor() as sup:
        sup.register_tool("meet", meet)
        got = sup.start(batch_agents.many_acalls, "meet", 8, tools=["meet"]).result(timeout=60)
    assert got == list(range(8))


def test_sync_handlers_share_no_more_threads_than_configured() -> None:
    """With tool_threads=2, three blocking calls in flight: two run, the third starts when one returns."""
    import threading

    import batch_agents

    lock = threading.Lock()
    running, most = [0], [0]
    two_in = threading.Barrier(2, timeout=30)

    def counted(i: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            if i < 2:
                two_in.wait()  # the first two overlap for sure; the third cannot join them
            return i
        finally:
            with lock:
                running[0] -= 1

    with Supervisor(tool_threads=2) as sup:
        sup.register_tool("counted", counted)
        got = sup.start(batch_agents.many_acalls, "counted", 3, tools=["counted"]).result(timeout=60)
    assert got == [0, 1, 2] and most[0] == 2


STUCK_HANDLER_HOST = """
import sys, threading
sys.path.insert(0, {tests!r})
import behaviours
from deadstop.supervisor import Supervisor

entered = threading.Event()
def stuck() -> None:
    entered.set()
    threading.Event().wait()  # never returns

with Supervisor(state_dir={state!r}) as sup:
    sup.register_tool("stuck", stuck)
    run = sup.start(behaviours.slow_tool_caller, "stuck", tools=["stuck"], grace=0.2)
    assert entered.wait(30)
    report = run.stop()
    print(len(report.handlers_outlived_revoke), flush=True)
print("closed", flush=True)
"""


def test_a_handler_stuck_for_ever_keeps_no_host_from_exiting(tmp_path) -> None:
    """A blocking handler that never returns outlives its run (the report says so) but not its host:
    the supervisor closes and the host's interpreter exits, instead of joining the stuck thread."""
    import os
    import subprocess
    import sys

    script = STUCK_HANDLER_HOST.format(tests=os.path.dirname(__file__), state=str(tmp_path / "state"))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and out.split() == ["1", "closed"]
