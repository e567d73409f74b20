"""Run targets for tests/test_broker_abuse.py: runs that abuse the egress broker.

Each speaks the wire on a raw DEALER socket of its own (with the run's real
address and credential, from the in-process configuration) where the Python
client would refuse to send what it sends. Every loop is bounded in count
and in time.
"""

from __future__ import annotations

import json
import os
import signal
import time

import zmq

from behaviours import _ready, raw_exchange
from deadstop.ipc.errors import EgressRefused
from deadstop.worker import egress


def garbage_flood(out_dir: str, frames: int, seconds: float) -> None:
    """Send authenticated garbage as fast as the socket takes it; write the count sent to `sent`.

    Replies are not read: a flooder does not care. Ends when `frames` were
    sent or `seconds` passed, or at SIGTERM (the stop for abuse), writing
    the count first.
    """
    cfg = egress._cfg()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cfg.address)
    garbage = [b"ds1", cfg.run_id, cfg.credential, cfg.generation, b"\x00 not json"]
    sent = [0]

    def report(*_: object) -> None:
        with open(os.path.join(out_dir, "sent"), "w") as f:
            f.write(str(sent[0]))
        os._exit(0)

    signal.signal(signal.SIGTERM, report)
    deadline = time.monotonic() + seconds
    while sent[0] < frames and time.monotonic() < deadline:
        try:
            sock.send_multipart(garbage, zmq.NOBLOCK)
            sent[0] += 1
        except zmq.Again:  # queue full (or the endpoint is gone): the broker is not reading us
            time.sleep(0.001)
    report()


def round_trips(seconds: float) -> dict:
    """Call `echo` back to back for `seconds`; report how many calls worked, failed, and the slowest."""
    calls, errors, slowest = 0, [], 0.0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        t = time.monotonic()
        try:
            egress.call("echo", "x")
            calls += 1
        except EgressRefused as exc:
            errors.append(f"{type(exc).__name__} {exc}")
        slowest = max(slowest, time.monotonic() - t)
    return {"calls": calls, "errors": errors, "slowest": slowest}


def nested(depth: int) -> bytes:
    """A valid `call` body whose single argument is a list nested `depth` deep."""
    return b'{"verb": "call", "id": 5, "tool": "echo", "args": [' + b"[" * depth + b"]" * depth + b"]}"


def deep_json(depths: list[int]) -> list:
    """Send one call per depth; report each reply's (id, error code or None)."""
    cfg = egress._cfg()
    out = []
    for depth in depths:
        reply = raw_exchange([b"ds1", cfg.run_id, cfg.credential, cfg.generation, nested(depth)])
        out.append(None if reply is None else (reply["id"], None if reply["ok"] else reply["error"]["code"]))
    return out


def emits_reserved(kinds: list[str]) -> dict:
    """Emit each kind; report the refusal code each got (0: accepted)."""
    codes = {}
    for kind in kinds:
        try:
            egress.emit(kind, {"forged": True})
            codes[kind] = 0
        except EgressRefused as exc:
            codes[kind] = int(exc.code)
    return codes


def blocked_in_call(out_dir: str, asynchronous: bool) -> None:
    """Block in a call (or acall) whose handler never answers; log how it ends, then try once more.

    Ignores SIGTERM so that it outlives the revoke long enough to write the
    log (the stop kills it after the grace).
    """
    import asyncio

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log = open(os.path.join(out_dir, "revoked.log"), "a", buffering=1)
    for tool in ("block", "tick"):
        try:
            if asynchronous:
                asyncio.run(egress.acall(tool))
            else:
                egress.call(tool)
            log.write(f"{tool} ok - {time.monotonic_ns()}\n")
        except EgressRefused as exc:
            log.write(f"{tool} {type(exc).__name__} {int(exc.code)} {time.monotonic_ns()}\n")
    while True:
        time.sleep(1)


def shares_its_channel(out_dir: str, ping_every: float = 0.0) -> None:
    """Hand the test this run's channel (address, credential) so a helper can speak for it, then wait.

    With `ping_every`, it keeps pinging on a raw socket of its own instead,
    ignoring every answer and SIGTERM, as a run that disregards its
    revocation would (for at most 60 s; the stop kills it after the grace).
    """
    cfg = egress._cfg()
    channel = {"address": cfg.address, "run_id": cfg.run_id.decode(), "credential": cfg.credential.decode(),
               "generation": cfg.generation.decode(), "uid": os.getuid(), "gid": os.getgid()}
    path = os.path.join(out_dir, "channel.json")
    with open(path + ".tmp", "w") as f:
        json.dump(channel, f)
    os.rename(path + ".tmp", path)
    if ping_every:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(cfg.address)
    _ready()  # the test may stop us before its answer arrives
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not ping_every:
            time.sleep(1)
            continue
        try:
            sock.send_multipart([b"ds1", cfg.run_id, cfg.credential, cfg.generation, b'{"verb":"ping","id":1}'],
                                zmq.NOBLOCK)
        except zmq.Again:
            pass
        while sock.poll(0):
            sock.recv_multipart()
        time.sleep(ping_every)
