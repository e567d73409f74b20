"""The egress wire: schema, framing, credentials and error codes.

Imported by both the supervisor and the worker; imports neither.
"""

from .errors import (
    DeadstopError,
    EgressRefused,
    ErrorCode,
    QuotaExceeded,
    Revoked,
    StaleGeneration,
    ToolDenied,
    ToolError,
)

__all__ = [
    "DeadstopError",
    "EgressRefused",
    "ErrorCode",
    "QuotaExceeded",
    "Revoked",
    "StaleGeneration",
    "ToolDenied",
    "ToolError",
]
