"""Floors: deadstop.supervisor.bench.floors, plus the pause floor, whose helper lives only here."""

from __future__ import annotations

import os
from typing import Any

from deadstop.supervisor.bench.floors import *  # noqa: F401,F403
from deadstop.supervisor.bench.floors import helper_floors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def freeze_floors(trials: int, settle: float) -> dict[str, Any]:
    """cgroup.freeze and killpg(SIGSTOP) of an equal 20-process busy tree, in a subreaper helper (see _freezefloor)."""
    return helper_floors("benchmarks._freezefloor", "cgroup_freeze", "sigstop", trials, settle, extra_path=ROOT)
