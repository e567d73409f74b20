"""An MCP server of the tests' own, for the cases third-party servers do not stage on demand.

Each call it receives is written as a JSON line to $FAULTS_LOG (a FIFO or a
file of the test's), so a test waits on it instead of sleeping.
"""

import asyncio
import json
import os
import time

from mcp.server.mcpserver import MCPServer

app = MCPServer("faults")


def _log(**event) -> None:
    path = os.environ.get("FAULTS_LOG")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | (0 if _is_fifo(path) else os.O_CREAT), 0o600)
        os.write(fd, (json.dumps({"pid": os.getpid(), **event}) + "\n").encode())
        os.close(fd)


def _is_fifo(path: str) -> bool:
    import stat

    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


@app.tool()
def echo(text: str, times: int = 1) -> str:
    """Echo the text back, `times` times."""
    _log(tool="echo", text=text)
    return text * times


@app.tool()
async def slow(seconds: float) -> str:
    """Sleep `seconds`, then report done (it logs started, cancelled or done)."""
    _log(tool="slow", event="started")
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        _log(tool="slow", event="cancelled")
        raise
    _log(tool="slow", event="done")
    return "slept"


@app.tool()
def crash() -> str:
    """Exit the server at once, in the middle of the call."""
    _log(tool="crash")
    os._exit(3)


@app.tool()
def hang() -> str:
    """Block the server's loop for good (a server that stops answering)."""
    _log(tool="hang")
    while True:
        time.sleep(1)


@app.tool()
def fail(why: str) -> str:
    """Raise: the call's result is an error with this text."""
    raise ValueError(why)


if __name__ == "__main__":
    app.run()
