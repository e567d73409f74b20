"""Frame layout, size limits and credentials of the egress wire.

A worker request is one ZeroMQ multipart message on a DEALER socket:

    [VERSION, run_id, credential, generation, body]

and the broker's ROUTER socket prepends the peer identity on receipt. Putting
the credential and generation in frames of their own lets the broker refuse a
forged or stale request before it parses any JSON (cheapest check first).

Two versions share that layout. `ds1`: the body is one request object and
the reply one reply object. `ds2` (batched): the body is a JSON array of up
to MAX_BATCH request objects, checked and answered one by one, and the broker
answers with arrays of reply objects, so a client with many requests in
flight pays the frame, credential and generation checks once per batch
instead of once per request (docs/protocol.md, section 3a).
"""

from __future__ import annotations

import os
import secrets
import tempfile
from typing import Any

VERSION = b"ds1"
VERSION_BATCH = b"ds2"
VERSIONS = frozenset({VERSION, VERSION_BATCH})
#: Requests in one ds2 body at most. The broker reads a batch in one loop
#: step: this bounds how long a batch can hold a revoke queued behind it.
MAX_BATCH = 256
REQUEST_FRAMES = 5  # as sent by a worker; the ROUTER adds the identity frame

#: Soft cap: a request larger than this is answered with TOO_LARGE.
MAX_REQUEST_BYTES = 1 << 20
#: Hard cap given to ZeroMQ (ZMQ_MAXMSGSIZE): a peer sending a single frame
#: this large is disconnected by libzmq before the bytes reach Python.
HARD_FRAME_BYTES = 8 << 20

#: ZeroMQ high-water mark, in messages, of each egress connection in each
#: direction (both ends set it). An agent has a few dozen requests in flight
#: at most; 1000 (libzmq's own default) leaves room for bursts and bounds what
#: one hostile connection can park in the supervisor's memory, where 100,000
#: let a single flooding peer grow the supervisor by hundreds of megabytes.
SOCKET_HWM = 1000

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


def credential_memfd(credential: bytes) -> int:
    """A sealed memfd holding `credential`, for the run to inherit.

    Made on the trusted side and passed to the spawner over SCM_RIGHTS, so
    the credential bytes never sit in the spawner's memory (which every run
    forked after it would share). Sealed: nobody can change it. A pipe where
    there is no memfd (readable once).
    """
    import fcntl

    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("deadstop-credential", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        os.write(fd, credential)
        os.lseek(fd, 0, os.SEEK_SET)  # a shell run may `read <&$fd`; Python runs pread at 0
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        return fd
    r, w = os.pipe()
    os.write(w, credential)
    os.close(w)
    return r


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


def send_frames(sock: Any, frames: list[bytes]) -> None:
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
