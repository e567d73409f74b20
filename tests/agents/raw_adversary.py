#!/usr/bin/env python3
"""An argv run that sends hostile frames to the broker, then reports what it got back.

Usage: raw_adversary.py CASE   (CASE is one of the keys of CASES below)

Like examples/raw_client.py it imports nothing from deadstop (it reuses that
example's Channel for the honest part of the exchange). Each case sends its
frames on the run's own DEALER socket, reads exactly one reply per request,
and reports the list of replies as the run's result with the real
credential, so the test can compare what the wire said with the journal.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "examples"))

from raw_client import VERSION, Channel, ChannelError  # noqa: E402


def exchange(chan, frames):
    """Send raw frames; return the one reply body they provoke."""
    chan.sock.send_multipart(frames)
    events = dict(chan.poller.poll(30_000))
    if chan.sock not in events:
        raise ChannelError(f"no reply to {frames!r}")
    reply = chan.sock.recv_multipart()
    assert len(reply) == 2 and reply[0] == VERSION, reply
    return json.loads(reply[1])


def body(**fields):
    return json.dumps(fields).encode()


def flip_last(cred):
    return cred[:-1] + (b"0" if cred[-1:] != b"0" else b"1")


def wrong_credential(chan):
    call = body(verb="call", id=1, tool="echo", kwargs={"forged": True})
    return [
        exchange(chan, [VERSION, chan.run_id, flip_last(chan.credential), chan.generation, call]),
        exchange(chan, [VERSION, chan.run_id, b"", chan.generation, body(verb="call", id=2, tool="echo")]),
    ]


def malformed_body(chan):
    return [
        exchange(chan, [VERSION, chan.run_id, chan.credential, chan.generation, b"\x00this is not JSON"]),
        exchange(chan, [VERSION, chan.run_id, chan.credential, chan.generation, body(verb="launch", id=41)]),
        # After both refusals the broker still serves this run; unknown fields are ignored.
        exchange(chan, [VERSION, chan.run_id, chan.credential, chan.generation,
                        body(verb="call", id=42, tool="echo", kwargs={"after": "garbage"}, future_field=[1, 2])]),
    ]


def environment(chan):
    """Not hostile: report what the run's environment exposes (the credential must not be in it)."""
    with open("/proc/self/environ", "rb") as f:
        exec_env = f.read()  # the block this process was exec'd with, as other processes see it
    return {
        "names": sorted(entry.split(b"=", 1)[0].decode() for entry in exec_env.split(b"\0")
                        if entry.startswith(b"DEADSTOP_")),
        "credential_chars": len(chan.credential),
        "credential_in_environ": chan.credential in exec_env,
        "ping": exchange(chan, [VERSION, chan.run_id, chan.credential, chan.generation,
                                body(verb="ping", id=1)]),
    }


CASES = {"wrong-credential": wrong_credential, "malformed-body": malformed_body, "environment": environment}


def main(argv):
    chan = Channel()
    try:
        seen = CASES[argv[1]](chan)
        chan.next_id = 100  # clear of the ids used above
        ack = chan.request("result", value=seen)
        if not ack["ok"]:
            raise ChannelError(f"result refused: {ack['error']}")
    finally:
        chan.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
