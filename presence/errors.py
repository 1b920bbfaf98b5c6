"""The error tree of the presence service and its mapping to wire codes.

::

    PresenceError                       base; ``code`` is the protocol error code
    ├── BadRequest          bad_request   a frame that decodes but is wrong (field named)
    │   └── MalformedFrame  bad_request   a frame that does not decode to a map with ``t``
    ├── Unauthorized        (close 4001)  missing, bad or expired token
    ├── Forbidden           forbidden     role or channel pattern does not allow it
    ├── NotJoined           not_joined    the connection has not joined that channel
    ├── RateLimited         rate_limited  carries ``retry_after`` seconds
    ├── LimitExceeded       limit_exceeded quota reached (channels, users per query, ...)
    ├── Overloaded          overloaded    the node or its backend cannot serve now
    └── InternalError       internal      a bug or an unexpected backend failure

Close codes live in :class:`CloseCode`; nothing else in the code base spells numbers.
"""

from __future__ import annotations

import math
from enum import IntEnum


class CloseCode(IntEnum):
    """WebSocket close codes used by the protocol (PROTOCOL.md, "Errors")."""

    NORMAL = 1000
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    MALFORMED = 4000
    UNAUTHORIZED = 4001


class PresenceError(Exception):
    """Root of every error the service reports to a client."""

    code: str = "internal"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class BadRequest(PresenceError):
    """The request is well-formed but a field is missing, of the wrong type or too long."""

    code = "bad_request"


class MalformedFrame(BadRequest):
    """The frame is not a map with a string ``t`` in the negotiated encoding."""


class Unauthorized(PresenceError):
    """Authentication failed; the connection is closed with 4001."""

    code = "unauthorized"


class Forbidden(PresenceError):
    code = "forbidden"


class NotJoined(PresenceError):
    code = "not_joined"


class RateLimited(PresenceError):
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LimitExceeded(PresenceError):
    code = "limit_exceeded"


class Overloaded(PresenceError):
    code = "overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InternalError(PresenceError):
    code = "internal"


def error_frame(err: PresenceError, ref: int | None) -> dict[str, object]:
    """The ``error`` frame for ``err`` in reply to the request ``ref``."""
    frame: dict[str, object] = {"t": "error", "ref": ref, "code": err.code, "message": err.message}
    retry_after = getattr(err, "retry_after", None)
    if retry_after is not None:
        # Rounded up: a client that waits exactly this long must not be refused again.
        frame["retry_after"] = math.ceil(float(retry_after) * 1000) / 1000
    return frame
