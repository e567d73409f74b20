"""The spawner's control wire: one typed definition of every message, both ways.

Frames are multiprocess's Connection framing (a 4-byte big-endian length,
then the payload) carrying msgpack, decoded by msgspec straight into these
structs: a field the other side does not send is a decoding error, not a
`KeyError` somewhere later. A `Start` with `fds=1` is followed by the run's
credential memfd over SCM_RIGHTS; a `Started` with `has_pidfd` by the run's
pidfd.

This module imports msgspec only: the spawner imports it, and every megabyte
in the spawner is a megabyte each run must unmap when it is killed.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec


class _Op(msgspec.Struct, tag_field="op", omit_defaults=True):
    pass


# -- supervisor -> spawner -------------------------------------------------------------
class Start(_Op, tag="start"):
    """Fork a run. The spawner fills `in_cgroup` and `credential_fd` for the child."""

    run_id: str
    generation: int
    egress: str
    supervisor_pid: int
    blob: Union[bytes, None] = None  # a cloudpickled (target, args, kwargs), opened only in the child
    argv: Union[list[str], None] = None
    env: dict[str, str] = {}
    clean_env: bool = False  # the run's environment is exactly `env` plus deadstop's variables
    cwd: Union[str, None] = None
    cgroup_procs: Union[str, None] = None  # the run's v2 cgroup (born into it with clone3 where possible)
    join_cgroups: list[str] = []  # v1 controllers' cgroup.procs, joined before any user code
    pin_group: bool = True  # hold the leader as a zombie until Release (process-group layer)
    rlimits: dict[str, int] = {}
    sandbox: Union[dict[str, Any], None] = None  # worker/sandbox.py's plan
    fds: int = 0  # descriptors that follow over SCM_RIGHTS (the credential)
    in_cgroup: bool = False
    credential_fd: Union[int, None] = None
    #: bind a TCP listener on 127.0.0.1:proxy_port inside the run's network namespace, before the run
    #: exists, and hand it to the supervisor with Started (its egress proxy; see supervisor/egress/proxy.py)
    proxy_port: Union[int, None] = None
    #: an argv run whose stdin and stdout are a socket the supervisor holds the other end of (an MCP
    #: server run per session speaks stdio); the socket follows the credential over SCM_RIGHTS
    stdio: bool = False
    stdio_fd: Union[int, None] = None


class Probe(_Op, tag="probe"):
    """Fork a throw-away child that tries every sandbox step of `plan`."""

    plan: dict[str, Any]


class Config(_Op, tag="config"):
    """What the spawner (and its watchdog) must kill and remove should the supervisor die."""

    cgroup_root: Union[str, None] = None
    home_procs: Union[str, None] = None
    uid_block: Union[list[int], None] = None  # [first uid, count]


class Release(_Op, tag="release"):
    """The supervisor is done with a pinned leader's process group: reap it."""

    pid: int


class Ended(_Op, tag="ended"):
    """The run's stop is complete: orphans of it the spawner adopts from now on are strays."""

    run_id: str


class Shutdown(_Op, tag="shutdown"):
    """Kill everything below the spawner and exit."""


ToSpawner = Union[Start, Probe, Config, Release, Ended, Shutdown]


# -- spawner -> supervisor -------------------------------------------------------------
class Ready(_Op, tag="ready"):
    pid: int
    subreaper: bool


class Started(_Op, tag="started"):
    run_id: str
    pid: int
    create_time: float
    has_pidfd: bool
    has_proxy: bool = False  # the proxy listener follows the pidfd in the same SCM_RIGHTS message


class StartFailed(_Op, tag="start_failed"):
    run_id: str
    error: str


class Reaped(_Op, tag="reaped"):
    run_id: str
    pid: int
    status: int


class Probed(_Op, tag="probed"):
    results: dict[str, str]


FromSpawner = Union[Ready, Started, StartFailed, Reaped, Probed]

encode = msgspec.msgpack.Encoder().encode
decode_to_spawner = msgspec.msgpack.Decoder(ToSpawner).decode
decode_from_spawner = msgspec.msgpack.Decoder(FromSpawner).decode
