"""deadstop's side of the kill benchmark: deadstop.supervisor.bench.runs, under the name the scripts here import."""

from deadstop.supervisor.bench.runs import *  # noqa: F401,F403
from deadstop.supervisor.bench.runs import _astop, _stop  # noqa: F401
