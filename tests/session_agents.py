"""Agent targets for the session tests: `agent(message, **context)`.

They run in their own processes; each tells the test it is set up through
the `ready` tool, so tests wait on events rather than on sleeps.
"""

from __future__ import annotations

import json
import threading
import time

from behaviours import busy_children, fork_pairs
from deadstop.worker import egress


def _ready(**data) -> None:
    try:
        egress.call("ready", **data)
    except egress.DeadstopError:
        pass  # stopped while the reply was on its way


def flooder_or_echo(message, **context):
    """'flood': call `tick` as fast as possible from 3 threads. Anything else: return the message."""
    if message != "flood":
        return {"message": message, "generation": context["generation"], "messages": context["messages"]}

    def flood() -> None:
        while True:
            try:
                egress.call("tick")
            except Exception:
                return

    for _ in range(3):
        threading.Thread(target=flood, daemon=True).start()
    _ready()
    flood()


def emitter(message, **context):
    """Emit progress events with its generation forever (until stopped), or answer at once."""
    if message.startswith("answer"):
        return {"answer": message, "generation": context["generation"]}
    _ready()
    i = 0
    while True:
        try:
            egress.emit("progress", {"generation": context["generation"], "i": i})
        except Exception:
            time.sleep(0.001)
        i += 1


def emits_then_waits(message, **context):
    """Emit `message` (a count) progress events, say so through `ready`, then wait to be stopped."""
    for i in range(int(message)):
        egress.emit("progress", {"i": i})
    _ready()
    time.sleep(600)


def busy_tree(message, **context):
    """20 busy-looping children (CPU time grows unless frozen)."""
    busy_children(20)
    _ready()
    x = 0
    while True:
        x += 1


def burst_then_wait(message, **context):
    """Send `pause_me` and then 20 numbered `seq` calls back to back (async), report the results."""
    import asyncio

    async def go():
        first = asyncio.ensure_future(egress.acall("pause_me"))
        calls = [asyncio.ensure_future(egress.acall("seq", i)) for i in range(20)]
        await first
        return await asyncio.gather(*calls)

    return asyncio.run(go())


def level(message, **context):
    """One level of a sub-agent tree: fork 4 children each with a grandchild, spawn the next level, wait."""
    depth = int(message)
    fork_pairs(4)  # the whole tree exists before anyone is told we are ready
    if depth > 1:
        egress.call("sessions.spawn", "level", str(depth - 1), f"level{depth - 1}")
    _ready(depth=depth)
    while True:
        time.sleep(1)


def session_tool_caller(message, **context):
    """Message is a JSON list of [tool, args] steps; returns each outcome (value or error code)."""
    out = []
    for tool, args in json.loads(message):
        try:
            out.append({"ok": True, "value": egress.call(tool, *args)})
        except egress.DeadstopError as exc:
            out.append({"ok": False, "code": int(getattr(exc, "code", 0)), "message": str(exc)})
    return out


def sleeper(message, **context):
    _ready()
    while True:
        time.sleep(1)
