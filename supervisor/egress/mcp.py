"""MCP servers as tool sources: each tool a server lists becomes a deadstop tool `SERVER.TOOL`.

A server is a process speaking the Model Context Protocol on its stdin and
stdout (the `mcpServers` shape gateways and desktop clients share: a
command, its arguments, its environment), reached through the official
`mcp` SDK. Its tools go through the broker like any other: allow-listed per
agent, their arguments checked against the tool's input schema before the
call leaves (a refusal is BAD_ARGUMENTS and never reaches the server), the
result passed back as the SDK gives it.

Revocation: a call in flight is a task of the broker's, cancelled at the
revoke like any async handler; the SDK then sends the server
`notifications/cancelled` for it, and whatever the server answers later is
dropped (the journal says `cancelled`).

Faults stay with their server: one that exits or stops answering fails its
calls with TOOL_UNAVAILABLE or TOOL_TIMEOUT, is shut down, and is started
again by the next call, no sooner than a backoff that doubles with each
failure in a row (0.5 s up to 30 s). Other servers, and the runs, are not
touched.

The SDK is imported on first use: `pip install 'deadstop[mcp]'`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import Any, Callable, Iterable

from ...ipc.errors import ErrorCode
from ..errors import DeadstopError
from .tools import ToolFailure

log = logging.getLogger("deadstop.mcp")

BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0
START_TIMEOUT = 30.0  # seconds a server may take to start and list its tools
#: The SDK closes a server's stdin, waits 2 s, then kills its process tree (bounded waits of about
#: 6.5 s in all); the connection task is given that much and more before it is cancelled.
STOP_BOUND = 15.0
SEPARATOR = "."


class McpUnavailable(DeadstopError):
    """The `mcp` SDK is not installed, or a server could not be started at registration."""


@dataclasses.dataclass(frozen=True)
class McpServerSpec:
    """An MCP server as configured: `command` is argv (the mcpServers shape's command plus args)."""

    name: str
    command: list[str]
    env: dict[str, str] | None = None
    cwd: str | None = None
    timeout: float = 60.0  # seconds a call may take before it is cancelled at the server (TOOL_TIMEOUT)
    #: "supervisor": one plain child process serves every run; "session": one per session, started as a
    #: run of its own (contained and isolated like any run) and killed when its session stops
    scope: str = "supervisor"
    network: Any = "none"  # a session-scoped server's network: "none", "host" or a Proxy

    def __post_init__(self) -> None:
        if not self.name or SEPARATOR in self.name or len(self.name) > 100:
            raise ValueError(f"an MCP server's name is 1-100 characters without {SEPARATOR!r}: {self.name!r}")
        if not self.command or not all(isinstance(a, str) and a for a in self.command):
            raise ValueError(f"MCP server {self.name!r}: command must be a non-empty list of strings")
        if self.scope not in ("supervisor", "session"):
            raise ValueError(f"MCP server {self.name!r}: scope is 'supervisor' or 'session', not {self.scope!r}")
        if self.timeout <= 0:
            raise ValueError(f"MCP server {self.name!r}: timeout must be > 0")


@dataclasses.dataclass(frozen=True)
class McpTool:
    """One tool of a server, as deadstop registers it."""

    server: str
    name: str  # the server's own name for it
    description: str
    input_schema: dict[str, Any]

    @property
    def qualified(self) -> str:
        return f"{self.server}{SEPARATOR}{self.name}"


class McpServer:
    """One server process and its SDK session; started on demand, restarted after a failure.

    The SDK's context managers must be entered and left in one task, so a
    connection task of its own holds them for the server's lifetime; calls
    are made from the broker's tasks on the session it opened.
    """

    def __init__(self, spec: McpServerSpec, launcher: Callable[[], Any] | None = None):
        self.spec = spec
        #: session scope: an async callable starting the server as a run -> (AsyncRun, its stdio socket)
        self._launcher = launcher
        self.run: Any = None  # that run, while it serves
        self.tools: dict[str, McpTool] = {}
        self._session: Any = None
        self._connection: asyncio.Task[None] | None = None
        self._up: asyncio.Future[Any] | None = None
        self._leave: asyncio.Event | None = None
        self._failures = 0
        self._not_before = 0.0  # monotonic: no restart before this
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()  # connections being shut down (their process killed)
        self.closed = False

    # -- lifetime ---------------------------------------------------------------------------------
    async def start(self) -> list[McpTool]:
        """Start the server and read its tools (registration: a failure here raises McpUnavailable)."""
        try:
            await self._ensure()
        except ToolFailure as exc:
            raise McpUnavailable(f"MCP server {self.spec.name!r} {exc}") from None
        return list(self.tools.values())

    @property
    def _up_now(self) -> bool:
        return self._session is not None and self._connection is not None and not self._connection.done()

    async def _ensure(self) -> Any:
        if self._up_now:
            return self._session
        async with self._lock:
            if self._up_now:  # another call started it while this one waited
                return self._session
            if self.closed:
                raise ToolFailure(ErrorCode.TOOL_UNAVAILABLE, f"MCP server {self.spec.name!r} is closed")
            wait = self._not_before - time.monotonic()
            if wait > self.spec.timeout:
                raise ToolFailure(ErrorCode.TOOL_UNAVAILABLE,
                                  f"MCP server {self.spec.name!r} is down; it is started again in {wait:.1f} s")
            if wait > 0:
                await asyncio.sleep(wait)  # the backoff: a server that keeps failing is not restarted in a loop
            loop = asyncio.get_running_loop()
            self._up = loop.create_future()
            self._leave = asyncio.Event()
            self._connection = loop.create_task(self._connect(self._up, self._leave), name=f"mcp-{self.spec.name}")
            try:
                self._session = await asyncio.wait_for(asyncio.shield(self._up), START_TIMEOUT)
            except BaseException as exc:
                self._failed()
                await self._stop_connection()
                if isinstance(exc, asyncio.TimeoutError):
                    raise ToolFailure(ErrorCode.TOOL_UNAVAILABLE, f"did not start within {START_TIMEOUT:g} s") from None
                if isinstance(exc, ToolFailure):
                    raise
                raise ToolFailure(ErrorCode.TOOL_UNAVAILABLE, f"could not be started: {exc}") from None
            return self._session

    async def _connect(self, up: asyncio.Future[Any], leave: asyncio.Event) -> None:
        try:
            from mcp import ClientSession, StdioServerParameters
            from mcp.client.stdio import stdio_client
        except ImportError:
            if not up.done():
                up.set_exception(McpUnavailable("the mcp SDK is not installed: pip install 'deadstop[mcp]'"))
            return
        env = {**server_environment(), **(self.spec.env or {})}
        params = StdioServerParameters(command=self.spec.command[0], args=self.spec.command[1:], env=env,
                                       cwd=self.spec.cwd)
        try:
            with open(os.devnull, "w") as quiet:
                if self._launcher is not None:
                    self.run, sock = await self._launcher()
                    streams: Any = _socket_streams(sock)
                else:
                    streams = stdio_client(params, errlog=quiet)
                async with streams as (read, write):
                    async with ClientSession(read, write) as session:
                        await session.initialize()
                        listed = await session.list_tools()
                        self.tools = {t.name: McpTool(self.spec.name, t.name, t.description or "",
                                                      dict(t.input_schema or {})) for t in listed.tools}
                        up.set_result(session)
                        await leave.wait()
        except BaseException as exc:
            if not up.done():
                up.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
            if not isinstance(exc, (asyncio.CancelledError, Exception)):
                raise
        finally:
            if self._up is up:  # this is still the current connection (not one replaced since)
                self._session = None
            if self.run is not None:  # a session-scoped server's run ends with its connection
                self.kill_run("its MCP connection closed")

    async def _stop_connection(self) -> None:
        task, leave = self._connection, self._leave
        self._session = self._connection = self._leave = None
        if leave is not None:
            leave.set()
        if task is not None and not task.done():
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            try:
                await asyncio.wait_for(asyncio.shield(task), STOP_BOUND)
            except (asyncio.TimeoutError, Exception):
                task.cancel()

    def _failed(self) -> None:
        self._failures += 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self._failures - 1))
        self._not_before = time.monotonic() + delay

    def kill_run(self, why: str) -> Any:
        """A session-scoped server: kill its run now (revoked and SIGKILLed from this step); its stop task."""
        run, self.run = self.run, None
        if run is None:
            return None
        return run.begin_end("kill", "parent", why)

    async def close(self) -> None:
        """Shut the server down, and any earlier process of it still being shut down: none outlives this."""
        self.closed = True
        await self._stop_connection()
        if self._retiring:
            await asyncio.wait(set(self._retiring), timeout=STOP_BOUND)

    # -- calls ----------------------------------------------------------------------------------------
    async def call(self, tool: str, arguments: dict[str, Any]) -> Any:
        """The tool's result as JSON (the MCP CallToolResult), or ToolFailure / an error for the broker.

        Cancelling the calling task (the run's revoke) abandons the request:
        the SDK sends the server `notifications/cancelled` for it.
        """
        from mcp.shared.exceptions import MCPError

        session = await self._ensure()
        try:
            result = await asyncio.wait_for(session.call_tool(tool, arguments), self.spec.timeout)
        except asyncio.TimeoutError:
            self._failed()  # a server that does not answer is started afresh for the next call
            asyncio.get_running_loop().create_task(self._stop_connection())
            raise ToolFailure(ErrorCode.TOOL_TIMEOUT, f"MCP server {self.spec.name!r} did not answer {tool!r} "
                                                      f"within {self.spec.timeout:g} s; it is restarted") from None
        except MCPError as exc:
            if self._connection is None or self._connection.done() or "closed" in str(exc).lower():
                self._failed()
                await self._stop_connection()
                raise ToolFailure(ErrorCode.TOOL_UNAVAILABLE, f"MCP server {self.spec.name!r} went away during "
                                                              f"{tool!r} ({exc}); the next call starts it again") from None
            raise RuntimeError(f"MCP error from {self.spec.name!r}: {exc}") from None
        self._failures = 0
        body = result.model_dump(mode="json", by_alias=True, exclude_none=True)
        if body.get("isError"):
            text = " ".join(c.get("text", "") for c in body.get("content", []) if c.get("type") == "text")
            raise RuntimeError(text or f"{tool} reported an error")  # TOOL_ERROR, with the server's own words
        return body


def _socket_streams(sock: Any) -> Any:
    """The SDK's two streams over a connected socket: a session-scoped server's stdin and stdout."""
    import contextlib

    @contextlib.asynccontextmanager
    async def streams() -> Any:
        import anyio
        import mcp_types as types
        from mcp.shared.message import SessionMessage

        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=16 << 20)
        incoming_w, incoming = anyio.create_memory_object_stream[Any](0)
        outgoing, outgoing_r = anyio.create_memory_object_stream[Any](0)

        async def read_loop() -> None:
            try:
                async with incoming_w:
                    while line := await reader.readline():
                        try:
                            message: Any = SessionMessage(types.jsonrpc_message_adapter.validate_json(line, by_name=False))
                        except ValueError as exc:
                            message = exc
                        await incoming_w.send(message)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError, ConnectionError, ValueError):
                pass

        async def write_loop() -> None:
            try:
                async with outgoing_r:
                    async for message in outgoing_r:
                        writer.write(message.message.model_dump_json(by_alias=True, exclude_unset=True).encode() + b"\n")
                        await writer.drain()
            except (anyio.ClosedResourceError, anyio.BrokenResourceError, ConnectionError):
                pass

        async with anyio.create_task_group() as group:
            group.start_soon(read_loop)
            group.start_soon(write_loop)
            try:
                yield incoming, outgoing
            finally:
                writer.close()
                group.cancel_scope.cancel()

    return streams()


def schema_checker(schema: dict[str, Any]) -> Callable[[list[Any], dict[str, Any]], None]:
    """A check of a call's arguments against the tool's JSON Schema, raising TypeError (BAD_ARGUMENTS)."""
    import jsonschema

    validator_class = jsonschema.validators.validator_for(schema)
    validator = validator_class(schema)

    def check(args: list[Any], kwargs: dict[str, Any]) -> None:
        if args:
            raise TypeError("an MCP tool takes keyword arguments only (its input schema's properties)")
        errors = sorted(validator.iter_errors(kwargs), key=lambda e: list(e.path))
        if errors:
            where = "/".join(str(p) for p in errors[0].path) or "(arguments)"
            raise TypeError(f"{where}: {errors[0].message}")

    return check


def server_environment() -> dict[str, str]:
    """What a server inherits: enough to find its interpreter and its home, nothing of the supervisor's secrets."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "LOGNAME", "SHELL", "TERM", "NODE_PATH",
            "PYTHONPATH", "VIRTUAL_ENV")
    return {k: v for k, v in os.environ.items() if k in keep}


class McpServers:
    """The supervisor's MCP servers, by name; they register their tools in a ToolRegistry.

    A session-scoped server's tools are registered once (read from a first
    instance, which is then stopped); each session's calls go to a server
    run of that session, started on its first call and killed when the
    session stops (end_sessions).
    """

    def __init__(self, register: Callable[..., None], unregister: Callable[[str], None]):
        self._register, self._unregister = register, unregister
        self.servers: dict[str, McpServer] = {}
        self.session_scoped: dict[str, McpServerSpec] = {}
        self.session_tools: dict[str, list[str]] = {}  # a session-scoped server's registered tool names
        self.per_session: dict[tuple[str, str], McpServer] = {}
        #: set by the engine: start a server as a run -> (AsyncRun, socket); a run id -> its session key
        self.launch: Callable[[McpServerSpec], Any] | None = None
        self.session_of: Callable[[str], str | None] = lambda run_id: None

    async def add(self, spec: McpServerSpec) -> list[str]:
        if spec.name in self.servers or spec.name in self.session_scoped:
            await self.remove(spec.name)
        if spec.scope == "session":
            return await self._add_session_scoped(spec)
        server = McpServer(spec)
        tools = await server.start()
        self.servers[spec.name] = server
        for tool in tools:
            self._register(tool.qualified, _handler(server, tool.name), schema_checker(tool.input_schema))
        return sorted(t.qualified for t in tools)

    async def _add_session_scoped(self, spec: McpServerSpec) -> list[str]:
        if self.launch is None:
            raise McpUnavailable(f"MCP server {spec.name!r}: session scope needs the engine's launcher")
        launch = self.launch
        first = McpServer(spec, lambda: launch(spec))
        try:
            tools = await first.start()
        finally:
            await first.close()
            first.kill_run("its tools are listed")
        self.session_scoped[spec.name] = spec
        self.session_tools[spec.name] = sorted(t.qualified for t in tools)
        for tool in tools:
            self._register(tool.qualified, self._session_handler(spec, tool.name), schema_checker(tool.input_schema))
        return sorted(t.qualified for t in tools)

    def _session_handler(self, spec: McpServerSpec, tool: str) -> Callable[..., Any]:
        async def call_session_mcp_tool(ctx: Any, **arguments: Any) -> Any:
            key = self.session_of(ctx.run_id)
            if key is None:
                raise ToolFailure(ErrorCode.TOOL_UNAVAILABLE, f"MCP server {spec.name!r} is per session; "
                                                              f"run {ctx.run_id} belongs to none")
            server = self.per_session.get((spec.name, key))
            if server is None or server.closed:
                assert self.launch is not None
                launch = self.launch
                server = self.per_session[(spec.name, key)] = McpServer(spec, lambda: launch(spec))
            return await server.call(tool, arguments)

        call_session_mcp_tool.__qualname__ = f"mcp-session:{spec.name}.{tool}"
        return call_session_mcp_tool

    def end_sessions(self, keys: Iterable[str]) -> list[Any]:
        """Kill the server runs of these sessions now (their stop tasks); their connections close after."""
        keys = set(keys)
        tasks = []
        for slot in [slot for slot in self.per_session if slot[1] in keys]:
            server = self.per_session.pop(slot)
            server.closed = True
            task = server.kill_run(f"its session {slot[1]} stopped")
            if task is not None:
                tasks.append(task)
            asyncio.get_running_loop().create_task(server.close())
        return tasks

    async def remove(self, name: str) -> None:
        server = self.servers.pop(name, None)
        spec = self.session_scoped.pop(name, None)
        if server is not None:
            for tool in server.tools.values():
                self._unregister(tool.qualified)
            await server.close()
        if spec is not None:
            for qualified in self.session_tools.pop(name, []):
                self._unregister(qualified)
            for slot in [slot for slot in self.per_session if slot[0] == name]:
                doomed = self.per_session.pop(slot)
                doomed.kill_run("its server was removed")
                await doomed.close()

    async def close(self) -> None:
        everyone = [*self.servers.values(), *self.per_session.values()]
        for server in self.per_session.values():
            server.kill_run("the supervisor is closing")
        await asyncio.gather(*(s.close() for s in everyone), return_exceptions=True)
        self.servers.clear()
        self.per_session.clear()


def _handler(server: McpServer, tool: str) -> Callable[..., Any]:
    async def call_mcp_tool(**arguments: Any) -> Any:
        return await server.call(tool, arguments)

    call_mcp_tool.__qualname__ = f"mcp:{server.spec.name}.{tool}"
    return call_mcp_tool


__all__ = ["McpServer", "McpServerSpec", "McpServers", "McpTool", "McpUnavailable", "schema_checker",
           "server_environment"]
