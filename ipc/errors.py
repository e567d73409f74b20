"""The error vocabulary shared by both ends of the wire.

Every refusal the broker sends carries one numbered code from `ErrorCode`;
the worker turns it back into the matching exception class, so code inside a
run can `except Revoked:` without parsing strings. The numbers are part of the
protocol (docs/protocol.md) and never change meaning.
"""

from __future__ import annotations

import enum
from typing import Any


class DeadstopError(Exception):
    """Root of every error deadstop raises, on either side of the wire."""


class ErrorCode(enum.IntEnum):
    MALFORMED = 1  # wrong frame count, generation frame not decimal, bad or too deeply nested JSON, schema violation
    TOO_LARGE = 2  # request over the size cap
    BAD_VERSION = 3  # protocol version frame not understood
    UNAUTHENTICATED = 4  # unknown run id or credential mismatch
    REVOKED = 5  # the run's egress was revoked (stop, kill, exit, quota...)
    STALE_GENERATION = 6  # request carries a generation that is no longer current
    TOOL_DENIED = 7  # tool not on this run's allow-list (whether or not it exists)
    UNKNOWN_TOOL = 8  # on the allow-list but no longer registered
    TOOL_ERROR = 9  # the handler raised
    CANCELLED = 10  # handler cancelled by revoke; its result was discarded
    BAD_ARGUMENTS = 11  # arguments do not fit the handler's signature
    RESULT_NOT_JSON = 12  # handler returned something that is not JSON-able
    PAUSED = 13  # reserved: request held while paused was dropped
    QUOTA_EXCEEDED = 14  # a limit of the run was crossed
    POLICY_DENIED = 15  # agent-to-agent policy refused the request
    INTERNAL = 16  # bug in deadstop; the request had no effect
    QUEUE_FULL = 17  # the run is paused and its held queue is at its cap (count or bytes)
    RESERVED_KIND = 18  # emit of an event kind the supervisor keeps for itself (run.*, session.*)
    TOOL_UNAVAILABLE = 19  # the tool's server is down (crashed, failed to start, restarting after a backoff)
    TOOL_TIMEOUT = 20  # no answer within the tool's timeout; the call was cancelled at its server


class EgressRefused(DeadstopError):
    """A tool call or event was refused by the supervisor's broker.

    `code` is the wire code; `reason` quotes the revocation record or policy
    that caused it when there is one.
    """

    #: the wire code: an ErrorCode, or the bare number of a code newer than this side knows
    code: int = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: int | None = None, reason: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.reason = reason


class Revoked(EgressRefused):
    """The run's egress channel is revoked; nothing it asks for will happen."""

    code = ErrorCode.REVOKED


class StaleGeneration(Revoked):
    """The run belongs to a superseded generation of its session."""

    code = ErrorCode.STALE_GENERATION


class ToolDenied(EgressRefused):
    """The tool is unknown, not on the run's allow-list, or refused by policy."""

    code = ErrorCode.TOOL_DENIED


class ToolError(EgressRefused):
    """The tool handler ran and failed; the message carries its error text."""

    code = ErrorCode.TOOL_ERROR


class QuotaExceeded(Revoked):
    """A limit of the run was crossed; the run is being stopped."""

    code = ErrorCode.QUOTA_EXCEEDED


_CLASS_BY_CODE: dict[ErrorCode, type[EgressRefused]] = {
    ErrorCode.REVOKED: Revoked,
    ErrorCode.STALE_GENERATION: StaleGeneration,
    ErrorCode.TOOL_DENIED: ToolDenied,
    ErrorCode.UNKNOWN_TOOL: ToolDenied,
    ErrorCode.POLICY_DENIED: ToolDenied,
    ErrorCode.TOOL_ERROR: ToolError,
    ErrorCode.TOOL_UNAVAILABLE: ToolError,
    ErrorCode.TOOL_TIMEOUT: ToolError,
    ErrorCode.CANCELLED: Revoked,
    ErrorCode.QUOTA_EXCEEDED: QuotaExceeded,
}


def refusal_from_wire(error: dict[str, Any]) -> EgressRefused:
    """Rebuild the exception a broker refusal stands for (unknown codes map to the base class)."""
    raw = error.get("code", ErrorCode.INTERNAL)
    try:
        code: int = ErrorCode(int(raw))
    except (TypeError, ValueError):
        code = raw if isinstance(raw, int) else ErrorCode.INTERNAL  # a newer broker's code: keep its number
    cls: type[EgressRefused] = _CLASS_BY_CODE.get(code, EgressRefused)  # type: ignore[call-overload]
    reason = error.get("reason")
    return cls(str(error.get("message", f"error {code}")), code=code, reason=reason if isinstance(reason, str) else None)
