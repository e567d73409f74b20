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
