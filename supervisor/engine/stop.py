"""The stop sequence, top to bottom: revoke -> SIGTERM -> grace -> SIGKILL -> sweep -> reap.

It is the only code that ends a run, whatever asked for the end: stop(),
kill(), the leader exiting by itself (its leftovers are still swept), the
supervisor closing, the spawner dying, or a start aborted half-way
(`abort_start`). Each caller only picks the mode; each way out is a
StopReport. If the sequence itself fails, it does not raise past the run:
it kills and sweeps the layer anyway and reports `ended_by="failsafe"` with
the failure. (A restarted supervisor's recovery, host/recovery.py, writes
its StopReports for runs of a supervisor that no longer exists.)

Guarantees kept here (docs/guarantees.md):
G1 the channel is revoked and the revocation committed to the journal before
   the first signal;
G2 in-flight handlers are cancelled by the same revoke (a synchronous one already
   running on a thread cannot be: it is waited for within the grace and reported
   in handlers_outlived_revoke, never counted as cancelled);
G3 every process of the run is gone (layer kill, then sweep) before return;
G4 every wait is bounded: grace for SIGTERM, KILL_BOUND after SIGKILL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import signal
import time
from typing import TYPE_CHECKING

from ..mechanisms.containment import Containment
from ..mechanisms.timer import sleep_until
from ..store.report import EndedBy, StopReport
from .states import RunState

if TYPE_CHECKING:
    from .run import AsyncRun

log = logging.getLogger("deadstop.stop")

#: After SIGKILL the kernel still has to tear processes down (large address
#: spaces, D-state I/O). Past this bound the stop reports survivors.
KILL_BOUND = 5.0


class StopMode(str, enum.Enum):
    """How the stop sequence begins."""

    STOP = "stop"  # SIGTERM, grace, then SIGKILL
    KILL = "kill"  # SIGKILL at once
    EXIT = "exit"  # the leader ended by itself: only its leftovers are killed


class RevokeSource(str, enum.Enum):
    """Who ended the run; quoted in every refusal and in the report (`revoke_source`)."""

    API = "api"  # a library caller
    EXIT = "exit"  # the run's leader exited
    SUPERVISOR = "supervisor"  # the supervisor closing, or a start that failed
    SPAWNER = "spawner"  # the spawner died or stopped answering
    QUOTA = "quota"  # a limit was crossed
    ABUSE = "abuse"  # the run spent its refusal budget
    PARENT = "parent"  # the run's parent session stopped it, or a sub-agent tool did
    TAKEOVER = "takeover"  # a new message superseded the run
    GATEWAY = "gateway"  # a gateway over the RPC
    CLI = "cli"  # an operator at a terminal
    CONSOLE = "console"  # an operator in the web console
    RESTART = "restart"  # a restarted supervisor recovering earlier runs


@dataclasses.dataclass(frozen=True)
class StopRequest:
    mode: StopMode
    source: RevokeSource
    reason: str
    grace: float
    requested_at: int

    @classmethod
    def of(cls, mode: StopMode | str, source: RevokeSource | str, reason: str, grace: float,
           requested_at: int) -> "StopRequest":
        """From the API's plain strings: an unknown mode or source is an error here, not a silent label."""
        try:
            mode = StopMode(mode)
        except ValueError:
            raise ValueError(f"unknown stop mode {mode!r}; one of {[m.value for m in StopMode]}") from None
        try:
            source = RevokeSource(source)
        except ValueError:
            raise ValueError(f"unknown stop source {source!r}; one of {[s.value for s in RevokeSource]}") from None
        return cls(mode, source, reason, grace, requested_at)


@dataclasses.dataclass
class StopProgress:
    """Where a run's one stop is: with its RunState, the only state a run has about its end.

    Made when the stop begins (the revoke), so a run that is not ending has none.
    """

    request: StopRequest
    limit: str | None = None  # the limit whose crossing began it (source "quota")
    was_paused: bool = False  # frozen when it began: SIGTERM must thaw it to be acted on
    phase: str = "revoked"  # revoked -> grace -> sweep -> reap
    kill_requested: bool = False  # kill() was asked at any point: the outcome is "killed"
    escalated: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # kill() during the grace


async def _wait_empty_or_escalate(run: "AsyncRun", term_sent_at: int, grace: float) -> bool:
    """Wait for the layer to empty; give up when the grace period counted from
    SIGTERM ends (to the microsecond, see supervisor/mechanisms/timer.py) or when kill()
    escalates."""
    layer, progress = run.containment, run.progress
    assert layer is not None and progress is not None
    deadline = term_sent_at + int(grace * 1e9)
    empty = asyncio.ensure_future(layer.wait_empty(grace + 1.0))
    others = [asyncio.ensure_future(progress.escalated.wait()), asyncio.ensure_future(sleep_until(deadline))]
    try:
        await asyncio.wait({empty, *others}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (empty, *others):
            if not task.done():
                task.cancel()
    return empty.done() and not empty.cancelled() and empty.result()


async def stop_sequence(run: "AsyncRun", req: StopRequest) -> StopReport:
    layer, progress = run.containment, run.progress
    assert layer is not None and progress is not None, "a stop begins (the revoke) with both"
    report = StopReport(run_id=run.id, containment=layer.name, requested_at=req.requested_at)

    # 1. Revoke (already done by whoever began the stop; idempotent). Nothing
    #    the run asks for is dispatched from here on, and the record is
    #    committed to the journal before any signal below.
    rec = run.revoke(req.source, req.reason)
    report.revoked_at, report.revoke_source, report.revoke_reason = rec.at, rec.source, rec.reason
    if run.state is not RunState.STOPPING:
        run.machine.to(RunState.STOPPING)

    try:
        await _signal_and_sweep(run, req, layer, report)
    except Exception as exc:  # a bug, or the host failing under us: the run still ends, here
        log.exception("run %s: stop sequence failed; killing and sweeping its layer", run.id)
        await _failsafe(run, layer, report, exc)

    # 3b. Synchronous handlers that were running on a thread at the revoke may still
    #     make their effect: nothing stops a thread. Wait for them within the grace
    #     (counted from the revoke; a kill does not wait), and name each in the report.
    await _wait_outliving(run, req, rec.at)
    if run.channel.revoke_tasks:  # isolated tools' helpers: killed from the revoke's step; gone before we return
        await asyncio.wait([asyncio.shield(t) for t in run.channel.revoke_tasks], timeout=KILL_BOUND)
        report.helpers_killed = len(run.channel.revoke_tasks)
    report.handlers_cancelled = run.channel.cancelled_at_revoke  # those refused at their commit gate included
    report.handlers_outlived_revoke = [{"tool": c.tool, "call_id": c.call_id, "returned_at": c.returned_at}
                                       for c in run.channel.outlived]

    progress.phase = "reap"
    # 4. Reap the leader; until now its zombie pinned the process group id.
    #    A leader still alive after the kill bound (its pidfd never fired) is
    #    a survivor whatever the layer's own view says.
    left = report.survivor_pids
    status = await run.release_leader()
    if run.pid is not None and not run.leader_exited.is_set() and run.pid not in left:
        left.append(run.pid)
    report.survivors = len(left)
    report.reaped_at = time.monotonic_ns()
    report.exit_code, report.exit_signal = _decode_status(status)
    report.refused_after_revoke = run.channel.refused_after_revoke
    report.outcome = run.final_state(req.mode, report.exit_code).value
    return report


async def _wait_outliving(run: "AsyncRun", req: StopRequest, revoked_at: int) -> None:
    handles = [handle for handle, _ctx in run.channel.outliving.values()]
    if not handles or req.mode is StopMode.KILL or (run.progress is not None and run.progress.kill_requested):
        return
    left = (revoked_at + int(req.grace * 1e9) - time.monotonic_ns()) / 1e9
    if left > 0:
        await asyncio.wait(handles, timeout=left)
        await asyncio.sleep(0)  # their done-callbacks (the journal rows, returned_at) run first


async def _signal_and_sweep(run: "AsyncRun", req: StopRequest, layer: Containment, report: StopReport) -> None:
    progress = run.progress
    assert progress is not None
    # 2. Signal the layer; right after the first signal, close the run's
    #    endpoint and its connections (physical revocation: see Broker.disconnect).
    if req.mode == "exit":
        report.ended_by = EndedBy.EXITED
        run.disconnect()
        if layer.members():  # the leader left children behind: they go too
            report.kill_sent_at = time.monotonic_ns()
            layer.kill()
            await layer.wait_empty(KILL_BOUND)
    elif req.mode == "kill" or progress.escalated.is_set():
        report.kill_sent_at = time.monotonic_ns()
        layer.kill()
        run.disconnect()
        report.ended_by = EndedBy.SIGKILL
        await layer.wait_empty(KILL_BOUND)
    else:
        report.term_sent_at = time.monotonic_ns()
        layer.signal(signal.SIGTERM)
        run.disconnect()
        if progress.was_paused:
            layer.thaw()  # a paused run must be able to act on SIGTERM
        progress.phase = "grace"
        if await _wait_empty_or_escalate(run, report.term_sent_at, req.grace):
            report.ended_by = EndedBy.SIGTERM
        else:
            report.kill_sent_at = time.monotonic_ns()
            layer.kill()
            report.ended_by = EndedBy.SIGKILL
            await layer.wait_empty(KILL_BOUND)

    progress.phase = "sweep"
    # 3. Sweep: whatever the layer's signals could not reach (setsid escapers
    #    outside the process group, processes that raced the kill).
    swept = layer.sweep()
    left: list[int] = []  # the sweep's own look found nothing: no second walk of the tree
    if swept:
        report.swept = swept
        report.ended_by = EndedBy.SWEPT if req.mode != "exit" else report.ended_by
        await layer.wait_all_gone(KILL_BOUND)
        left = layer.survivors()
    report.escaped_pids = list(getattr(layer, "escaped", []))
    report.escaped = len(report.escaped_pids)
    report.survivor_pids = left


async def _failsafe(run: "AsyncRun", layer: Containment, report: StopReport, exc: Exception) -> None:
    """The sequence raised: kill and sweep the layer (each step on its own), then report what is left."""
    progress = run.progress
    assert progress is not None
    report.failure = f"{type(exc).__name__}: {exc}"
    report.ended_by = EndedBy.FAILSAFE
    progress.kill_requested = True  # the outcome is "killed", whatever was asked
    progress.phase = "sweep"
    for step in (run.disconnect, layer.kill, layer.sweep):
        try:
            step()
        except Exception:
            log.exception("run %s: fail-safe step %s failed", run.id, getattr(step, "__name__", step))
    if report.kill_sent_at is None:
        report.kill_sent_at = time.monotonic_ns()
    try:
        await layer.wait_all_gone(KILL_BOUND)
        report.survivor_pids = layer.survivors()
    except Exception:
        log.exception("run %s: cannot tell whether its layer is empty", run.id)
        report.survivor_pids = sorted(layer.members())


def abort_start(run: "AsyncRun", layer: Containment | None, why: str) -> StopReport:
    """End a run whose start failed or was cancelled before it was attached.

    The channel is revoked first (nothing it could send counts); whatever the
    host forked before the failure reached us is killed through the layer, as
    a stop would; the run is FAILED with ended_by "never-started".
    """
    rec = run.revoke("supervisor", why)
    run.machine.to(RunState.FAILED)
    report = StopReport(run_id=run.id, containment=layer.name if layer else "none", outcome=RunState.FAILED.value,
                        ended_by=EndedBy.NEVER_STARTED, requested_at=rec.at, revoked_at=rec.at,
                        revoke_source=rec.source, revoke_reason=why, isolation=run.isolation)
    if layer is not None:
        left = layer.members()
        if left:  # forked before the cancel reached us
            report.kill_sent_at = time.monotonic_ns()
            layer.kill()
            report.swept = len(left)
    report.reaped_at = time.monotonic_ns()
    run.start_aborted(report)
    return report


def _decode_status(status: int | None) -> tuple[int | None, int | None]:
    if status is None:
        return None, None
    import os

    code = os.waitstatus_to_exitcode(status)
    return (code, None) if code >= 0 else (None, -code)
