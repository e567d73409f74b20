"""The control verbs: one table that every caller of a supervisor speaks.

A caller (the library in-process, an operator at the command line, a gateway
over RPC, a run through its `sessions.*` tools) names a verb and sends its
request struct; it gets the verb's reply struct or a `ControlFault` with a
numbered `Fault`. The numbers and verb names are part of the protocol
(docs/control.md) and never change meaning; fields may be added with
defaults.

Each verb needs one scope: `read` verbs change nothing, `write` verbs start or
end runs of a session, `admin` verbs remove records. Which caller holds which
scope, and which sessions it may touch, is the supervisor's policy
(supervisor/control/policy.py), not part of the wire.

This module imports msgspec only; neither the spawner nor a run loads it.
"""

from __future__ import annotations

import enum
from typing import Any, Iterable, Union

import msgspec

#: Bumped when a verb changes incompatibly; readers refuse a newer major.
CONTROL_VERSION = "1.0"


class Scope(str, enum.Enum):
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"


class Fault(enum.IntEnum):
    """Why a verb was refused. Numbered like supervisord's faults: stable, grouped by tens."""

    UNKNOWN_VERB = 1  # no such verb in this table
    BAD_ARGUMENTS = 2  # the request does not fit the verb's struct, or a value is out of range
    UNSUPPORTED_VERSION = 3
    NO_SUCH_SESSION = 10
    NO_SUCH_RUN = 11
    NO_SUCH_AGENT = 12
    FORBIDDEN = 20  # the caller lacks the verb's scope
    POLICY_DENIED = 21  # the caller may use the verb, but not on this session (not its own, an ancestor, ...)
    NOT_RUNNING = 30  # the run or session is not in a state the verb applies to
    INVALID_TARGET = 31  # an agent or its options cannot be run here
    LIMIT_UNENFORCEABLE = 32
    SHUTTING_DOWN = 40  # the supervisor is closed or closing
    STATE_DIR_IN_USE = 41
    UNREACHABLE = 42  # (a client's own) no daemon answered where it looked; the message says where
    TIMED_OUT = 43  # (a client's own) no reply within the caller's timeout; the verb may still have run
    STOP_INCOMPLETE = 50  # the stop ran but something survived it; the reply's report says what
    FAILED = 90  # the verb ran and failed for another reason; the message says why


class ControlFault(Exception):
    """A refused verb: its `Fault` number and a one-line message for a person."""

    def __init__(self, fault: Fault, message: str, *, detail: Any = None):
        super().__init__(message)
        self.fault = fault
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.args[0]} (fault {int(self.fault)} {self.fault.name})"


# -- info structs ---------------------------------------------------------------------------------
class _Info(msgspec.Struct, kw_only=True, omit_defaults=False):
    def to_builtins(self) -> Any:
        return msgspec.to_builtins(self)


class SessionInfo(_Info):
    key: str
    agent: str
    state: str  # idle | starting | running | paused | stopping
    generation: int
    parent: Union[str, None] = None
    label: Union[str, None] = None
    children: list[str] = []
    active_run: Union[str, None] = None
    runs: list[str] = []
    usage: dict[str, float] = {}
    last_outcome: Union[str, None] = None
    aborted_last_run: bool = False
    answer_generation: Union[int, None] = None
    created_wall: float = 0.0  # wall-clock seconds
    updated_wall: float = 0.0  # the last message, stop, end or answer


class RunInfo(_Info):
    id: str
    state: str
    kind: str
    target: str
    session: Union[str, None] = None
    generation: int = 0
    pid: Union[int, None] = None
    containment: Union[str, None] = None
    tools: list[str] = []
    usage: dict[str, float] = {}
    report: Union[dict[str, Any], None] = None


class AgentInfo(_Info):
    name: str
    kind: str  # python | argv
    tools: list[str] = []
    limits: dict[str, Any] = {}
    may_stop_sessions: bool = False
    peers: list[str] = []


class Health(_Info):
    supervisor_id: str
    version: str
    pid: int
    containment: str
    isolation: dict[str, Any] = {}
    live_runs: int = 0
    sessions: int = 0
    uptime: float = 0.0
    control_version: str = CONTROL_VERSION


class EventInfo(_Info):
    run_id: str
    kind: str
    data: Any = None
    t_ns: int = 0
    session: Union[str, None] = None
    generation: int = 0


class EgressRow(_Info):
    """One row of a run's egress log: a decision of the broker (or of the fence) about one request."""

    seq: int
    t_ns: int
    verb: str  # call | emit | result | error | inbox | ...
    decision: str  # dispatched | completed | failed | refused | cancelled | outlived_revoke | held | allowed | fenced
    req_id: Union[int, None] = None
    tool: Union[str, None] = None
    code: Union[int, None] = None  # the refusal's or cancellation's error code
    detail: Union[str, None] = None


class EgressReply(_Info):
    """A page of a run's egress log, and the check over all of it: nothing dispatched after the revoke.

    dispatched_after_revoke lists every `dispatched` row later than
    revoked_at, whatever page was asked for; empty is the promise kept.
    """

    run_id: str
    rows: list[EgressRow] = []
    offset: int = 0
    total: int = 0
    revoked_at: Union[int, None] = None
    revoke_source: Union[str, None] = None
    dispatched_after_revoke: list[EgressRow] = []
    #: calls whose blocking handler was running at the revoke and returned after it (effect possible)
    outlived_revoke: list[EgressRow] = []


class StopReply(_Info):
    """What a stop or kill ended: one report per run of the tree that was live.

    already_ended: nothing of the tree was running (a success, said so).
    waited: false for `wait=false`, where `revoked` lists the runs whose
    egress is closed and whose stop is under way; their reports follow in
    runs.show and the event stream (run.ended).
    """

    key: str
    reports: list[dict[str, Any]] = []
    already_ended: bool = False
    waited: bool = True
    revoked: list[str] = []


class StopAllReply(_Info):
    """What sessions.stop_all ended: the sessions, and one report per run that was live.

    Without `wait`, `revoked` lists the runs whose egress is closed and
    whose stop is under way, and `reports` is empty.
    """

    sessions: list[str] = []
    reports: list[dict[str, Any]] = []
    waited: bool = True
    revoked: list[str] = []
    trees: dict[str, list[str]] = {}  # session key -> the ids of the runs of its tree that were revoked


class SendReply(_Info):
    key: str
    run_id: str
    generation: int


# -- requests -------------------------------------------------------------------------------------
class Request(msgspec.Struct, tag_field="verb", forbid_unknown_fields=True, kw_only=True):
    pass


class SessionsList(Request, tag="sessions.list"):
    active: Union[bool, None] = None
    min_tokens: Union[int, None] = None
    agent: Union[str, None] = None
    older_than: Union[float, None] = None  # unchanged for at least this many seconds


class SessionsShow(Request, tag="sessions.show"):
    key: str


class SessionsSend(Request, tag="sessions.send"):
    key: str
    message: Any
    agent: Union[str, None] = None  # creates the session when it does not exist
    #: A retried send with the same key returns the first one's reply instead of a second takeover.
    idempotency_key: Union[str, None] = None


class SessionsSpawn(Request, tag="sessions.spawn"):
    """A run starts a sub-agent session below its own (a run's verb only)."""

    agent: str
    message: Any
    label: Union[str, None] = None


class SessionsStop(Request, tag="sessions.stop"):
    key: str
    grace: Union[float, None] = None
    wait: bool = True  # false: reply once the tree is revoked, not once it is gone


class SessionsKill(Request, tag="sessions.kill"):
    key: str


class SessionsStopAll(Request, tag="sessions.stop_all"):
    """Every top-level session with something live or queued, in one step (their trees with them)."""

    grace: Union[float, None] = None
    wait: bool = True
    kill: bool = False  # revoke and SIGKILL at once instead of SIGTERM and the grace


class SessionsPause(Request, tag="sessions.pause"):
    key: str


class SessionsResume(Request, tag="sessions.resume"):
    key: str


class SessionsCleanup(Request, tag="sessions.cleanup"):
    older_than: float = 3600.0
    dry_run: bool = False


class RunsList(Request, tag="runs.list"):
    session: Union[str, None] = None
    active: Union[bool, None] = None
    limit: int = 1000


class RunsShow(Request, tag="runs.show"):
    run_id: str


class RunsStop(Request, tag="runs.stop"):
    run_id: str
    grace: Union[float, None] = None


class RunsKill(Request, tag="runs.kill"):
    run_id: str


class RunsEgress(Request, tag="runs.egress"):
    run_id: str
    offset: int = 0
    limit: int = 100  # at most 1000


class AgentsList(Request, tag="agents.list"):
    pass


class EventsSubscribe(Request, tag="events.subscribe"):
    session: Union[str, None] = None


class HealthCheck(Request, tag="health"):
    pass


AnyRequest = Union[SessionsList, SessionsShow, SessionsSend, SessionsSpawn, SessionsStop, SessionsKill, SessionsStopAll,
                   SessionsPause, SessionsResume, SessionsCleanup, RunsList, RunsShow, RunsStop, RunsKill, RunsEgress, AgentsList,
                   EventsSubscribe, HealthCheck]


class Verb(msgspec.Struct, frozen=True):
    name: str
    request: type
    reply: Any  # the reply type (a struct, list of structs, bool, list of str, or a stream of EventInfo)
    scope: Scope
    doc: str


def _verb(request: type, reply: Any, scope: Scope, doc: str) -> Verb:
    name = request.__struct_config__.tag  # type: ignore[attr-defined]
    return Verb(name, request, reply, scope, doc)


#: verb name -> its definition, in the order the documentation lists them
VERBS: dict[str, Verb] = {v.name: v for v in (
    _verb(SessionsList, list[SessionInfo], Scope.READ, "sessions, optionally only (in)active or with >= min_tokens"),
    _verb(SessionsShow, SessionInfo, Scope.READ, "one session"),
    _verb(SessionsSend, SendReply, Scope.WRITE, "a message to a session (takes over its active run)"),
    _verb(SessionsSpawn, SendReply, Scope.WRITE, "a run starts a sub-agent session below its own"),
    _verb(SessionsStop, StopReply, Scope.WRITE, "revoke and stop the session's whole tree"),
    _verb(SessionsKill, StopReply, Scope.WRITE, "revoke and kill the session's whole tree"),
    _verb(SessionsStopAll, StopAllReply, Scope.WRITE, "every busy session's tree in one step: one revoke, one commit"),
    _verb(SessionsPause, bool, Scope.WRITE, "hold egress and freeze the tree; false if nothing was running"),
    _verb(SessionsResume, bool, Scope.WRITE, "thaw the tree and release held requests"),
    _verb(SessionsCleanup, list[str], Scope.ADMIN, "remove idle sessions (and their records) older than older_than s"),
    _verb(RunsList, list[RunInfo], Scope.READ, "runs, live and ended (read back from the store)"),
    _verb(RunsShow, RunInfo, Scope.READ, "one run, with its stop report once it ended"),
    _verb(RunsStop, RunInfo, Scope.WRITE, "revoke, SIGTERM, grace, SIGKILL, sweep one run"),
    _verb(RunsKill, RunInfo, Scope.WRITE, "revoke and SIGKILL one run"),
    _verb(RunsEgress, EgressReply, Scope.READ, "a page of a run's egress log, and the after-revoke check"),
    _verb(AgentsList, list[AgentInfo], Scope.READ, "the registered agents"),
    _verb(EventsSubscribe, EventInfo, Scope.READ, "a stream of events (all, or one session's)"),
    _verb(HealthCheck, Health, Scope.READ, "the supervisor's identity, layers and load"),
)}

_decoder = msgspec.json.Decoder(AnyRequest)


def decode_request(data: bytes, decoder: "msgspec.json.Decoder[Any] | None" = None,
                   verbs: Iterable[str] = VERBS) -> Any:
    """A request from JSON (of this table, or of `decoder`'s union, whose verbs are `verbs`);
    ControlFault(UNKNOWN_VERB or BAD_ARGUMENTS) when it is not one."""
    try:
        return (decoder or _decoder).decode(data)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if "`$.verb`" in text:
            raise ControlFault(Fault.UNKNOWN_VERB, f"unknown verb ({text}); verbs: {', '.join(verbs)}") from None
        raise ControlFault(Fault.BAD_ARGUMENTS, text) from None
    except msgspec.DecodeError as exc:
        raise ControlFault(Fault.BAD_ARGUMENTS, f"not a JSON request: {exc}") from None


def request_from(verb: str, args: dict[str, Any]) -> AnyRequest:
    """A request struct from a verb name and keyword arguments (the CLI's and console's way in)."""
    entry = VERBS.get(verb)
    if entry is None:
        raise ControlFault(Fault.UNKNOWN_VERB, f"unknown verb {verb!r}; verbs: {', '.join(VERBS)}")
    try:
        return msgspec.convert(args, entry.request)
    except msgspec.ValidationError as exc:
        raise ControlFault(Fault.BAD_ARGUMENTS, f"{verb}: {exc}") from None


def encode(value: Any) -> bytes:
    return msgspec.json.encode(value)
