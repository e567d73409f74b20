"""Misbehaving agents for `deadstop demo`. Each one is what a real agent run
can turn into; each calls the `ready` tool once its misbehaviour is set up."""

from __future__ import annotations

import os
import signal
import threading
import time

from . import egress


def _keep_sending(tool: str, **kwargs) -> None:
    while True:
        try:
            egress.call(tool, **kwargs)
        except Exception:
            return  # revoked


def sigterm_ignorer() -> None:
    """Ignores SIGTERM and keeps sending email."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_keep_sending, args=("send_email",), kwargs={"to": "boss@example.com"},
                     daemon=True).start()
    egress.call("ready")
    while True:
        time.sleep(1)


def process_tree(children: int = 13) -> None:
    """A tree of 1 + 3 * children processes (each child has two grandchildren)."""
    r, w = os.pipe()
    for _ in range(children):
        if os.fork() == 0:
            for _ in range(2):
                if os.fork() == 0:
                    os.write(w, b"g")
                    while True:
                        time.sleep(1)
            os.write(w, b"c")
            while True:
                time.sleep(1)
    need = 3 * children
    while need:
        need -= len(os.read(r, need))
    egress.call("ready")
    while True:
        time.sleep(1)


def setsid_escaper() -> None:
    """Double-forks a daemon into its own session that ignores SIGTERM."""
    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os.write(w, b"e")
            _keep_sending("send_email", to="everyone@example.com")
            while True:
                time.sleep(1)
        os._exit(0)
    os.read(r, 1)
    egress.call("ready")
    while True:
        time.sleep(1)


def egress_flooder(threads: int = 4) -> None:
    """Tool calls as fast as the broker answers them, from several threads."""
    for _ in range(threads):
        threading.Thread(target=_keep_sending, args=("search",), kwargs={"q": "more"}, daemon=True).start()
    egress.call("ready")
    _keep_sending("search", q="more")


AGENTS = {
    "sigterm-ignorer": sigterm_ignorer,
    "process-tree (40)": process_tree,
    "setsid-escaper": setsid_escaper,
    "egress-flooder": egress_flooder,
}
