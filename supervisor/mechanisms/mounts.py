"""This process's mount table, from /proc/self/mountinfo (one parser for everyone who needs it:
the cgroup hierarchies' mount points, the filesystem a runtime directory would sit on)."""

from __future__ import annotations

import os
from typing import NamedTuple

MOUNTINFO = "/proc/self/mountinfo"


class Mount(NamedTuple):
    point: str  # where it is mounted, in this process's view
    root: str  # the directory of the filesystem mounted there
    fstype: str
    superopts: str


def _unescape(path: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes (\\040, ...)."""
    return path.encode().decode("unicode_escape") if "\\" in path else path


def mount_table(mountinfo: str = MOUNTINFO) -> list[Mount]:
    """Every mount, in the kernel's order (a later mount on the same point covers an earlier one); [] if unreadable."""
    try:
        with open(mountinfo) as f:
            lines = f.readlines()
    except OSError:
        return []
    out = []
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields, after = left.split(), right.split()
        if not sep or len(fields) < 5 or not after:
            continue
        out.append(Mount(_unescape(fields[4]), _unescape(fields[3]), after[0], after[2] if len(after) > 2 else ""))
    return out


def filesystem_of(path: str, table: list[Mount] | None = None) -> str:
    """The type of the filesystem `path` is on: that of its longest mounted prefix ('' if unknown)."""
    types = {m.point: m.fstype for m in (mount_table() if table is None else table)}  # the last on a point wins
    path = os.path.realpath(path)
    while True:
        if path in types:
            return types[path]
        if path == "/":
            return ""
        path = os.path.dirname(path)
