"""Where a daemon is: the well-known connection file, and the overrides.

`deadstop serve` keeps its sockets and `daemon.json` in an owner-only
runtime directory, by default `<base>/daemon/`, and links the well-known
`<base>/daemon.json` to its file; `<base>` is `$XDG_RUNTIME_DIR/deadstop`
for a user, `/run/deadstop` as root. (The base itself is shared with the
library's per-supervisor runtime directories and stays 0711, so that runs
reach their endpoints below it: the daemon never narrows it.)

A client looks, in this order, at: the `daemon` argument (`--daemon` on the
command line), `$DEADSTOP_DAEMON`, then the well-known file. Each may be a
connection file's path, a runtime directory holding one, or a bare control
endpoint (`ipc://...`, `tcp://...`).
"""

from __future__ import annotations

import os

import msgspec

from ...ipc import gateway
from ...ipc.control import ControlFault, Fault

ENV_DAEMON = "DEADSTOP_DAEMON"
FILE_NAME = "daemon.json"


class NoDaemon(ControlFault):
    """No daemon answers where the client looked; the message says where that was."""

    def __init__(self, message: str):
        super().__init__(Fault.UNREACHABLE, message)


def runtime_base() -> str:
    """The same base the supervisor's own runtime directories use (mechanisms/leftovers.py)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "deadstop")
    if os.geteuid() == 0:
        return "/run/deadstop"
    return f"/tmp/deadstop-{os.geteuid()}"


def default_runtime_dir() -> str:
    """The daemon's own owner-only directory, below the shared base."""
    return os.path.join(runtime_base(), "daemon")


def well_known_file() -> str:
    return os.path.join(runtime_base(), FILE_NAME)


def default_state_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/deadstop"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "deadstop")


def candidates(daemon: str | None) -> list[tuple[str, str]]:
    """(where it came from, what it says), first one wins."""
    if daemon:
        return [("--daemon", daemon)]
    if os.environ.get(ENV_DAEMON):
        return [(f"${ENV_DAEMON}", os.environ[ENV_DAEMON])]
    return [("the well-known path", well_known_file())]


def locate(daemon: str | None = None) -> gateway.ConnectionFile:
    """The daemon's connection file (or one made up for a bare endpoint); NoDaemon if there is none."""
    (origin, value), = candidates(daemon)
    if value.startswith(("ipc://", "tcp://")):
        return gateway.ConnectionFile(control=[value], events=[], pid=0, started=0.0, state_dir="",
                                      supervisor_id="")
    path = os.path.join(value, FILE_NAME) if os.path.isdir(value) else value
    try:
        with open(path, "rb") as f:
            found = msgspec.json.decode(f.read(), type=gateway.ConnectionFile)
    except FileNotFoundError:
        raise NoDaemon(f"no deadstop daemon: {path} does not exist (looked at {origin}; start one with "
                       f"`deadstop serve`, or point --daemon / ${ENV_DAEMON} at its connection file)") from None
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise NoDaemon(f"no deadstop daemon: cannot read {path} ({origin}): {exc}") from None
    if found.pid and not pid_alive(found.pid):
        raise NoDaemon(f"no deadstop daemon: {path} ({origin}) names pid {found.pid}, which is not running")
    return found


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
