"""The blocking facade: `Supervisor` and `Run` over the asyncio core.

The core runs on a private event-loop thread owned by the Supervisor, so the
host application can be synchronous, or run its own loop, and still get the
same behaviour. Each verb is one hop onto that loop.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
import time
from typing import Any, Callable, Coroutine, Iterator, Sequence, TypeVar

from ...ipc.control import Health, RunInfo
from ..control.api import ControlAPI
from ..control.policy import LIBRARY, Principal
from ..engine.events import Event
from ..engine.run import AsyncRun, ExitInfo
from ..engine.states import LIVE, RunState
from ..errors import SupervisorClosed
from ..mechanisms.isolation import IsolationProfile
from ..mechanisms.limits import Usage
from ..sessions.session import AsyncSession
from ..store.report import StopReport
from .async_supervisor import AsyncSupervisor

T = TypeVar("T")


class Run:
    """Handle on one run. Cheap to copy; all state lives in the core."""

    def __init__(self, sup: "Supervisor", core: AsyncRun):
        self._sup = sup
        self._core = core

    @property
    def id(self) -> str:
        return self._core.id

    @property
    def pid(self) -> int | None:
        return self._core.pid

    @property
    def state(self) -> RunState:
        return self._core.state

    @property
    def report(self) -> StopReport | None:
        return self._core.report

    def stop(self, grace: float | None = None) -> StopReport:
        t = time.monotonic_ns()
        return self._sup._call(self._core.stop(grace, requested_at=t))

    def kill(self) -> StopReport:
        t = time.monotonic_ns()
        return self._sup._call(self._core.kill(requested_at=t))

    def wait(self, timeout: float | None = None) -> ExitInfo:
        return self._sup._call(self._core.wait(timeout))

    def pause(self) -> bool:
        return self._sup._call(self._core.pause())

    def resume(self) -> bool:
        return self._sup._call(self._core.resume())

    @property
    def generation(self) -> int:
        return self._core.generation

    @property
    def usage(self) -> Usage:
        return self._sup._call(_value(self._core.live_usage))

    def result(self, timeout: float | None = None) -> Any:
        return self._sup._call(self._core.result(timeout))

    def __repr__(self) -> str:
        return f"<Run {self.id} pid={self.pid} {self.state.value}>"


class Session:
    """Handle on one session; all state lives in the core."""

    def __init__(self, sup: "Supervisor", core: AsyncSession):
        self._sup = sup
        self._core = core

    @property
    def key(self) -> str:
        return self._core.key

    @property
    def agent(self) -> str:
        return self._core.agent

    @property
    def generation(self) -> int:
        return self._core.generation

    @property
    def state(self) -> str:
        return self._core.state

    @property
    def active_run(self) -> Run | None:
        run = self._core.active_run
        return Run(self._sup, run) if run is not None and run.state in LIVE else None

    @property
    def runs(self) -> list[Run]:
        """Handles on this session's runs still in memory (live, and the newest ended ones);
        `Supervisor.run_records(key)` has every one of them from the store."""
        core = self._sup._core
        found = self._sup._call(_value(lambda: [r for r in map(core.find_run, self._core.runs) if r is not None]))
        return [Run(self._sup, r) for r in found]

    @property
    def usage(self) -> Usage:
        return self._sup._call(_value(lambda: self._core.usage))

    @property
    def answer(self) -> Any:
        return self._core.answer

    @property
    def children(self) -> list["Session"]:
        return [Session(self._sup, c) for c in self._sup._call(_value(lambda: list(self._core.children)))]

    def info(self) -> dict[str, Any]:
        return self._sup._call(_value(self._core.info))

    # The verbs go through the control API, as any other caller's do.
    def send(self, message: Any) -> Run:
        """Start a run with `message`; takes over an active run (see AsyncSession.send)."""
        return Run(self._sup, self._sup._call(self._control.send(LIBRARY, self.key, message)))

    def stop(self, grace: float | None = None) -> list[StopReport]:
        return self._sup._call(self._control.stop_session(LIBRARY, self.key, grace))

    def kill(self) -> list[StopReport]:
        return self._sup._call(self._control.kill_session(LIBRARY, self.key))

    def pause(self) -> bool:
        """Hold egress and freeze the session's tree; False if nothing was running."""
        return self._sup._call(self._control.pause_session(LIBRARY, self.key))

    def resume(self) -> bool:
        return self._sup._call(self._control.resume_session(LIBRARY, self.key))

    @property
    def _control(self) -> ControlAPI:
        return self._sup._core.control

    def __repr__(self) -> str:
        return f"<Session {self.key} gen={self.generation} {self.state}>"


async def _value(fn: Callable[[], T]) -> T:
    """Read core state on the loop thread, where it is only ever changed."""
    return fn()


class Supervisor:
    """Blocking supervisor; same options as AsyncSupervisor. Use as a context manager."""

    def __init__(self, **options: Any):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="deadstop-loop", daemon=True)
        self._thread.start()
        self._core = AsyncSupervisor(**options)
        try:
            self._call(self._core.open())
        except BaseException:
            self._stop_loop()
            raise
        atexit.register(self.close)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("blocking Supervisor method called from a tool handler on the loop thread; "
                               "use AsyncSupervisor or an async handler")
        if self._loop.is_closed():
            coro.close()  # never scheduled: no "never awaited" warning
            raise SupervisorClosed(f"supervisor {self._core.id} is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def core(self) -> AsyncSupervisor:
        return self._core

    @property
    def id(self) -> str:
        return self._core.id

    @property
    def containment(self) -> str:
        return self._core.containment

    @property
    def limit_enforcement(self) -> dict[str, str]:
        """memory_bytes / processes -> the kernel mechanism this host offers, or "sampled only: <why>"."""
        return self._core.limit_enforcement

    @property
    def journal_path(self) -> str:
        return self._core.journal.path

    @property
    def isolation(self) -> IsolationProfile:
        """The isolation layers runs get here, and why any is missing (see supervisor/mechanisms/isolation.py)."""
        return self._core.isolation

    def register_tool(self, name: str, fn: Callable[..., Any], *, isolated: bool = False, network: str = "none",
                      cwd: str | None = None, env: dict[str, str] | None = None) -> None:
        """See Engine.register_tool (isolated=True: each call in a helper run the caller's stop kills)."""
        self._call(_value(lambda: self._core.register_tool(name, fn, isolated=isolated, network=network, cwd=cwd,
                                                           env=env)))

    def register_mcp_server(self, name: str, command: Sequence[str], *, env: dict[str, str] | None = None,
                            cwd: str | None = None, timeout: float = 60.0, scope: str = "supervisor",
                            network: Any = "none") -> list[str]:
        """Start an MCP server and register its tools as `NAME.TOOL`; their names (see Engine.register_mcp_server)."""
        return self._call(self._core.register_mcp_server(name, command, env=env, cwd=cwd, timeout=timeout,
                                                         scope=scope, network=network))

    def register_agent(self, name: str, target: Any, **options: Any) -> None:
        """See AsyncSupervisor.register_agent."""
        self._call(_value(lambda: self._core.register_agent(name, target, **options)))

    def session(self, key: str, agent: Any = None) -> Session:
        """Create or get a session; `agent` is a registered name or a callable."""
        return Session(self, self._call(_value(lambda: self._core.session(key, agent))))

    def sessions(self, active: bool | None = None, min_tokens: int | None = None) -> list[Session]:
        found = self._call(_value(lambda: self._core.sessions(active=active, min_tokens=min_tokens)))
        return [Session(self, s) for s in found]

    def cleanup(self, older_than: float = 3600) -> list[str]:
        """Remove ended sessions idle for `older_than` seconds, with their runs' records."""
        return self._call(self._core.cleanup(older_than))

    def start(self, target: Any, *args: Any, tools: Sequence[str] = (), grace: float | None = None,
              kwargs: dict[str, Any] | None = None, env: dict[str, str] | None = None,
              cwd: str | None = None, limits: Any = None, network: str = "none",
              private_tmp: bool | None = None, isolation: str | None = None) -> Run:
        """See AsyncSupervisor.start."""
        core = self._call(self._core.start(target, *args, tools=tools, grace=grace, kwargs=kwargs, env=env, cwd=cwd,
                                           limits=limits, network=network, private_tmp=private_tmp,
                                           isolation=isolation))
        return Run(self, core)

    def stop_all(self, grace: float | None = None) -> list[StopReport]:
        """Stop every live run concurrently, those still starting included; their reports in start order."""
        return self._call(self._core.stop_all(grace))

    def run(self, run_id: str) -> Run:
        return Run(self, self._core.get_run(run_id))

    def runs(self) -> list[Run]:
        """Handles on the runs in memory: live ones, and the newest ended ones."""
        return [Run(self, r) for r in self._call(_value(self._core.runs_in_memory))]

    def run_records(self, session: str | None = None, *, active: bool | None = None,
                    limit: int = 1000) -> list[RunInfo]:
        """Every run the store knows, oldest first (ControlAPI's runs.list)."""
        return self._call(_value(lambda: self._core.run_records(session, active=active, limit=limit)))

    def call(self, request: Any, principal: Principal = LIBRARY) -> Any:
        """One verb of the control table as `principal` (see AsyncSupervisor.call); blocks for its reply."""
        return self._call(self._core.call(request, principal))

    def health(self) -> Health:
        return self._call(_value(lambda: self._core.control.health(LIBRARY)))

    def subscribe(self, session: str | None = None, *, lifecycle: bool = False) -> Iterator[Event]:
        """Blocking iterator over events (of one session, or all); ends when the supervisor closes.
        lifecycle: also the supervisor's own events (see AsyncSupervisor.subscribe)."""
        agen = self._core.subscribe(session, lifecycle=lifecycle)

        async def next_event() -> Event:
            return await agen.__anext__()
        # Register the subscriber before returning so no event is missed.
        first = asyncio.run_coroutine_threadsafe(next_event(), self._loop)

        def gen() -> Iterator[Event]:
            fut = first
            while True:
                try:
                    yield fut.result()
                except StopAsyncIteration:
                    return
                fut = asyncio.run_coroutine_threadsafe(next_event(), self._loop)
        return gen()

    def close(self) -> None:
        """Kill every live run, then release sockets, cgroups and the loop thread."""
        atexit.unregister(self.close)
        if self._thread.is_alive():
            try:
                self._call(self._core.close())
            finally:
                self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> "Supervisor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
