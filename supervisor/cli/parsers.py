"""The command line's parsers for the verbs that talk to a daemon (cli/remote.py runs them).

Kept apart so that `deadstop --help` builds every parser without importing
pyzmq or msgspec.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable


def duration(text: str) -> float:
    """'90', '90s', '15m', '1h', '2d' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (90, 90s, 15m, 1h, 2d)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a duration must be >= 0, not {text}")
    return value


def add_parsers(sub: Any, common: argparse.ArgumentParser, non_negative: Callable[[str], float]) -> None:
    sessions = sub.add_parser("sessions", help="list, show, send to, stop, kill, pause, resume or clean up sessions "
                                               "of a running daemon")
    ssub = sessions.add_subparsers(dest="action", required=True)
    p = ssub.add_parser("list", parents=[common], help="sessions, as a table")
    p.add_argument("--active", action="store_true", help="only sessions with a run starting, running or paused")
    p.add_argument("--tokens", type=int, metavar="N", help="only sessions that used at least N tokens")
    p.add_argument("--age", type=duration, metavar="AGE", help="only sessions unchanged for at least AGE (1h, 15m)")
    p.add_argument("--agent", metavar="NAME", help="only sessions of this agent")
    p.set_defaults(remote='sessions_list')
    p = ssub.add_parser("show", parents=[common], help="one session")
    p.add_argument("key")
    p.set_defaults(remote='sessions_show')
    p = ssub.add_parser("send", parents=[common], help="send a message (starts a run; takes over an active one)")
    p.add_argument("key")
    p.add_argument("message", help="the message (JSON if it parses as JSON, else the text)")
    p.add_argument("--agent", metavar="NAME", help="the agent of a new session")
    p.add_argument("--idempotency-key", metavar="KEY", help="a retry with the same key is not sent twice")
    p.set_defaults(remote='sessions_send')
    p = ssub.add_parser("stop", parents=[common], help="revoke, SIGTERM, grace, SIGKILL, sweep the session's tree")
    p.add_argument("key")
    p.add_argument("--grace", type=non_negative, metavar="S", help="seconds between SIGTERM and SIGKILL")
    p.add_argument("--no-wait", action="store_true", help="return once the tree is revoked, before it is gone")
    p.set_defaults(remote='sessions_stop')
    p = ssub.add_parser("kill", parents=[common], help="revoke and SIGKILL the session's tree")
    p.add_argument("key")
    p.set_defaults(remote='sessions_kill')
    p = ssub.add_parser("stop-all", parents=[common], help="every session with something running or queued, "
                                                             "in one step: one revoke of every run, then their stops")
    p.add_argument("--grace", type=non_negative, metavar="S", help="seconds between SIGTERM and SIGKILL")
    p.add_argument("--kill", action="store_true", help="SIGKILL at once instead of SIGTERM and the grace")
    p.add_argument("--no-wait", action="store_true", help="return once every run is revoked, before they are gone")
    p.set_defaults(remote='sessions_stop_all')
    for action, what in (("pause", "hold egress and freeze"), ("resume", "thaw and release held requests of")):
        p = ssub.add_parser(action, parents=[common], help=f"{what} the session's tree")
        p.add_argument("key")
        p.set_defaults(remote='sessions_pause_resume')
    p = ssub.add_parser("cleanup", parents=[common], help="remove idle sessions unchanged for --age, with their records")
    p.add_argument("--age", type=duration, required=True, metavar="AGE")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.set_defaults(remote='sessions_cleanup')

    agents = sub.add_parser("agents", help="the daemon's agents")
    asub = agents.add_subparsers(dest="action", required=True)
    p = asub.add_parser("list", parents=[common])
    p.set_defaults(remote='agents_list')

    p = sub.add_parser("events", parents=[common], help="follow the daemon's event stream until Ctrl-C")
    p.add_argument("--session", metavar="KEY", help="only this session's events")
    p.set_defaults(remote='events')

    daemon = sub.add_parser("daemon", help="the running daemon: info, reload its configuration, stop it")
    dsub = daemon.add_subparsers(dest="action", required=True)
    for action, verb, what in (("info", "daemon.info", "where it listens, what it serves, its load"),
                               ("reload", "daemon.reload", "re-read agents and tools (live runs are not touched)"),
                               ("stop", "daemon.stop", "stop every run, then the daemon")):
        p = dsub.add_parser(action, parents=[common], help=what)
        p.set_defaults(remote='daemon_verb', verb_name=verb)


def add_console_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("console", parents=[common], help="print a one-time login link to the daemon's web console "
                                                         "(and open it when a browser is at hand)")
    p.add_argument("--read-only", action="store_true", help="a login that sees everything and changes nothing")
    p.add_argument("--no-browser", action="store_true", help="only print the link")
    p.set_defaults(remote="console")


def common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the daemon's reply as JSON")
    common.add_argument("--daemon", metavar="PATH-OR-ENDPOINT",
                        help="the daemon's connection file, runtime directory or control endpoint "
                             "(default: $DEADSTOP_DAEMON, then the well-known path)")
    common.add_argument("--daemons", metavar="A,B,...",
                        help="many daemons (one per node), each NAME=WHERE or WHERE, or k8s:NAMESPACE for the Lease "
                             "records there: session verbs go to the session's owner, lists are merged with a DAEMON "
                             "column; a daemon that does not answer is named on stderr and the others' answer stands "
                             "(exit 0 while one answers, 5 when none does) (default: $DEADSTOP_DAEMONS)")
    common.add_argument("--key", dest="key_file", metavar="PATH", help="a client secret certificate (deadstop keys generate): "
                                                      "reach the daemon over tcp:// with CURVE (default: $DEADSTOP_KEY)")
    common.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="give up after S seconds (exit 124); default: wait for the verb to finish")
    return common
