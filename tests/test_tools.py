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
