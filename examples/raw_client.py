#!/usr/bin/env python3
"""A deadstop argv run that speaks the egress wire by hand (protocol "ds1").

It imports nothing from deadstop: only pyzmq, json, errno and os (plus sys
for argv and stdout), to show that a run written in any language with a ZeroMQ
binding can use the protocol described in docs/protocol.md.

Usage, as the argv of a run whose allow-list names TOOL:

    raw_client.py TOOL '{"key": "value"}'

It calls TOOL with the JSON object as keyword arguments, emits a
"raw_client.called" event, prints one JSON line to stdout and reports the
same object as the run's result with the `result` verb:

    {"tool": TOOL, "kwargs": {...}, "ok": true,  "result": <tool value>}
    {"tool": TOOL, "kwargs": {...}, "ok": false, "error": {"code": ..., "name": ..., ...}}

Exit status: 0 if the call succeeded, 1 if the broker refused it, 2 if the
channel itself failed (no supervisor, refused emit or result, bad usage).
"""

import errno
import json
import os
import sys

import zmq

VERSION = b"ds1"
REPLY_TIMEOUT_MS = 60_000  # a last resort; the supervisor's death is noticed at once (pidfd)


class ChannelError(Exception):
    """The egress channel is unusable (supervisor gone, refused report, ...)."""


def read_credential(fd):
    """Read the credential from the inherited descriptor without consuming it.

    Where the platform has memfd_create the supervisor passes a sealed memfd:
    pread at offset 0 leaves the file offset (shared with every process that
    inherited the descriptor) alone, so children can read it again. Elsewhere
    it passes a pipe, where pread fails with ESPIPE and one read drains it.
    """
    try:
        data = os.pread(fd, 4096, 0)
    except OSError as exc:
        if exc.errno != errno.ESPIPE:
            raise
        data = os.read(fd, 4096)
    return data.strip()


class Channel:
    """One DEALER socket to the broker; requests are matched to replies by id."""

    def __init__(self, environ=os.environ):
        self.address = environ["DEADSTOP_EGRESS"]
        self.run_id = environ["DEADSTOP_RUN_ID"].encode("ascii")
        self.generation = environ.get("DEADSTOP_GENERATION", "0").encode("ascii")
        cred_fd = int(environ["DEADSTOP_CREDENTIAL_FD"])
        self.credential = read_credential(cred_fd)
        # This client starts no children, so it closes the descriptor and drops
        # the variable: while the descriptor is open, other processes of this
        # user can read the credential through /proc/<pid>/fd. A run whose
        # children need egress leaves both in place (docs/protocol.md, section 2).
        os.close(cred_fd)
        environ.pop("DEADSTOP_CREDENTIAL_FD", None)
        self.next_id = 1
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.address)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        # Watch the supervisor: if it dies, no reply will ever come.
        self.supervisor_fd = None
        sup = environ.get("DEADSTOP_SUPERVISOR_PID")
        if sup and hasattr(os, "pidfd_open"):
            try:
                self.supervisor_fd = os.pidfd_open(int(sup))
                self.poller.register(self.supervisor_fd, zmq.POLLIN)
            except OSError as exc:
                raise ChannelError(f"supervisor {sup} is gone: {exc}") from None

    def request(self, verb, **fields):
        """Send one request and return its reply body (a dict with id, ok, result | error)."""
        req_id = self.next_id
        self.next_id += 1
        body = json.dumps({"verb": verb, "id": req_id, **fields}).encode("utf-8")
        self.sock.send_multipart([VERSION, self.run_id, self.credential, self.generation, body])
        while True:
            events = dict(self.poller.poll(REPLY_TIMEOUT_MS))
            if not events:
                raise ChannelError(f"no reply to request {req_id} within {REPLY_TIMEOUT_MS} ms")
            if self.supervisor_fd is not None and self.supervisor_fd in events:
                raise ChannelError("the supervisor died; egress is closed")
            frames = self.sock.recv_multipart()
            if len(frames) != 2 or frames[0] != VERSION:
                raise ChannelError(f"unexpected reply frames: {frames!r}")
            reply = json.loads(frames[1])
            if reply.get("id") == req_id:
                return reply
            if reply.get("id") == 0 and not reply.get("ok"):
                # Refused before the broker could read our id (size, version,
                # frame count, credential, or a body without a usable id). Only
                # one request is in flight on this socket: this answers it.
                return reply
            # A late reply to some earlier request: not ours.

    def close(self):
        self.sock.close(0)
        self.ctx.term()
        if self.supervisor_fd is not None:
            os.close(self.supervisor_fd)


def main(argv):
    if len(argv) != 3:
        print(f"usage: {argv[0]} TOOL JSON_KWARGS", file=sys.stderr)
        return 2
    tool = argv[1]
    kwargs = json.loads(argv[2])
    if not isinstance(kwargs, dict):
        print("JSON_KWARGS must be a JSON object", file=sys.stderr)
        return 2
    try:
        chan = Channel()
    except KeyError as exc:
        print(f"not inside a deadstop run: {exc.args[0]} is unset", file=sys.stderr)
        return 2
    try:
        reply = chan.request("call", tool=tool, kwargs=kwargs)
        outcome = {"tool": tool, "kwargs": kwargs, "ok": reply["ok"]}
        if reply["ok"]:
            outcome["result"] = reply.get("result")  # omitted on the wire when null
        else:
            outcome["error"] = reply["error"]
        ack = chan.request("emit", kind="raw_client.called", data={"tool": tool, "ok": reply["ok"]})
        if not ack["ok"]:
            raise ChannelError(f"emit refused: {ack['error']}")
        print(json.dumps(outcome, sort_keys=True), flush=True)
        # The result is recorded before the broker acknowledges it, so wait for
        # the acknowledgement before exiting.
        ack = chan.request("result", value=outcome)
        if not ack["ok"]:
            raise ChannelError(f"result refused: {ack['error']}")
    except ChannelError as exc:
        print(f"raw_client: {exc}", file=sys.stderr)
        return 2
    finally:
        chan.close()
    return 0 if outcome["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
