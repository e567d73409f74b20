"""The measured processes' code: deadstop.supervisor.bench.targets, under the name the scripts here import.

Its functions travel into runs by value (as the kill benchmark sends them), so that a run
unpickling one imports nothing of the benchmark's or of deadstop.supervisor.
"""

import cloudpickle

from deadstop.supervisor.bench import targets as _module
from deadstop.supervisor.bench.targets import *  # noqa: F401,F403
from deadstop.supervisor.bench.targets import TREE_SIZE, _fork_child  # noqa: F401

cloudpickle.register_pickle_by_value(_module)
