"""The command line's verbs that talk to a daemon: sessions, agents, events, daemon, console.

Each is one control verb through the blocking Client (which imports no
engine); `--json` prints the daemon's reply exactly as it came. Faults map
to the exit-code table in cli/__init__.py.

With --daemons (or $DEADSTOP_DAEMONS) the same verbs go through a
RoutedClient: a session's verbs to the daemon that owns it, lists merged
from every daemon with the one each row came from (a DAEMON column; in
--json, a `daemon` field per row, and the silent daemons under
`unreachable`). A daemon that does not answer is named on stderr and the
others' answer stands: exit 0 while at least one daemon answered, 5 (no
daemon reachable) when none did.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, TextIO, Union

import msgspec

from ...ipc import gateway
from ...ipc.control import ControlFault, Fault
from ..client.client import Client

if TYPE_CHECKING:
    from ..client.routed import RoutedClient

AnyClient = Union[Client, "RoutedClient"]
#: With --daemons and no --timeout: how long each daemon has to answer a merged verb or the search for an owner.
PROBE_TIMEOUT = 10.0
#: Verbs that follow or change one daemon itself: they take --daemon, not --daemons.
_ONE_DAEMON = {"console"}
_ONE_DAEMON_VERBS = {"daemon.reload", "daemon.stop"}

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_FORBIDDEN, EXIT_NO_DAEMON, EXIT_TIMEOUT = 0, 1, 2, 3, 4, 5, 124

_EXIT_OF_FAULT = {
    Fault.UNKNOWN_VERB: EXIT_USAGE, Fault.BAD_ARGUMENTS: EXIT_USAGE, Fault.UNSUPPORTED_VERSION: EXIT_USAGE,
    Fault.NO_SUCH_SESSION: EXIT_NOT_FOUND, Fault.NO_SUCH_RUN: EXIT_NOT_FOUND, Fault.NO_SUCH_AGENT: EXIT_NOT_FOUND,
    Fault.FORBIDDEN: EXIT_FORBIDDEN, Fault.POLICY_DENIED: EXIT_FORBIDDEN,
    Fault.UNREACHABLE: EXIT_NO_DAEMON, Fault.SHUTTING_DOWN: EXIT_NO_DAEMON, Fault.TIMED_OUT: EXIT_TIMEOUT,
}


def exit_of(fault: Fault) -> int:
    return _EXIT_OF_FAULT.get(fault, EXIT_FAILED)


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run one remote verb; its exit status."""
    verb: Callable[[Any, argparse.Namespace, TextIO], int] = globals()[f"_{args.remote}"]
    try:
        spec = _daemons(args)
        if spec is None:
            with Client(args.daemon, kind="cli", name="deadstop", timeout=args.timeout, key=args.key_file) as client:
                return int(verb(client, args, out))
        from ..client.owners import owners_from
        from ..client.routed import RoutedClient

        with RoutedClient(owners_from(spec), kind="cli", name="deadstop", timeout=args.timeout,
                          probe_timeout=args.timeout or PROBE_TIMEOUT, key=args.key_file) as routed:
            code = int(verb(routed, args, out))
            for name, why in routed.unreachable.items():
                print(f"deadstop {args.verb} {getattr(args, 'action', '')}: daemon {name!r} did not answer ({why}); "
                      "this is the other daemons' answer".replace("  ", " "), file=err)
            return code
    except ControlFault as exc:
        if args.json:
            print(json.dumps({"ok": False, "fault": int(exc.fault), "name": exc.fault.name,
                              "message": exc.args[0], "detail": exc.detail}), file=out)
        print(f"deadstop {args.verb} {getattr(args, 'action', '')}: {exc}".replace("  ", " "), file=err)
        return exit_of(exc.fault)


def _daemons(args: argparse.Namespace) -> str | None:
    """The --daemons list in force (--daemons, else $DEADSTOP_DAEMONS unless --daemon names one), or None."""
    spec = getattr(args, "daemons", None)
    if spec and args.daemon:
        raise ControlFault(Fault.BAD_ARGUMENTS, "--daemon and --daemons: name one daemon or many, not both")
    if not spec and not args.daemon:
        spec = os.environ.get("DEADSTOP_DAEMONS") or None
    if spec and (args.remote in _ONE_DAEMON or getattr(args, "verb_name", None) in _ONE_DAEMON_VERBS):
        raise ControlFault(Fault.BAD_ARGUMENTS, f"`deadstop {args.verb} {getattr(args, 'action', '')}` is one daemon's: "
                                                "name it with --daemon".replace("  ", " "))
    return spec


def _routed(client: AnyClient) -> bool:
    return not isinstance(client, Client)


def _print_merged(out: TextIO, rows: list[tuple[str, Any]], unreachable: dict[str, str]) -> None:
    """A merged list as JSON: each row with the daemon it came from, and the daemons that did not answer."""
    result = [{**msgspec.to_builtins(item), "daemon": name} for name, item in rows]
    print(json.dumps({"result": result, "unreachable": unreachable}, indent=2, sort_keys=True), file=out)


def _print(out: TextIO, value: Any) -> None:
    print(json.dumps(msgspec.to_builtins(value), indent=2, sort_keys=True), file=out)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _bytes(n: float) -> str:
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def _sessions_list(client: AnyClient, args: argparse.Namespace, out: TextIO) -> int:
    filters = dict(active=True if args.active else None, min_tokens=args.tokens, agent=args.agent, older_than=args.age)
    if _routed(client):
        gathered = client.sessions_by_daemon(**filters)  # type: ignore[union-attr]
        found: list[tuple[str | None, Any]] = list(gathered.rows())
        if args.json:
            _print_merged(out, gathered.rows(), gathered.unreachable)
            return EXIT_OK
    else:
        listed = client.sessions(**filters)
        if args.json:
            _print(out, listed)
            return EXIT_OK
        found = [(None, s) for s in listed]
    head = ("KEY", "STATE", "AGENT", "GEN", "TOKENS", "TOOLS", "CPU", "MEM", "PROCS", "AGE", "PARENT")
    rows = [(head[0], "DAEMON", *head[1:]) if _routed(client) else head]
    now = time.time()
    for daemon, s in found:
        u = s.usage
        cells = (s.key, s.state, s.agent, str(s.generation), f"{u.get('tokens', 0):.0f}",
                 f"{u.get('tool_calls', 0):.0f}", f"{u.get('cpu_seconds', 0):.1f}s",
                 _bytes(u.get("peak_memory_bytes", 0)), f"{u.get('peak_processes', 0):.0f}",
                 _age(max(0.0, now - s.created_wall)), s.parent or "-")
        rows.append((cells[0], str(daemon), *cells[1:]) if daemon is not None else cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)
    if len(rows) == 1:
        print("(no sessions)", file=out)
    return EXIT_OK


def _sessions_show(client: AnyClient, args: argparse.Namespace, out: TextIO) -> int:
    info = client.session(args.key)
    if args.json:
        _print(out, info)
        return EXIT_OK
    for field, value in msgspec.structs.asdict(info).items():
        print(f"{field:<18} {value}", file=out)
    return EXIT_OK


def _message(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _sessions_send(client: AnyClient, args: argparse.Namespace, out: TextIO) -> int:
    reply = client.send(args.key, _message(args.message), agent=args.agent, idempotency_key=args.idempotency_key)
    if args.json:
        _print(out, reply)
    else:
        print(f"{reply.key}: run {reply.run_id} started (generation {reply.generation})", file=out)
    return EXIT_OK


def _report_lines(reply: Any, out: TextIO) -> int:
    if reply.already_ended:
        print(f"{reply.key}: nothing was running (already ended)", file=out)
        return EXIT_OK
    if not reply.waited:
        print(f"{reply.key}: revoked {', '.join(reply.revoked)}; their stop goes on "
              f"(deadstop sessions show {reply.key})", file=out)
        return EXIT_OK
    failed = False
    for r in reply.reports:
        survivors = r.get("survivors", 0)
        failed = failed or bool(survivors)
        ms = (r["reaped_at"] - r["requested_at"]) / 1e6 if r.get("reaped_at") else float("nan")
        print(f"{reply.key}: run {r['run_id']} {r['outcome']} ({r['ended_by']}) in {ms:.1f} ms, "
              f"{survivors} survivor(s){' ' + str(r.get('survivor_pids')) if survivors else ''}", file=out)
    return EXIT_FAILED if failed else EXIT_OK


def _stop_exit(reply: Any) -> int:
    return EXIT_FAILED if any(r.get("survivors") for r in reply.reports) else EXIT_OK


def _sessions_stop(client: AnyClient, args: argparse.Namespace, out: TextIO) -> int:
    reply = client.stop(args.key, args.grace, wait=not args.no_wait)
    if args.json:
        _print(out, reply)
        return _stop_exit(reply)
    return _report_lines(reply, out)


def _sessions_kill(client: AnyClient, args: argparse.Namespace, out: TextIO) -> int:
    reply = client.kill(args.key)
    if args.json:
        _print(out, reply)
        return _stop_exit(reply)
    return _report_lines(reply, out)


def _sessions_stop_all(client: AnyClient, args: argparse.Namespace, out: TextIO) -> int:
    """sessions.stop_all; through --daemons, on every daemon at once (one that did not answer is a failure:
    its sessions were not stopped)."""
    got = client.stop_all(args.grace, wait=not args.no_wait, kill=args.kill)
    replies: dict[str, Any] = got if isinstance(got, dict) else {"": got}
    missed = bool(getattr(client, "unreachable", None))
    survivors = sum(r.get("survivors", 0) for reply in replies.values() for r in reply.reports)
    code = EXIT_FAILED if survivors or missed else EXIT_OK
    if args.json:
        _print(out, {"result": replies, "unreachable": getattr(client, "unreachable", {})} if isinstance(got, dict) else got)
        return code
    for daemon, reply in replies.items():
        where = f"{daemon}: " if daemon else ""
        if not reply.sessions:
            print(f"{where}nothing was running", file=out)
        elif not reply.waited:
            print(f"{where}revoked {len(reply.revoked)} run(s) of {len(reply.sessions)} session(s) in one step; "
                  "their stops go on", file=out)
        else:
            left = [r for r in reply.reports if r.get("survivors")]
            print(f"{where}{len(reply.sessions)} session(s), {len(reply.reports)} run(s) "
                  f"{'killed' if args.kill else 'stopped'}, {sum(r['survivors'] for r in left)} survivor(s)", file=out)
            for r in left:
                print(f"{where}run {r['run_id']}: survivors {r.get('survivor_pids')}", file=out)
    return code


def _sessions_pause_resume(client: AnyClient, args: argparse.Namespace, out: TextIO) -> int:
    done = client.pause(args.key) if args.action == "pause" else client.resume(args.key)
    if args.json:
        _print(out, done)
    elif args.action == "pause":
        print(f"{args.key}: {'paused' if done else 'nothing was running: nothing paused'}", file=out)
    else:
        print(f"{args.key}: {'resumed' if done else 'not everything could be thawed in time'}", file=out)
    return EXIT_OK if done or args.action == "pause" else EXIT_FAILED


def _sessions_cleanup(client: AnyClient, args: argparse.Namespace, out: TextIO) -> int:
    keys = client.cleanup(args.age, dry_run=args.dry_run)
    if args.json:
        _print(out, keys)
    else:
        verb = "would remove" if args.dry_run else "removed"
        print(f"{verb} {len(keys)} session(s){': ' + ', '.join(keys) if keys else ''}", file=out)
    return EXIT_OK


def _agents_list(client: AnyClient, args: argparse.Namespace, out: TextIO) -> int:
    if _routed(client):
        gathered = client.gather("agents.list")  # type: ignore[union-attr]
        if args.json:
            _print_merged(out, gathered.rows(), gathered.unreachable)
            return EXIT_OK
        named: dict[str, Any] = {}
        for agent in gathered.merged():
            named.setdefault(agent.name, agent)  # the same agent on every daemon: once, as the first one has it
        agents = list(named.values())
    else:
        agents = client.agents()
        if args.json:
            _print(out, agents)
            return EXIT_OK
    for a in agents:
        limits = ", ".join(f"{k}={v}" for k, v in a.limits.items()) or "-"
        print(f"{a.name:<20} {a.kind:<7} tools: {', '.join(a.tools) or '-'}; limits: {limits}", file=out)
    if not agents:
        print("(no agents)", file=out)
    return EXIT_OK


def _events(client: AnyClient, args: argparse.Namespace, out: TextIO) -> int:
    """Follow one daemon's events; through --daemons every daemon's as one stream, each line naming its daemon."""
    try:
        with client.events(args.session) as stream:
            missing: dict[str, str] = getattr(stream, "unreachable", {})
            for name, why in missing.items():  # the others are followed; say which are not, up front
                print(f"deadstop events: daemon {name!r} is not followed ({why})", file=sys.stderr, flush=True)
            getattr(client, "unreachable", {}).clear()  # said here, at once: not again when the stream ends
            for item in stream:
                daemon, event = (item.daemon, item.event) if isinstance(item, tuple) else ("", item)
                if args.json:
                    row = msgspec.to_builtins(event)
                    print(json.dumps({**row, "daemon": daemon} if daemon else row), file=out, flush=True)
                else:
                    print(f"{daemon + ' ' if daemon else ''}{event.session or '-'} #{event.seq} {event.kind} "
                          f"run {event.run_id or '-'}: {json.dumps(event.data)[:200]}", file=out, flush=True)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _daemon_verb(client: AnyClient, args: argparse.Namespace, out: TextIO) -> int:
    reply = client.call(args.verb_name)  # routed: daemon.info only, {daemon: its info}
    if args.json or args.verb_name != "daemon.stop":
        _print(out, reply)
    else:
        print("the daemon is stopping every run, then itself", file=out)
    return EXIT_OK


def _console(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """A one-time login link to the daemon's web console; opened in a browser when a person is at a terminal."""
    link = client.call(gateway.ConsoleLogin(scope="read" if args.read_only else "write"))
    if args.json:
        _print(out, link)
        return EXIT_OK
    print(link.login, file=out, flush=True)
    if not args.no_browser and out.isatty():
        import webbrowser

        try:
            webbrowser.get()
        except webbrowser.Error:
            return EXIT_OK  # no browser here: the link above is for one elsewhere
        webbrowser.open(link.login)
    return EXIT_OK
