"""Progress bars for the long measurements, on stderr and only when stderr is a terminal.

Piped or CI output stays exactly the report (stdout) and the timestamped log
lines (stderr). tqdm's monitor thread is switched off: the fork floors must be
measured while this process is single-threaded, and a bar may be open around them.
"""

from __future__ import annotations

import sys
from typing import Iterable


def enabled() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def trials(n: int, desc: str) -> Iterable[int]:
    """range(n), drawn as a bar named `desc` while it is iterated (and erased after)."""
    if not enabled():
        return range(n)
    from tqdm import tqdm

    tqdm.monitor_interval = 0
    return tqdm(range(n), desc=desc, file=sys.stderr, leave=False, unit="trial", dynamic_ncols=True)
