"""netra's exception family.

Every error that can reach a client is a :class:`NetraError`. Each class owns
its wire ``code`` (the ``code`` of an ``error`` or ``agent_error`` event), the
HTTP status it is answered with over HTTP (the threads API, a refused
upgrade) and, where the error ends the connection, its WebSocket
``close_code``. Foreign
exceptions (pyjwt, sqlite3, psycopg, httpx) are translated into these at the
edge that calls the library, and nowhere else; anything that is not a
NetraError by the time it reaches a connection is a bug and is reported as
``internal`` without its traceback.
"""

from __future__ import annotations

from typing import Any, ClassVar, Final, Literal

ErrorCode = Literal[
    "bad_request",
    "unknown_type",
    "too_large",
    "unauthorized",
    "forbidden",
    "not_found",
    "rate_limited",
    "busy",
    "run_in_progress",
    "timeout",
    "tool_error",
    "llm_error",
    "store_error",
    "internal",
]

#: Close codes of protocol v1 (see docs/protocol.md).
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_INVALID_UTF8: Final = 1007
CLOSE_TOO_LARGE: Final = 1009
CLOSE_INTERNAL: Final = 1011
CLOSE_PROTOCOL_ABUSE: Final = 4400
CLOSE_UNAUTHORIZED: Final = 4401
CLOSE_AUTH_TIMEOUT: Final = 4408
CLOSE_TOO_MANY: Final = 4429
CLOSE_SLOW_CONSUMER: Final = 4430


class NetraError(Exception):
    """Base of every error with a wire representation."""

    code: ClassVar[ErrorCode] = "internal"
    #: The HTTP status of this error's answer over HTTP.
    http_status: ClassVar[int] = 500
    #: Close code when this error ends the connection (None: it does not).
    close_code: ClassVar[int | None] = None
    #: Whether a client may retry the same request unchanged.
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        #: Extra wire fields (e.g. ``retry_after_ms`` for ``busy``).
        self.extra = extra


class BadRequest(NetraError):
    code = "bad_request"
    http_status = 400


class UnknownType(NetraError):
    code = "unknown_type"
    http_status = 400


class TooLarge(NetraError):
    code = "too_large"
    http_status = 413
    close_code = CLOSE_TOO_LARGE


class Unauthorized(NetraError):
    code = "unauthorized"
    http_status = 401
    close_code = CLOSE_UNAUTHORIZED


class Forbidden(NetraError):
    code = "forbidden"
    http_status = 403


class NotFound(NetraError):
    code = "not_found"
    http_status = 404


class RateLimited(NetraError):
    code = "rate_limited"
    http_status = 429
    retryable = True


class Busy(NetraError):
    """Capacity is full; ``retry_after_ms`` says when to try again."""

    code = "busy"
    http_status = 503
    retryable = True

    def __init__(self, message: str, *, retry_after_ms: int) -> None:
        super().__init__(message, retry_after_ms=retry_after_ms)


class RunInProgress(NetraError):
    code = "run_in_progress"
    http_status = 409
    retryable = True


class RunTimeout(NetraError):
    code = "timeout"
    http_status = 504
    retryable = True


class ToolError(NetraError):
    """A tool call failed. The model sees it as a failed tool result."""

    code = "tool_error"
    http_status = 502


class LLMError(NetraError):
    code = "llm_error"
    http_status = 502
    retryable = True


class StoreError(NetraError):
    code = "store_error"
    http_status = 503
    retryable = True


class InternalError(NetraError):
    code = "internal"
    http_status = 500
    close_code = CLOSE_INTERNAL
