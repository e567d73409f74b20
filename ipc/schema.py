"""Typed message bodies of the egress protocol (see docs/protocol.md).

msgspec decodes and validates in one pass, straight from bytes, which keeps
validation off the profile of the egress hot path; a hand-written validator
would be both slower and easier to get wrong. Unknown fields are ignored so
that older brokers accept newer workers.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

import msgspec

#: Request ids are non-negative and fit SQLite's INTEGER (the journal stores them).
MAX_ID = 2**63 - 1
RequestId = Annotated[int, msgspec.Meta(ge=0, le=MAX_ID)]
#: Names (tools, event kinds, error types) are short; the journal stores them.
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
#: Event kinds the supervisor publishes itself (`run.ended`, ...): a run may
#: not emit them, or subscribers could not tell its events from the real ones.
RESERVED_KIND_PREFIXES = ("run.", "session.")


class Call(msgspec.Struct, tag="call", tag_field="verb"):
    """Ask the supervisor to run a registered tool."""

    id: RequestId
    tool: Name
    args: list[Any] = []
    kwargs: dict[str, Any] = {}


class Emit(msgspec.Struct, tag="emit", tag_field="verb"):
    """Publish an event to the supervisor's subscribers."""

    id: RequestId
    kind: Name
    data: Any = None


class Result(msgspec.Struct, tag="result", tag_field="verb"):
    """The run's target returned this JSON value."""

    id: RequestId
    value: Any = None


class Failure(msgspec.Struct, tag="error", tag_field="verb"):
    """The run's target raised; carried as text, never as a pickled exception."""

    id: RequestId
    type: Name
    message: str
    traceback: str = ""


class Ping(msgspec.Struct, tag="ping", tag_field="verb"):
    """Liveness probe; answered with the run's current state."""

    id: RequestId


class Inbox(msgspec.Struct, tag="inbox", tag_field="verb"):
    """Ask for the message(s) this run was started with (argv agents)."""

    id: RequestId


Request = Union[Call, Emit, Result, Failure, Ping, Inbox]

_request_decoder = msgspec.json.Decoder(Request)
_encoder = msgspec.json.Encoder()


class ErrorBody(msgspec.Struct):
    code: int
    name: str
    message: str
    reason: Union[str, None] = None


class Reply(msgspec.Struct, omit_defaults=True):
    """Every request gets exactly one reply with the same id."""

    id: int
    ok: bool
    result: Any = None
    error: Union[ErrorBody, None] = None


_reply_decoder = msgspec.json.Decoder(Reply)
_replies_decoder = msgspec.json.Decoder(list[Reply])
#: A ds2 body: an array whose elements are kept raw, so that one bad request
#: is refused by itself and the others of its batch are still carried out.
_batch_decoder = msgspec.json.Decoder(list[msgspec.Raw])


def decode_request(body: bytes) -> Request:
    """Raise msgspec.ValidationError / DecodeError with a readable message on bad input.

    msgspec guards its recursion with the interpreter's limit, so JSON nested
    about 1,000 deep raises RecursionError; that is bad input like any other,
    not a fault of the broker.
    """
    try:
        return _request_decoder.decode(body)
    except RecursionError:
        raise msgspec.DecodeError("JSON is nested too deeply") from None


def decode_batch(body: bytes) -> list[msgspec.Raw]:
    """The elements of a ds2 body, undecoded; raises msgspec.DecodeError / ValidationError if it is not an array."""
    try:
        return _batch_decoder.decode(body)
    except RecursionError:
        raise msgspec.DecodeError("JSON is nested too deeply") from None


def join_batch(bodies: list[bytes]) -> bytes:
    """A ds2 body (or reply body) from already encoded objects: no second encoding."""
    return b"[" + b",".join(bodies) + b"]"


def encode(obj: Any) -> bytes:
    """JSON-encode a message or a tool value; raises TypeError for non-JSON values."""
    return _encoder.encode(obj)


def decode_reply(body: bytes) -> Reply:
    return _reply_decoder.decode(body)


def decode_replies(body: bytes) -> list[Reply]:
    """The replies of a ds2 reply message."""
    return _replies_decoder.decode(body)


def decode_json(body: bytes) -> Any:
    return msgspec.json.decode(body)


def ensure_jsonable(value: Any) -> bytes:
    """Encode `value` as JSON or raise TypeError naming the offending type."""
    try:
        return _encoder.encode(value)
    except (TypeError, msgspec.EncodeError) as exc:
        raise TypeError(f"value is not JSON-serialisable: {exc}") from None
