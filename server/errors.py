"""The server's exception hierarchy.

Every error the data plane raises on purpose is a :class:`ServerError`. Each class carries a
transport-neutral ``code`` (the name of the gRPC status code it maps to; the gRPC transport's one
interceptor does the mapping, so this module never imports grpc) and a ``reason``, the
``outcome`` label of ``pruneserve_requests_total``. :data:`HTTP_STATUS` beside them maps the same
codes to HTTP statuses (KServe v2 REST, OpenAI routes), so both transports classify every error
from this one hierarchy.

Messages are written for the caller: they say which value was wrong, the limit, and the fix.
They never carry stack traces, file-system paths of the server, or other internals; anything
that is not a :class:`ServerError` is a bug and is reported to the caller as a bare INTERNAL.
"""

from __future__ import annotations

#: Longest message a :class:`ServerError` keeps. Messages quote client values (names,
#: datatypes, shapes) and travel in a gRPC trailer, which clients drop beyond their metadata
#: limit (8 KiB by default); they are also logged once per refused request.
MAX_MESSAGE_CHARS = 512
#: Longest client-supplied value :func:`quote` reproduces in full.
MAX_QUOTED_CHARS = 64

#: Every ``reason`` a request can end with, i.e. the values of the ``outcome`` metric label.
OUTCOMES: tuple[str, ...] = (
    "success",
    "invalid_argument",
    "not_found",
    "resource_exhausted",
    "deadline_exceeded",
    "unavailable",
    "internal",
    "cancelled",
)


class ServerError(Exception):
    """Base class of every error the data plane reports to a caller.

    Attributes:
        code: name of the gRPC status code the transport answers with.
        reason: the ``outcome`` label recorded in ``pruneserve_requests_total``.
    """

    code: str = "INTERNAL"
    reason: str = "internal"
    #: Longest message kept (None = all of it, for errors only the operator reads).
    max_message_chars: int | None = MAX_MESSAGE_CHARS

    def __init__(self, message: str = "internal error") -> None:
        if self.max_message_chars is not None:
            message = shorten(message, self.max_message_chars)
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def shorten(text: str, limit: int) -> str:
    """``text`` itself when it has at most ``limit`` characters, else its head and tail around a marker.

    The tail is kept because messages end with the fix ("...; use one of ..."), and the
    marker says how much was cut, so a reader never mistakes a shortened value for the whole.
    """
    if len(text) <= limit:
        return text
    marker = f" …[{len(text) - limit} characters cut]… "
    keep = max(0, limit - len(marker))
    head = keep * 3 // 4
    return text[:head] + marker + text[len(text) - (keep - head) :]


def quote(value: object, limit: int = MAX_QUOTED_CHARS) -> str:
    """``repr(value)`` for a message, shortened to about ``limit`` characters.

    Use it for every client-controlled value a message names, so one huge name cannot
    crowd out the rest of the message under :data:`MAX_MESSAGE_CHARS`.
    """
    text = repr(value)
    if len(text) <= limit:
        return text
    return text[: max(1, limit - 1)] + f"…(+{len(text) - limit + 1} chars)"


#: ``ServerError.code`` -> the HTTP status the HTTP transport answers with (Triton's choices:
#: a refused request is 400, an unknown model 404, a full queue 429 so clients back off,
#: shutting down 503 so load balancers retry elsewhere, a passed deadline 504).
HTTP_STATUS: dict[str, int] = {
    "INVALID_ARGUMENT": 400,
    "NOT_FOUND": 404,
    "FAILED_PRECONDITION": 400,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    # nginx's "client closed request": never seen by the client, but logged and counted.
    "CANCELLED": 499,
    "INTERNAL": 500,
}


def http_status(error: ServerError) -> int:
    """The HTTP status for ``error`` (500 for a code without an entry)."""
    return HTTP_STATUS.get(error.code, 500)


class InvalidArgumentError(ServerError):
    """The request is malformed: unknown input/output, wrong shape or type, text too long, bad ids."""

    code = "INVALID_ARGUMENT"
    reason = "invalid_argument"


class NotFoundError(ServerError):
    """The named model or version is not in the repository."""

    code = "NOT_FOUND"
    reason = "not_found"


class ResourceExhaustedError(ServerError):
    """The model's queue is full; the caller should back off and retry."""

    code = "RESOURCE_EXHAUSTED"
    reason = "resource_exhausted"


class UnavailableError(ServerError):
    """The server is shutting down or the model is not ready; retry elsewhere or later."""

    code = "UNAVAILABLE"
    reason = "unavailable"


class DeadlineExceededError(ServerError):
    """The request's deadline passed before an answer was computed."""

    code = "DEADLINE_EXCEEDED"
    reason = "deadline_exceeded"


class CancelledError(ServerError):
    """The caller went away before an answer was computed (not a server fault)."""

    code = "CANCELLED"
    reason = "cancelled"


class FailedPreconditionError(ServerError):
    """The request is well-formed but the server's mode forbids it (e.g. loading a model while
    ``--model-control-mode`` is not ``explicit``)."""

    code = "FAILED_PRECONDITION"
    reason = "invalid_argument"


class ModelLoadError(ServerError):
    """An artifact was refused at load time (bad manifest, wrong sha256, unloadable graph).

    Raised by the repository; the data plane logs it and keeps serving the other models,
    so a caller only ever sees it as the model being absent (``NOT_FOUND``) or not ready.
    """

    code = "INTERNAL"
    reason = "internal"


class ConfigError(ServerError, ValueError):
    """A :class:`~pruneserve.server.config.ServeConfig` value is invalid (names the value and fix)."""

    code = "INVALID_ARGUMENT"
    reason = "invalid_argument"
    # Written by our own checks for the operator at start-up, never sent to a client: shortening
    # it would cut the list of valid keys or values that is the fix.
    max_message_chars = None


__all__ = [
    "HTTP_STATUS",
    "MAX_MESSAGE_CHARS",
    "MAX_QUOTED_CHARS",
    "OUTCOMES",
    "CancelledError",
    "ConfigError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "ModelLoadError",
    "NotFoundError",
    "ResourceExhaustedError",
    "ServerError",
    "UnavailableError",
    "http_status",
    "quote",
    "shorten",
]
