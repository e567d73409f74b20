"""A deadline the event loop honours to the microsecond.

asyncio rounds every selector timeout up to a whole millisecond and adds
its clock resolution, so `wait_for(..., grace)` wakes up to ~1 ms late: for
a SIGTERM-ignoring run that is time added to every stop. A timerfd armed
with an absolute CLOCK_MONOTONIC deadline becomes readable exactly on time,
and readiness (unlike a timeout) is not rounded. Where timerfd is missing,
asyncio's own timer is used.

The timerfd is armed only for the last TIMERFD_SPAN of the wait; until then
asyncio's timer (an entry in the loop's heap, no descriptor) sleeps, and
its lateness falls inside that span. Most waits never get there: a stop's
grace wait ends when the run exits, and a stop_all of a thousand runs then
makes no thousand timerfds, each five system calls and an epoll entry.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import sys
import time

CLOCK_MONOTONIC = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC
TFD_TIMER_ABSTIME = 1
#: The end of a wait that a timerfd times: wider than asyncio's lateness (a millisecond
#: of rounding plus its clock's resolution) on a loop that is not overloaded.
TIMERFD_SPAN_NS = 3_000_000


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
        _libc.timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec),
                                          ctypes.c_void_p]
    except (OSError, AttributeError):
        _libc = None


async def sleep_until(deadline_ns: int) -> None:
    """Sleep until time.monotonic_ns() >= deadline_ns (same clock as CLOCK_MONOTONIC)."""
    remaining = deadline_ns - time.monotonic_ns()
    if remaining > TIMERFD_SPAN_NS:
        await asyncio.sleep((remaining - TIMERFD_SPAN_NS) / 1e9)
        remaining = deadline_ns - time.monotonic_ns()
    if remaining <= 0:
        return
    libc = _libc
    fd = libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC) if libc is not None else -1
    if libc is None or fd < 0:
        await asyncio.sleep(remaining / 1e9)
        return
    try:
        spec = _Itimerspec(it_value=_Timespec(deadline_ns // 1_000_000_000, deadline_ns % 1_000_000_000))
        if libc.timerfd_settime(fd, TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
            await asyncio.sleep(remaining / 1e9)
            return
        loop = asyncio.get_running_loop()
        fired: asyncio.Future[None] = loop.create_future()

        def fire() -> None:
            if not fired.done():
                fired.set_result(None)
        loop.add_reader(fd, fire)
        try:
            await fired
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)
