"""Frame layout, size limits and credentials of the egress wire.

A worker request is one ZeroMQ multipart message on a DEALER socket:

    [VERSION, run_id, credential, generation, body]

and the broker's ROUTER socket prepends the peer identity on receipt. Putting
the credential and generation in frames of their own lets the broker refuse a
forged or stale request before it parses any JSON (cheapest check first).
"""

from __future__ import annotations

import os
import secrets
import tempfile

VERSION = b"ds1"
REQUEST_FRAMES = 5  # as sent by a worker; the ROUTER adds the identity frame

#: Soft cap: a request larger than this is answered with TOO_LARGE.
MAX_REQUEST_BYTES = 1 << 20
#: Hard cap given to ZeroMQ (ZMQ_MAXMSGSIZE): a peer sending a single frame
#: this large is disconnected by libzmq before the bytes reach Python.
HARD_FRAME_BYTES = 8 << 20

CREDENTIAL_BYTES = 32
#: Run ids are this many hex characters; the marker slot has this width.
RUN_ID_CHARS = 12

# Environment of an argv run. The credential itself is never put in the
# environment (same-uid processes can read /proc/<pid>/environ); the run reads
# it once from the inherited file descriptor named here.
ENV_EGRESS = "DEADSTOP_EGRESS"
ENV_RUN_ID = "DEADSTOP_RUN_ID"
ENV_GENERATION = "DEADSTOP_GENERATION"
ENV_CREDENTIAL_FD = "DEADSTOP_CREDENTIAL_FD"
#: Inherited by every descendant of a run; the sweep finds escapers by it.
ENV_MARKER = "DEADSTOP_RUN_MARKER"


def new_credential() -> bytes:
    """A fresh per-run secret, ASCII hex so any language can put it in a frame."""
    return secrets.token_hex(CREDENTIAL_BYTES).encode("ascii")


def make_runtime_dir(prefix: str = "ds-") -> str:
    """Create a socket directory only the owner can open.

    Unix socket permissions are not honoured by every platform, so the
    directory's 0700 mode is what keeps other users off the egress socket.
    It lives under XDG_RUNTIME_DIR or /tmp because socket paths are limited
    to ~107 bytes and callers' state directories can be deep.
    """
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base or not os.access(base, os.W_OK):
        base = None
    path = tempfile.mkdtemp(prefix=prefix, dir=base)
    os.chmod(path, 0o700)
    return path


def ipc_address(runtime_dir: str, name: str) -> str:
    address = f"ipc://{os.path.join(runtime_dir, name)}"
    if len(address) - len("ipc://") > 100:
        raise ValueError(f"socket path too long for AF_UNIX: {address}")
    return address


def send_frames(sock, frames: list[bytes]) -> None:
    """send_multipart without blocking, with plain-int flags.

    pyzmq's send_multipart combines its flag enums on every frame; on the
    egress hot path that costs more than the send itself (3.5 us against
    1 us for three frames, measured).
    """
    send = sock.send
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        send(frame, _MORE_NOBLOCK if i < last else _NOBLOCK, copy=False if len(frame) > 65536 else True)


def _flags() -> tuple[int, int]:
    import zmq

    return int(zmq.SNDMORE) | int(zmq.NOBLOCK), int(zmq.NOBLOCK)


_MORE_NOBLOCK, _NOBLOCK = _flags()
