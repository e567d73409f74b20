"""RoutedClient: one client over many daemons (one per node), each session owned by the daemon that started it.

    with RoutedClient(["node-a=/run/deadstop/a", "node-b=tcp://10.0.0.7:7400"], key="router.key_secret") as c:
        c.send("chat-42", "draft the reply", agent="researcher")   # a new key: its rendezvous daemon
        c.stop("chat-42")                                          # straight to the owner
        c.sessions()                                               # every daemon's, merged
        c.unreachable                                              # {daemon: why} of that last merged verb
        for d in c.events(): print(d.daemon, d.event.kind)         # every daemon's events, as one stream

Who owns which session is an `Owners` backend's business (owners.py,
docs/scale-out.md): `StaticOwners`, a fixed list of daemons whose ownership
is learned by asking them and cached there, or `LeaseOwners` (leases.py),
one Kubernetes Lease per session shared by every router; merged_events.py
reads many daemons' event streams as one. Per-key verbs go to the owner only, and
a stop never waits on any daemon but the owner. Merged verbs (sessions,
runs, agents, health) answer with whatever daemons answered and name the
rest in `unreachable`, so one node down does not blind the operator to the
others.

Like Client it imports only the wire: the command line pays for no engine.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import zmq

from ...ipc import control as wire
from ...ipc import gateway
from ...ipc.control import ControlFault, Fault
from .client import Client, EventStream
from .locate import locate
from .merged_events import DaemonEvent, RoutedEvents
from .owners import ENV_DAEMONS, DaemonAddress, Owners, StaticOwners, owners_from, rendezvous

#: A daemon's answer that says it is not there to answer (as opposed to an answer that refuses).
TRANSPORT_FAULTS = frozenset({Fault.UNREACHABLE, Fault.TIMED_OUT, Fault.SHUTTING_DOWN})

_KEY_VERBS = {"sessions.show", "sessions.send", "sessions.stop", "sessions.kill", "sessions.pause", "sessions.resume"}
#: Per-key verbs that may go to an owner the backend kept from an earlier read (LeaseOwners' owners_ttl): the
#: stops, whose latency matters. Their answer tells whether the owner had the session running; one that says
#: nothing was there makes the router read the record again (a daemon back from a restart holds an idle copy
#: of a session that moved away meanwhile, and must not be the one to say "nothing to stop"). Every other
#: per-key verb reads the record afresh: a send to a stale owner would start a second copy of the session.
_KEPT_OWNER_VERBS = {"sessions.stop", "sessions.kill"}
_RUN_VERBS = {"runs.show", "runs.stop", "runs.kill", "runs.egress"}


@dataclass
class Gathered:
    """One verb's replies from every daemon that answered, in the daemons' order, and why the others did not."""

    replies: dict[str, Any] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)

    def rows(self) -> list[tuple[str, Any]]:
        """(daemon, item) of list replies: which daemon each row came from (the wire's structs carry no origin)."""
        return [(name, item) for name, reply in self.replies.items() for item in reply]

    def merged(self) -> list[Any]:
        return [item for _name, item in self.rows()]


class _Conn:
    """One daemon's Client, re-made when its connection file names another process (the daemon restarted)."""

    def __init__(self, address: DaemonAddress, kind: str, name: str | None, key: str | None):
        self.address, self._kind, self._name, self._key = address, kind, name, key
        self._client: Client | None = None
        self._lock = threading.Lock()
        self._bare = address.where.startswith(("ipc://", "tcp://"))

    def call(self, request: wire.Request | str, timeout: float | None, args: dict[str, Any]) -> Any:
        with self._lock:
            client = self._current()
            client.timeout = timeout
            return client.call(request, **args)

    def _current(self) -> Client:
        if self._client is not None and not self._bare:
            where = locate(self.address.where)  # NoDaemon (UNREACHABLE) once it is gone: no wait for a timeout
            if (where.pid, where.started) != (self._client.where.pid, self._client.where.started):
                self._drop()
        if self._client is None:
            try:
                self._client = Client(self.address.where, kind=self._kind, name=self._name, key=self._key,
                                      server_key=self.address.server_key)
            except zmq.ZMQError as exc:
                raise ControlFault(Fault.UNREACHABLE, f"cannot connect to {self.address.where}: {exc}") from None
        return self._client

    def events(self, session: str | None, timeout: float | None) -> EventStream:
        """A subscription to this daemon's events (its own SUB socket: usable from any one thread)."""
        with self._lock:
            client = self._current()
            client.timeout = timeout
            return client.events(session)

    def _drop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def close(self) -> None:
        with self._lock:
            self._drop()


class RoutedClient:
    """A blocking client of many daemons: per-key verbs to the session's owner, merged verbs to all.

    `owners`: an Owners backend, or daemons for a StaticOwners (`NAME=WHERE` or WHERE, each; or one string of
    them, comma-separated). `timeout` bounds a verb sent to an owner; `probe_timeout` each daemon's answer when
    looking for an owner or merging (a daemon slower than that is named unreachable). `key`: a client secret
    certificate for tcp:// daemons.
    """

    def __init__(self, owners: "Owners | str | Iterable[str | DaemonAddress]", *, kind: str = "gateway", name: str | None = None,
                 timeout: float | None = 60.0, probe_timeout: float | None = 10.0, key: str | None = None):
        if isinstance(owners, str):
            owners = StaticOwners.parse(owners)  # "a=...,b=...", as --daemons takes it
        self.owners: Owners = owners if isinstance(owners, Owners) else StaticOwners(owners)
        self.timeout, self.probe_timeout = timeout, probe_timeout
        self._kind, self._name, self._key = kind, name, key
        #: daemon -> why it did not answer the last merged verb (empty: every one did)
        self.unreachable: dict[str, str] = {}
        self._conns: dict[str, _Conn] = {}
        self._runs: dict[str, str] = {}  # run id -> daemon, learned from replies
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    # -- plumbing -----------------------------------------------------------------------------------------
    def _daemons(self) -> dict[str, DaemonAddress]:
        found = {d.name: d for d in self.owners.daemons()}
        if not found:
            raise ControlFault(Fault.UNREACHABLE, "no daemons are listed to route to")
        return found

    def _conn(self, address: DaemonAddress) -> _Conn:
        with self._lock:
            conn = self._conns.get(address.name)
            if conn is None or conn.address != address:
                if conn is not None:
                    conn.close()
                conn = self._conns[address.name] = _Conn(address, self._kind, self._name, self._key)
            return conn

    def _threads(self) -> ThreadPoolExecutor:
        """Threads to ask every daemon at once: a slow or silent one then costs its own wait, not the sum."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="deadstop-router")
            return self._pool

    def _send(self, address: DaemonAddress, request: wire.Request | str, timeout: float | None,
              args: dict[str, Any] | None = None) -> Any:
        return self._conn(address).call(request, timeout, args or {})

    def daemon(self, name: str) -> Client:
        """A plain Client of one daemon (for its own verbs: daemon.reload, daemon.stop, events, console)."""
        address = self._daemons().get(name)
        if address is None:
            raise ControlFault(Fault.BAD_ARGUMENTS, f"no daemon named {name!r} (daemons: {', '.join(self._daemons())})")
        return Client(address.where, kind=self._kind, name=self._name, timeout=self.timeout, key=self._key,
                      server_key=address.server_key)

    def gather(self, request: wire.Request | str, *, long: bool = False, **args: Any) -> Gathered:
        """Send one verb to every daemon at once; their replies, and the ones that did not answer. A daemon's
        refusal (BAD_ARGUMENTS, FORBIDDEN, ...) is raised: it would be the same everywhere. `long`: a verb
        that takes its time (a stop), bounded by `timeout`, not `probe_timeout`."""
        daemons = list(self._daemons().values())
        timeout = self.timeout if long else self.probe_timeout

        def one(address: DaemonAddress) -> tuple[bool, Any]:
            try:
                return True, self._send(address, request, timeout, args)
            except ControlFault as exc:
                if exc.fault in TRANSPORT_FAULTS:
                    return False, str(exc)
                raise

        results = [one(daemons[0])] if len(daemons) == 1 else list(self._threads().map(one, daemons))
        out = Gathered()
        for address, (ok, value) in zip(daemons, results):
            (out.replies if ok else out.unreachable)[address.name] = value
        self.unreachable = dict(out.unreachable)
        if not out.replies:
            raise ControlFault(Fault.UNREACHABLE, "no daemon answered: " +
                               "; ".join(f"{name}: {why}" for name, why in out.unreachable.items()))
        return out

    def _find(self, key: str, daemons: dict[str, DaemonAddress]) -> tuple[str | None, dict[str, str]]:
        """Ask every daemon for the session: (the one that has it, or None; the ones that did not answer)."""
        hits: dict[str, Any] = {}
        down: dict[str, str] = {}

        def one(address: DaemonAddress) -> None:
            try:
                hits[address.name] = self._send(address, wire.SessionsShow(key=key), self.probe_timeout)
            except ControlFault as exc:
                if exc.fault in TRANSPORT_FAULTS:
                    down[address.name] = str(exc)
                elif exc.fault not in (Fault.NO_SUCH_SESSION, Fault.POLICY_DENIED):
                    raise

        list(self._threads().map(one, daemons.values()))
        found = next((name for name in daemons if name in hits), None)  # the daemons' order decides a duplicate
        return found, down

    def _owner(self, key: str, *, creating: bool = False, kept: bool = False) -> tuple[DaemonAddress, bool]:
        """The daemon that owns `key`; for a send of a key nobody owns, the one that owns it from now on (and True:
        this call made the record). `kept`: an owner the backend kept from an earlier read will do."""
        daemons = self._daemons()
        recorded = self.owners.owner(key) if kept else self.owners.refresh(key)
        if recorded is not None:
            if recorded in daemons:
                return daemons[recorded], False
            if not creating:
                raise ControlFault(Fault.UNREACHABLE, f"session {key!r} is owned by daemon {recorded!r}, which is not "
                                                      f"among the daemons now ({', '.join(daemons)})")
            # Its node is gone, and the session with it: the new message starts it afresh elsewhere.
            return daemons[self._claim(key, rendezvous(key, daemons), daemons, replacing=recorded)], True
        if not (creating and self.owners.authoritative):
            found, down = self._find(key, daemons)
            if found is not None:
                return daemons[self._claim(key, found, daemons)], False
            if not creating:
                if down:
                    raise ControlFault(Fault.UNREACHABLE, f"session {key!r} is on none of the daemons that answered; "
                                       + "; ".join(f"daemon {name!r} did not answer ({why})" for name, why in down.items()))
                raise ControlFault(Fault.NO_SUCH_SESSION, f"no session {key!r} on any daemon ({', '.join(daemons)})")
        return daemons[self._claim(key, rendezvous(key, daemons), daemons)], True

    def _claim(self, key: str, daemon: str, daemons: dict[str, DaemonAddress], *, replacing: str | None = None) -> str:
        owner = self.owners.record(key, daemon, replacing=replacing)
        if owner not in daemons:
            raise ControlFault(Fault.UNREACHABLE, f"session {key!r} is owned by daemon {owner!r}, which is not among "
                                                  f"the daemons now ({', '.join(daemons)})")
        return owner

    def _to_owner(self, key: str, request: wire.Request, *, creating: bool = False) -> Any:
        kept = str(type(request).__struct_config__.tag) in _KEPT_OWNER_VERBS and self.owners.authoritative
        address, fresh = self._owner(key, creating=creating, kept=kept)
        try:
            reply = self._send(address, request, self.timeout)
        except ControlFault as exc:
            if exc.fault == Fault.NO_SUCH_SESSION and not creating and not self.owners.authoritative:
                # A cached owner that no longer has it (cleaned up there): look again, once.
                self.owners.forget(key, holder=address.name)
                retry, _ = self._owner(key)
                if retry != address:
                    return self._send(retry, request, self.timeout)
            if not fresh and (exc.fault in TRANSPORT_FAULTS or exc.fault == Fault.NO_SUCH_SESSION):
                # The record this router read may be out of date (another router moved the session off a node
                # that went down): read it again, once, and follow it if it names another daemon.
                now = self.owners.refresh(key)
                daemons = self._daemons()
                if now is not None and now != address.name and now in daemons:
                    return self._send(daemons[now], request, self.timeout)
            if exc.fault in TRANSPORT_FAULTS:
                if fresh and exc.fault == Fault.UNREACHABLE:
                    self.owners.forget(key, holder=address.name)  # nothing was started there: no owner yet
                raise ControlFault(exc.fault, f"session {key!r} is owned by daemon {address.name!r}: {exc}",
                                   detail={"daemon": address.name}) from None
            raise
        if kept and isinstance(reply, wire.StopReply) and reply.already_ended:
            # "Nothing was running" from a kept owner: make sure it is still the owner on record.
            now = self.owners.refresh(key)
            daemons = self._daemons()
            if now is not None and now != address.name and now in daemons:
                return self._send(daemons[now], request, self.timeout)
        return reply

    def _run_owner(self, run_id: str) -> DaemonAddress:
        daemons = self._daemons()
        known = self._runs.get(run_id)
        if known in daemons:
            return daemons[known]
        hits: dict[str, Any] = {}
        down: dict[str, str] = {}
        for address in daemons.values():
            try:
                hits[address.name] = self._send(address, wire.RunsShow(run_id=run_id), self.probe_timeout)
                break
            except ControlFault as exc:
                if exc.fault in TRANSPORT_FAULTS:
                    down[address.name] = str(exc)
                elif exc.fault != Fault.NO_SUCH_RUN:
                    raise
        if not hits:
            if down:
                raise ControlFault(Fault.UNREACHABLE, f"run {run_id!r} is on none of the daemons that answered; "
                                   + "; ".join(f"daemon {name!r} did not answer ({why})" for name, why in down.items()))
            raise ControlFault(Fault.NO_SUCH_RUN, f"no run {run_id!r} on any daemon ({', '.join(daemons)})")
        (name,) = hits
        self._runs[run_id] = name
        return daemons[name]

    def _to_run_owner(self, run_id: str, request: wire.Request) -> Any:
        address = self._run_owner(run_id)
        try:
            return self._send(address, request, self.timeout)
        except ControlFault as exc:
            if exc.fault in TRANSPORT_FAULTS:
                raise ControlFault(exc.fault, f"run {run_id!r} is on daemon {address.name!r}: {exc}",
                                   detail={"daemon": address.name}) from None
            raise

    def _learn(self, gathered: Gathered) -> None:
        """What a merged list taught about owners (a cache only: a shared record is written at send)."""
        for name, item in gathered.rows():
            if isinstance(item, wire.SessionInfo):
                if not self.owners.authoritative:
                    self.owners.record(item.key, name)
                for run_id in item.runs:
                    self._runs[run_id] = name
            elif isinstance(item, wire.RunInfo):
                self._runs[item.id] = name

    # -- the verbs ----------------------------------------------------------------------------------------
    def call(self, verb: str | wire.Request, **args: Any) -> Any:
        """Any control verb, routed: by its session key, by its run id, or merged over every daemon."""
        name = str(type(verb).__struct_config__.tag) if isinstance(verb, wire.Request) else verb
        if name == "daemon.info":
            return self.info()
        if name in gateway.DAEMON_VERBS or name in ("sessions.spawn", "events.subscribe"):
            raise ControlFault(Fault.BAD_ARGUMENTS, f"{name} cannot be routed: it is one daemon's verb "
                                                    f"(use RoutedClient.daemon(NAME))")
        request = verb if isinstance(verb, wire.Request) else wire.request_from(verb, {k: v for k, v in args.items()
                                                                                        if v is not None})
        handler: Callable[[Any], Any] | None = {
            "sessions.list": lambda r: self._merged_sessions(r),
            "runs.list": lambda r: self._merged_runs(r),
            "agents.list": lambda r: self._merged_agents(r),
            "sessions.cleanup": lambda r: self._cleanup(r),
            "health": lambda r: self.gather(r).replies,
            "sessions.stop_all": lambda r: self.gather(r, long=True).replies,
        }.get(name)
        if handler is not None:
            return handler(request)
        if name in _KEY_VERBS:
            return self._to_owner(request.key, request, creating=name == "sessions.send")  # type: ignore[attr-defined]
        if name in _RUN_VERBS:
            return self._to_run_owner(request.run_id, request)  # type: ignore[attr-defined]
        raise ControlFault(Fault.UNKNOWN_VERB, f"{name}: not a verb this client routes")

    def _merged_sessions(self, request: wire.SessionsList) -> list[Any]:
        gathered = self.gather(request)
        self._learn(gathered)
        return gathered.merged()

    def _merged_runs(self, request: wire.RunsList) -> list[Any]:
        if request.session is not None:  # one session's runs live with its owner
            return self._to_owner(request.session, request)
        gathered = self.gather(request)
        self._learn(gathered)
        return gathered.merged()

    def _merged_agents(self, request: wire.AgentsList) -> list[Any]:
        """Every daemon's agents, one per name: where two daemons name the same agent, the first daemon's."""
        seen: dict[str, Any] = {}
        for agent in self.gather(request).merged():
            seen.setdefault(agent.name, agent)
        return list(seen.values())

    def _cleanup(self, request: wire.SessionsCleanup) -> list[str]:
        gathered = self.gather(request)
        removed: list[str] = []
        for name, key in gathered.rows():
            if not request.dry_run:
                self.owners.forget(key, holder=name)
            removed.append(key)
        return removed

    def sessions(self, *, active: bool | None = None, min_tokens: int | None = None, agent: str | None = None,
                 older_than: float | None = None) -> list[wire.SessionInfo]:
        """Every daemon's sessions, merged (origin: `sessions_by_daemon`; the silent ones: `unreachable`)."""
        return self._merged_sessions(wire.SessionsList(active=active, min_tokens=min_tokens, agent=agent,
                                                       older_than=older_than))

    def sessions_by_daemon(self, *, active: bool | None = None, min_tokens: int | None = None, agent: str | None = None,
                           older_than: float | None = None) -> Gathered:
        """The same, per daemon: `rows()` gives (daemon, SessionInfo)."""
        gathered = self.gather(wire.SessionsList(active=active, min_tokens=min_tokens, agent=agent, older_than=older_than))
        self._learn(gathered)
        return gathered

    def session(self, key: str) -> wire.SessionInfo:
        return self._to_owner(key, wire.SessionsShow(key=key))

    def send(self, key: str, message: Any, *, agent: str | None = None, idempotency_key: str | None = None) -> wire.SendReply:
        """To the key's owner; a key nobody owns goes to its rendezvous daemon, which owns it from then on."""
        reply = self._to_owner(key, wire.SessionsSend(key=key, message=message, agent=agent,
                                                      idempotency_key=idempotency_key), creating=True)
        return reply

    def stop(self, key: str, grace: float | None = None, *, wait: bool = True) -> wire.StopReply:
        return self._to_owner(key, wire.SessionsStop(key=key, grace=grace, wait=wait))

    def kill(self, key: str) -> wire.StopReply:
        return self._to_owner(key, wire.SessionsKill(key=key))

    def pause(self, key: str) -> bool:
        return bool(self._to_owner(key, wire.SessionsPause(key=key)))

    def resume(self, key: str) -> bool:
        return bool(self._to_owner(key, wire.SessionsResume(key=key)))

    def cleanup(self, older_than: float = 3600, *, dry_run: bool = False) -> list[str]:
        return self._cleanup(wire.SessionsCleanup(older_than=older_than, dry_run=dry_run))

    def runs(self, session: str | None = None, *, active: bool | None = None, limit: int = 1000) -> list[wire.RunInfo]:
        """One session's runs (from its owner), or every daemon's (up to `limit` from each)."""
        return self._merged_runs(wire.RunsList(session=session, active=active, limit=limit))

    def run(self, run_id: str) -> wire.RunInfo:
        return self._to_run_owner(run_id, wire.RunsShow(run_id=run_id))

    def stop_run(self, run_id: str, grace: float | None = None) -> wire.RunInfo:
        return self._to_run_owner(run_id, wire.RunsStop(run_id=run_id, grace=grace))

    def kill_run(self, run_id: str) -> wire.RunInfo:
        return self._to_run_owner(run_id, wire.RunsKill(run_id=run_id))

    def agents(self) -> list[wire.AgentInfo]:
        return self._merged_agents(wire.AgentsList())

    def stop_all(self, grace: float | None = None, *, wait: bool = True,
                 kill: bool = False) -> dict[str, wire.StopAllReply]:
        """sessions.stop_all on every daemon at once: daemon -> its reply, of those that answered (the rest
        are in `unreachable`: their sessions are not stopped, and the caller must know)."""
        return self.call(wire.SessionsStopAll(grace=grace, wait=wait, kill=kill))

    def health(self) -> dict[str, wire.Health]:
        """daemon -> its Health, of those that answered."""
        return self.gather(wire.HealthCheck()).replies

    def info(self) -> dict[str, Any]:
        """daemon -> its daemon.info, of those that answered."""
        return self.gather(gateway.DaemonInfo()).replies

    def owner_of(self, key: str) -> str | None:
        """The daemon on record for `key` (no daemon is asked)."""
        return self.owners.owner(key)

    def events(self, session: str | None = None, *, idle_timeout: float | None = None) -> "RoutedEvents":
        """Follow every daemon's event stream as one (or, for `session`, its owner's): DaemonEvent(daemon, event).

        Subscribed on every daemon that answered when this returns; those that did not are in the stream's
        `unreachable` (and this client's), and their events are missing from it. A session's events all come
        from its owner, so each session's `seq` order is kept. For one session whose owner is down:
        UNREACHABLE. `idle_timeout`: TIMED_OUT when no event comes from any daemon for that long.
        """
        if session is not None:
            address, _ = self._owner(session)
            targets = {address.name: address}
        else:
            targets = self._daemons()

        def subscribe(address: DaemonAddress) -> tuple[bool, Any]:
            try:
                return True, self._conn(address).events(session, self.probe_timeout)
            except ControlFault as exc:
                if exc.fault not in TRANSPORT_FAULTS:
                    raise
                return False, str(exc)

        outcomes = dict(zip(targets, self._threads().map(subscribe, targets.values())))
        streams = {name: got for name, (ok, got) in outcomes.items() if ok}
        unreachable = {name: got for name, (ok, got) in outcomes.items() if not ok}
        self.unreachable = dict(unreachable)
        if session is not None and not streams:
            raise ControlFault(Fault.UNREACHABLE, f"session {session!r} is owned by daemon {next(iter(targets))!r}: "
                                                  f"{next(iter(unreachable.values()))}")
        if not streams:
            raise ControlFault(Fault.UNREACHABLE, "no daemon answered: " + "; ".join(
                f"daemon {name!r}: {why}" for name, why in unreachable.items()))
        return RoutedEvents(streams, unreachable, idle_timeout)

    def close(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        for conn in conns:
            conn.close()

    def __enter__(self) -> "RoutedClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()




__all__: Sequence[str] = ["DaemonAddress", "DaemonEvent", "Gathered", "Owners", "RoutedClient", "RoutedEvents",
                          "StaticOwners", "owners_from", "rendezvous", "ENV_DAEMONS", "TRANSPORT_FAULTS"]
