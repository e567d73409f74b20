"""Agents and tools named in the daemon tests' configuration files (`daemon_agents:<name>`).

An agent says it is up by writing a line to the FIFO named in its message
(`{"ready": PATH, ...}`), so a test waits on an event, not on a sleep.
"""

from __future__ import annotations

import json
import os
import signal
import time

from behaviours import busy_children, fork_pairs
from deadstop.worker import egress


def _ready(message, **data) -> None:
    path = message.get("ready") if isinstance(message, dict) else None
    if path:
        fd = os.open(path, os.O_WRONLY)
        os.write(fd, (json.dumps({"pid": os.getpid(), **data}) + "\n").encode())
        os.close(fd)


def sleeper(message, **context):
    _ready(message, session=context["session"])
    while True:
        time.sleep(1)


def idle(message, **context):
    """Says it is up, then sleeps without waking (a run at rest, for the idle-cost benchmark)."""
    _ready(message, session=context["session"])
    while True:
        time.sleep(3600)


def ignorer(message, **context):
    """Ignores SIGTERM, like a run that fights its stop."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _ready(message, session=context["session"])
    while True:
        time.sleep(1)


def busy_tree(message, **context):
    """20 busy-looping children: CPU time grows unless the tree is frozen."""
    busy_children(20)
    _ready(message, session=context["session"])
    x = 0
    while True:
        x += 1


def console_worker(message, **context):
    """Three busy children, and a stream of `llm` calls of 7 tokens each: CPU and tokens grow while it runs."""
    busy_children(3)
    _ready(message, session=context["session"])
    for _ in range(100_000):  # bounded; the test stops it long before
        egress.call("llm", 7)
        time.sleep(0.05)


def spender(message, **context):
    """Spends message["tokens"] tokens through the `llm` tool, then waits."""
    egress.call("llm", message["tokens"])
    _ready(message, session=context["session"])
    while True:
        time.sleep(1)


def level(message, **context):
    """One level of a sub-agent tree: 4 children with a grandchild each, then the next level below."""
    depth = message["depth"]
    fork_pairs(4)
    if depth > 1:
        egress.call("sessions.spawn", "level", {**message, "depth": depth - 1}, f"level{depth - 1}")
    _ready(message, session=context["session"], depth=depth)
    while True:
        time.sleep(1)


def emailer(message, **context):
    """Calls the gateway-provided `send_email` (message["count"] times, or until revoked); returns the results."""
    _ready(message, session=context["session"])
    out = []
    for i in range(message.get("count", 1_000_000)):
        try:
            out.append(egress.call("send_email", f"user{i}@example.test", "hello"))
        except egress.DeadstopError as exc:
            out.append({"error": type(exc).__name__, "code": int(getattr(exc, "code", 0)), "message": str(exc)})
            if message.get("stop_on_error", True):
                break
    return out


def echo(message, **context):
    return {"echo": message, "generation": context["generation"]}


# -- tools loaded in the daemon -------------------------------------------------------------------------
def llm(tokens: int, ctx) -> str:
    ctx.report_usage(prompt_tokens=tokens)
    return "ok"


def emitter(message, **context):
    """Emits message["count"] progress events, then returns."""
    for i in range(message["count"]):
        egress.emit("progress", {"i": i})
    return message["count"]


def tool_caller(message, **context):
    """Calls message["tool"] with message["args"] and says what came back on the ready FIFO."""
    try:
        outcome = {"ok": True, "value": egress.call(message["tool"], **message.get("args", {}))}
    except Exception as exc:
        outcome = {"ok": False, "code": int(getattr(exc, "code", 0)), "message": str(exc)}
    _ready(message, session=context["session"], **outcome)
    while True:
        time.sleep(1)


def fetcher(message, **context):
    """GETs message["url"] (through HTTP_PROXY when the agent is proxied) and says what came back."""
    import urllib.error
    import urllib.request

    try:
        outcome = {"ok": True, "body": urllib.request.urlopen(message["url"], timeout=30).read().decode()}
    except urllib.error.HTTPError as exc:
        outcome = {"ok": False, "status": exc.code}
    except OSError as exc:
        outcome = {"ok": False, "error": str(exc)}
    _ready(message, session=context["session"], **outcome)
    while True:
        time.sleep(1)
