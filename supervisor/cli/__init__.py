"""The `deadstop` command line.

Its verbs that talk to a daemon (sessions, agents, events, daemon) are the
control verbs, through the blocking client: nothing of the engine is
imported for them, nor for --help.
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_FORBIDDEN, EXIT_NO_DAEMON, EXIT_TIMEOUT = 0, 1, 2, 3, 4, 5, 124
EXIT_CODES = """exit codes (every verb):
  0    success (a stop of a session with nothing running included)
  1    the verb ran and found a failure (a run survived its stop, a layer is missing under
       doctor --strict, the daemon or the supervisor could not start)
  2    usage: a bad argument, an unknown verb, a malformed request
  3    no such session, run or agent
  4    not permitted (the caller's scope or the session policy)
  5    no daemon reachable (the message says where it looked)
  124  --timeout expired (the verb may still have run)"""
REMOTE_VERBS = ("sessions", "agents", "events", "daemon", "console")


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..facades.demo import run_demo

    return run_demo(sys.stdout, containment=args.containment, grace=args.grace)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from ..facades.doctor import run_doctor

    return run_doctor(sys.stdout, as_json=args.json, strict=args.strict)


def _cmd_bench(args: argparse.Namespace) -> int:
    """The bench parses its own arguments (args.rest): `--argv CMD ...` hands it a command line of the user's."""
    from ..bench.command import main as bench

    return bench(args.rest)


def _cmd_serve(args: argparse.Namespace) -> int:
    from ..client.locate import default_runtime_dir, default_state_dir
    from ..daemon import config
    from ..daemon.server import serve

    if args.check:
        cfg = config.load(args.config)
        print(f"{args.config or '(no file)'}: ok: {len(cfg.agents)} agent(s) "
              f"({', '.join(a.name for a in cfg.agents) or '-'}), {len(cfg.tools)} tool(s) "
              f"({', '.join(t.name for t in cfg.tools) or '-'})")
        return EXIT_OK
    console = None
    if not args.no_console:
        from ..console.server import ConsoleError, ConsoleSettings

        try:
            console = ConsoleSettings.parse(args.console, certfile=args.console_cert, keyfile=args.console_key,
                                            insecure=args.console_insecure)
            console.check()
        except ConsoleError as exc:
            print(f"deadstop serve: {exc}", file=sys.stderr)
            return EXIT_USAGE
    return serve(args.config, state_dir=args.state_dir or default_state_dir(),
                 runtime_dir=args.runtime_dir or default_runtime_dir(), binds=args.bind, keys_dir=args.keys_dir,
                 console=console)


def _cmd_keys(args: argparse.Namespace) -> int:
    from ..client.locate import default_state_dir
    from ..daemon import keys

    keys_dir = args.keys_dir or os.path.join(args.state_dir or default_state_dir(), "keys")
    try:
        secret = keys.generate_client(keys_dir, args.name, args.scopes.split(","))
    except ValueError as exc:
        print(f"deadstop keys generate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.name}: scopes {args.scopes}; give the client {secret} (its secret key); "
          f"the daemon admits it from its next connection")
    return EXIT_OK


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value:g}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__

    from . import parsers

    parser = argparse.ArgumentParser(prog="deadstop", description="Process-isolated agent runs whose stop really stops.",
                                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"deadstop {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True)
    serve = sub.add_parser("serve", help="run the daemon: one supervisor serving the control verbs over ZeroMQ")
    serve.add_argument("--config", metavar="PATH", help="the TOML file of agents, tools and defaults")
    serve.add_argument("--state-dir", metavar="DIR", help="where the journal lives (default: the well-known one)")
    serve.add_argument("--runtime-dir", metavar="DIR",
                       help="owner-only directory for its sockets and daemon.json (default: "
                            "$XDG_RUNTIME_DIR/deadstop/daemon, /run/deadstop/daemon as root, linked from "
                            "the well-known ../daemon.json)")
    serve.add_argument("--bind", action="append", metavar="ENDPOINT", help="also listen here (tcp:// needs CURVE keys)")
    serve.add_argument("--keys-dir", metavar="DIR", help="CURVE keys for tcp:// (default: STATE_DIR/keys)")
    serve.add_argument("--check", action="store_true", help="check the configuration file and exit")
    serve.add_argument("--console", metavar="[HOST:]PORT",
                       help="serve the web console here (default: 127.0.0.1:7420, or a free port if that one is taken)")
    serve.add_argument("--no-console", action="store_true", help="serve no web console")
    serve.add_argument("--console-cert", metavar="PEM", help="TLS certificate chain for the console (with --console-key)")
    serve.add_argument("--console-key", metavar="PEM", help="TLS private key for the console")
    serve.add_argument("--console-insecure", action="store_true",
                       help="allow plain HTTP on an address other than loopback (logins cross the network in the clear)")
    serve.set_defaults(func=_cmd_serve)
    keys = sub.add_parser("keys", help="CURVE keys of clients that reach the daemon over tcp://")
    ksub = keys.add_subparsers(dest="action", required=True)
    gen = ksub.add_parser("generate", help="a client key pair with its scopes")
    gen.add_argument("name")
    gen.add_argument("--scopes", default="read", help="comma-separated: read, write, admin (default: read)")
    gen.add_argument("--keys-dir", metavar="DIR")
    gen.add_argument("--state-dir", metavar="DIR", help="the daemon's state directory (its keys are in keys/)")
    gen.set_defaults(func=_cmd_keys)
    parsers.add_parsers(sub, parsers.common_options(), _non_negative)
    parsers.add_console_parser(sub, parsers.common_options())
    demo = sub.add_parser("demo", help="start misbehaving runs, stop them, print their stop reports")
    demo.add_argument("--containment", choices=["auto", "cgroup", "process-group"], default="auto")
    demo.add_argument("--grace", type=_non_negative, default=0.5, help="seconds between SIGTERM and SIGKILL")
    demo.set_defaults(func=_cmd_demo)
    doctor = sub.add_parser("doctor", help="which isolation and containment layers runs get on this host, "
                                           "and why any is missing")
    doctor.add_argument("--json", action="store_true", help="print the profile as JSON")
    doctor.add_argument("--strict", action="store_true", help="exit 1 if any isolation layer is missing")
    doctor.set_defaults(func=_cmd_doctor)
    # Listed here for --help; `deadstop bench ...` itself goes straight to the bench's own parser (see main).
    sub.add_parser("bench", add_help=False,
                   help="measure stop, kill and start latency beside this host's floors: the kill benchmark, "
                        "or your agent with --target MODULE:ATTR / --argv CMD (deadstop bench --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        args = argparse.Namespace(verb="bench", rest=argv[1:])
        runner = _cmd_bench
    else:
        args = build_parser().parse_args(argv)
        if args.verb in REMOTE_VERBS:
            from . import remote

            runner = remote.run
        else:
            runner = args.func
    from ..errors import DeadstopError
    from ...ipc.control import ControlFault

    try:
        return int(runner(args))
    except (DeadstopError, ControlFault) as exc:
        print(f"deadstop {args.verb}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `deadstop demo | head`: the reader is gone, which is not an error of ours.
        # Point stdout at /dev/null so the interpreter's final flush is quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
