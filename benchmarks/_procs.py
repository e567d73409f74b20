"""Process plumbing: deadstop.supervisor.bench.procs, under the name the scripts here import."""

from deadstop.supervisor.bench.procs import *  # noqa: F401,F403
